"""The shipped models in ckpt/ load, are the architecture they claim, and carry their held-out evidence (a validation
score, or the cross-validation of their recipe when they were trained on every subject)."""
import jax
import numpy as np
import pytest

import mrijax
from mrijax import checkpoint

from conftest import central_slab

SHIPPED = sorted(p.parent.name for p in checkpoint.REPO_CKPT_DIR.glob("*/model.json"))


def test_the_default_model_is_shipped():
    assert checkpoint.DEFAULT_MODEL in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_loads_for_synthesis(name):
    variables, meta = checkpoint.load_model(name)
    members = variables if "members" in meta else [variables]  # an ensemble loads as its members' variables
    assert not set(meta["train_subjects"]) & set(meta["val_subjects"])
    if meta["val_subjects"]:
        assert np.isfinite(meta["val_mse"])
    else:  # trained on every subject: its recipe's leave-one-source-out CV is on the card
        summary = meta["cv"]["summary"]
        recipe = meta["cv"]["recipe"]  # the CV is of this model's recipe: same architecture and contrasts
        recipes = recipe["members"] if "members" in meta else [recipe]
        assert {"CAE", "LUT"} <= set(summary) and len(recipes) == len(members)
        for member, recipe in zip(members, recipes):
            anchor = "lut" if "lut" in member else "none"
            assert (recipe["variant"], recipe["anchor"], recipe["source"], recipe["target"]) == (
                mrijax.recognise_variant(member), anchor, meta["source"], meta["target"])
    for member in members:
        assert mrijax.recognise_variant(member) in meta["variant"].split("+")
        leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(member)]
        assert all(np.all(np.isfinite(x)) for x in leaves)
        fresh = mrijax.init_variables(mrijax.recognise_variant(member))  # trained weights differ from a fresh init
        assert not np.allclose(member["params"]["conv2_full"]["kernel"], fresh["params"]["conv2_full"]["kernel"])


def test_default_model_synthesizes_a_real_subject_better_than_its_mean(shared_data_dir):
    """End to end on real data: the shipped default model, on a central slab of a real subject (a held-out one when
    the model has any; a model trained on every subject has its held-out evidence in its card's CV), beats the best
    constant guess (the target's brain mean) by a clear margin."""
    from mrijax import data

    variables, meta = checkpoint.load_model()
    wanted = (meta["val_subjects"] or ["sub-ms19"])[0]
    (subject,) = data.load_subjects(shared_data_dir, source=meta["source"], target=meta["target"], ids=[wanted])
    # 16 central slices, the whole plane: the default scores ~0.57 of the constant's MSE there, an untrained net ~1.3
    slab = central_slab(subject.source.shape)
    mask = subject.mask[slab]
    prediction = mrijax.synthesize(variables, subject.source[slab], mask)
    truth = subject.target[slab][mask]
    mse = np.mean((prediction[mask] - truth) ** 2)
    constant = np.mean((truth - truth.mean()) ** 2)
    assert mse < 0.7 * constant, (mse, constant)


def test_adapt_preset_starts_from_the_shipped_base_with_the_new_subjects_lut(phantom_dataset, tmp_path):
    from mrijax import data
    from mrijax.config import PRESETS
    from mrijax.trainer import Trainer, training_lut

    phantom_subjects = data.load_subjects(phantom_dataset)
    config = PRESETS["adapt"]
    shipped, meta = checkpoint.load_model(config.init_from)
    assert meta["anchor"] == config.anchor and config.lr < PRESETS["ship"].lr
    state = Trainer(config, phantom_subjects, [], tmp_path / "adapt", progress=False).new_state()
    for a, b in zip(jax.tree_util.tree_leaves(shipped["params"]), jax.tree_util.tree_leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(state.constants["lut"]["values"], training_lut(phantom_subjects).values)
    assert not np.array_equal(state.constants["lut"]["values"], shipped["lut"]["values"])
