"""Several source contrasts (--source T1w,FLAIR): loading, patches, the model's input channels, synthesis and the
command line, which refuses a missing contrast with a one-line error naming it."""
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import mrijax
from mrijax import checkpoint, data, inference, models
from mrijax.baselines import lut
from mrijax.cli import infer
from mrijax.config import PRESETS
from mrijax.data import patches
from mrijax.data.augment import AugmentConfig
from mrijax.trainer import Trainer, training_lut

from conftest import central_slab

REPO = Path(__file__).resolve().parents[1]
TWO = models.configure("shallow", in_channels=2)  # `shallow`: the fewest layers, the least to compile


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    return data.make_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_subjects=3, seed=11)


@pytest.fixture(scope="module")
def two_source_subjects(phantom_root):
    return data.load_subjects(phantom_root, source="T1w,FLAIR")


@pytest.fixture(scope="module")
def two_source_model(tmp_path_factory):
    """An exported untrained T1w+FLAIR model: the file path of the CLI does not depend on training."""
    return checkpoint.export_model(tmp_path_factory.mktemp("model") / "two", models.init_variables(TWO, seed=5),
                                   {"source": "T1w,FLAIR", "target": "T2w"})


def test_each_source_is_loaded_and_normalised_on_the_first_ones_mask(phantom_root, two_source_subjects):
    subject = two_source_subjects[0]
    single = data.load_subjects(phantom_root, source="T1w")[0]
    flair = data.load_subjects(phantom_root, source="FLAIR")[0]
    np.testing.assert_array_equal(subject.source, single.source)  # the first contrast is the primary one
    assert subject.inputs.shape == (*subject.mask.shape, 2)
    np.testing.assert_array_equal(subject.inputs[..., 0], single.source)
    np.testing.assert_allclose(subject.inputs[..., 1], flair.source, rtol=1e-6)  # FLAIR / 3x its own brain mean
    assert subject.paths["FLAIR"].name.endswith("_FLAIR.nii.gz")
    mirror = data.mirrored(subject)
    np.testing.assert_array_equal(mirror.inputs, subject.inputs[::-1])
    with pytest.raises(ValueError, match="distinct"):
        data.source_names("T1w,T1w")


def test_patches_stack_the_sources_as_channels_and_augment_each(two_source_subjects):
    subjects = two_source_subjects[:1]
    records = data.patch_records(subjects, 16)[:4]
    batch = data.patch_dataset(subjects, records, (38,) * 3, (16,) * 3, batch_size=4, seed=0, epoch=0,
                               shuffle=False)[0]
    assert batch["source"].shape == (4, 38, 38, 38, 2) and batch["target"].shape == (4, 16, 16, 16, 1)
    for k, record in enumerate(records):
        np.testing.assert_array_equal(batch["source"][k, ..., 1],
                                      data.extract_patch(subjects[0].extra_sources[0], record[1:], (38,) * 3))
    augmented = data.patch_dataset(subjects, records, (38,) * 3, (16,) * 3, batch_size=4, seed=0, epoch=0,
                                   shuffle=False, augment=AugmentConfig())[0]
    np.testing.assert_array_equal(augmented["target"], batch["target"])
    for channel in (0, 1):  # each contrast changed
        assert not np.array_equal(augmented["source"][..., channel], batch["source"][..., channel])
    # with its own draw: a sample whose two channels are the same image comes out with two different images
    twin = {**batch, "source": np.repeat(batch["source"][0, ..., :1], 2, axis=-1)}
    changed = patches._AugmentSample(AugmentConfig())(twin, np.random.default_rng(3))["source"]
    assert not np.array_equal(changed[..., 0], changed[..., 1])


def test_an_anchored_two_source_model_starts_from_the_first_sources_table(two_source_subjects):
    subject = two_source_subjects[0]
    table = training_lut(two_source_subjects[1:])
    config = models.configure("shallow", anchor=True, in_channels=2)
    variables = models.set_lut(models.init_variables(config, seed=1), table.bin_centres, table.values)
    assert models.recognise_config(variables) == config
    slab = central_slab(subject.mask.shape)
    prediction = inference.synthesize_normalised(variables, subject.inputs[slab], subject.mask[slab], tile=None)
    np.testing.assert_allclose(prediction, lut.apply_lut(table, subject.source[slab], subject.mask[slab]), atol=1e-5)


def test_synthesize_takes_one_volume_per_source(two_source_subjects, two_source_model):
    subject = two_source_subjects[0]
    variables, meta = checkpoint.load_model(two_source_model)
    assert meta["source"] == "T1w,FLAIR" and models.recognise_config(variables) == TWO
    t1w = subject.source_volume.data
    flair = nib.as_closest_canonical(nib.load(subject.paths["FLAIR"])).get_fdata(dtype=np.float32)
    both = mrijax.synthesize(variables, [t1w, flair], subject.mask, tile=None)
    np.testing.assert_allclose(both, inference.synthesize_normalised(variables, subject.inputs, subject.mask,
                                                                     tile=None), atol=1e-6)
    flair_rescaled = mrijax.synthesize(variables, [t1w, 2.0 * flair], subject.mask, tile=None)
    np.testing.assert_allclose(flair_rescaled, both, atol=1e-6)  # each source is normalised by its own brain mean
    with pytest.raises(ValueError, match="2 source contrast"):
        mrijax.synthesize(variables, t1w, subject.mask)
    with pytest.raises(ValueError, match="differs from the first source"):
        mrijax.synthesize(variables, [t1w, flair[:-1]], subject.mask)


def test_training_records_the_sources_and_warm_starts_need_as_many(two_source_subjects, tmp_path):
    config = PRESETS["smoke"].replace(variant="shallow", source="T1w,FLAIR", epochs=1, max_steps_per_epoch=2,
                                      max_val_batches=1)
    result = Trainer(config, two_source_subjects[:2], two_source_subjects[2:], tmp_path / "run", progress=False,
                     log=lambda *a: None).fit()
    assert models.recognise_config(result["variables"]).in_channels == 2
    _, meta = checkpoint.load_model(tmp_path / "run")
    assert meta["source"] == "T1w,FLAIR"
    with pytest.raises(ValueError, match="2 source contrast"):
        Trainer(config.replace(source="T1w", init_from=str(tmp_path / "run")), two_source_subjects[:2], [],
                tmp_path / "one", progress=False).new_state()


def test_infer_reads_one_file_per_source_and_finds_them_in_folders(phantom_root, two_source_model, tmp_path):
    anat = phantom_root / "sub-phantom01" / "anat"
    out = tmp_path / "out.nii.gz"
    assert infer.main(["-i", str(anat / "sub-phantom01_T1w.nii.gz"), "-i", str(anat / "sub-phantom01_FLAIR.nii.gz"),
                       "-o", str(out), "--checkpoint", str(two_source_model)]) == 0
    assert nib.load(out).shape == nib.load(anat / "sub-phantom01_T1w.nii.gz").shape
    with pytest.raises(ValueError, match="no FLAIR image given"):
        infer.main(["-i", str(anat / "sub-phantom01_T1w.nii.gz"), "--checkpoint", str(two_source_model)])
    pairs = infer.list_inputs([str(phantom_root)], ["T1w", "FLAIR"])
    assert [p[0][1].name for p in pairs] == [f"sub-phantom0{i}_FLAIR.nii.gz" for i in (1, 2, 3)]
    assert all(p[1] is not None and p[1].name.endswith("_mask.nii.gz") for p in pairs)


def test_a_subject_without_its_flair_fails_alone_with_one_line_naming_it(phantom_root, two_source_model, tmp_path):
    folder = tmp_path / "in"
    for subject in ("sub-phantom01", "sub-phantom02"):
        (folder / subject / "anat").mkdir(parents=True)
        for name in ("T1w", "FLAIR"):
            source = phantom_root / subject / "anat" / f"{subject}_{name}.nii.gz"
            if not (subject == "sub-phantom02" and name == "FLAIR"):
                (folder / subject / "anat" / source.name).symlink_to(source)
    result = subprocess.run([sys.executable, str(REPO / "experiments" / "infer.py"), "-i", str(folder), "-o",
                             str(tmp_path / "out"), "--checkpoint", str(two_source_model)],
                            capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "MRIJAX_HUGEPAGES": "0"})  # no restart: one JAX import, not two
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sub-phantom02_FLAIR.nii.gz" in errors[0] and "no FLAIR image" in errors[0]
    assert (tmp_path / "out" / "sub-phantom01_T1w_synth-T2w.nii.gz").is_file()  # the other subject still done
    assert not (tmp_path / "out" / "sub-phantom02_T1w_synth-T2w.nii.gz").exists()
