"""The shipped models in ckpt/ load, are the architecture they claim, and were validated on held-out subjects."""
import numpy as np
import pytest

import mrijax
from mrijax import checkpoint

SHIPPED = sorted(p.parent.name for p in checkpoint.REPO_CKPT_DIR.glob("*/model.json"))


def test_the_default_model_is_shipped():
    assert checkpoint.DEFAULT_MODEL in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_loads_for_synthesis(name):
    variables, meta = checkpoint.load_model(name)
    assert mrijax.recognise_variant(variables) == meta["variant"]
    assert not set(meta["train_subjects"]) & set(meta["val_subjects"])
    assert np.isfinite(meta["val_mse"])
    leaves = [np.asarray(x) for x in __import__("jax").tree_util.tree_leaves(variables)]
    assert all(np.all(np.isfinite(x)) for x in leaves)
    fresh = mrijax.init_variables(meta["variant"])  # trained weights differ from a fresh init
    assert not np.allclose(variables["params"]["conv2_full"]["kernel"], fresh["params"]["conv2_full"]["kernel"])
