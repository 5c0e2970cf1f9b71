"""The generalisation recipe: brain-voxel loss, LUT-anchored network, source augmentation in the pipeline,
test-time flip averaging and the leave-one-source-out cross-validation command."""
import dataclasses
import json
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mrijax
from mrijax import checkpoint, cv, data, inference, models, training
from mrijax.baselines import lut
from mrijax.config import PRESETS
from mrijax.data.augment import AugmentConfig
from mrijax.trainer import Trainer, split_subjects, training_lut

from conftest import central_slab

REPO = Path(__file__).resolve().parents[1]
# `shallow` throughout: the variant with the fewest layers, so the least to compile (the CV command trains it too)
ANCHORED = dataclasses.replace(models.get_config("shallow"), anchor=True)


@pytest.fixture(scope="module")
def phantom_subjects(tmp_path_factory):
    root = data.make_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_subjects=3, seed=7)
    return data.load_subjects(root)


def _fitted_table(subjects):
    table = training_lut(subjects)
    return table.bin_centres, table.values


def test_an_untrained_anchored_network_is_the_look_up_table(phantom_subjects):
    subject = phantom_subjects[0]
    centres, values = _fitted_table(phantom_subjects[1:])
    variables = models.set_lut(models.init_variables(ANCHORED, seed=3), centres, values)
    # a second input channel (the LUT's output): 27 x filters more weights in the first convolution
    assert models.count_params(variables["params"]) == models.count_params(
        models.init_variables("shallow")["params"]) + 27 * ANCHORED.filters
    assert models.recognise_config(variables) == ANCHORED
    slab = central_slab(subject.mask.shape)
    source, mask = subject.source[slab], subject.mask[slab]
    prediction = inference.synthesize_normalised(variables, source, mask, tile=None)
    expected = lut.apply_lut(lut.LUT(centres, values), source, mask)
    np.testing.assert_allclose(prediction, expected, atol=1e-5)
    with pytest.raises(ValueError, match="bins"):
        models.set_lut(variables, centres[:10], values[:10])
    with pytest.raises(ValueError, match="anchored"):
        models.set_lut(models.init_variables("shallow"), centres, values)


def test_brain_loss_ignores_background_voxels():
    rng = np.random.default_rng(0)
    target = rng.uniform(0, 1, (2, 4, 4, 4, 1)).astype(np.float32)
    mask = (rng.uniform(size=target.shape) > 0.5).astype(np.float32)
    prediction = np.where(mask > 0, target + 0.1, 5.0).astype(np.float32)  # large errors only outside the brain
    batch = {"target": target, "mask": mask}
    np.testing.assert_allclose(float(training.mse_loss(prediction, batch, "brain")), 0.01, rtol=1e-4)
    expected_all = np.mean((prediction - target) ** 2)
    np.testing.assert_allclose(float(training.mse_loss(prediction, batch, "all")), expected_all, rtol=1e-5)
    with pytest.raises(ValueError, match="loss"):
        training.create_train_state("shallow", loss="median")


def _epoch(subjects, epoch, augment, seed=0):
    records = data.patch_records(subjects, 16)[:6]
    batches = data.patch_dataset(subjects, records, (38,) * 3, (16,) * 3, batch_size=3, seed=seed, epoch=epoch,
                                 augment=augment)
    return [batches[i] for i in range(len(batches))]


def test_augmentation_is_a_pure_function_of_seed_and_epoch_and_leaves_the_target_alone(phantom_subjects):
    subjects = phantom_subjects[:1]
    plain = _epoch(subjects, 0, None)
    first, again = _epoch(subjects, 0, AugmentConfig()), _epoch(subjects, 0, AugmentConfig())
    other_epoch, other_seed = _epoch(subjects, 1, AugmentConfig()), _epoch(subjects, 0, AugmentConfig(), seed=1)
    for a, b, p in zip(first, again, plain):
        for key in ("source", "target", "mask"):
            np.testing.assert_array_equal(a[key], b[key])  # same (seed, epoch, step): bitwise the same
        np.testing.assert_array_equal(a["target"], p["target"])  # target and mask untouched
        np.testing.assert_array_equal(a["mask"], p["mask"])
        assert not np.array_equal(a["source"], p["source"])  # the source did change
        np.testing.assert_array_equal(a["source"] == 0, p["source"] == 0)  # background stays background
    assert not all(np.array_equal(a["source"], b["source"]) for a, b in zip(first, other_seed))
    # another epoch: other blocks with other changes, the target still untouched
    plain_1 = _epoch(subjects, 1, None)
    for a, p in zip(other_epoch, plain_1):
        np.testing.assert_array_equal(a["target"], p["target"])


def test_flip_averaging_is_the_mean_of_the_two_passes(phantom_subjects):
    subject = phantom_subjects[0]
    variables = models.init_variables("shallow", seed=2)
    slab = central_slab(subject.mask.shape)
    volume, mask = subject.source_volume.data[slab], subject.mask[slab]
    plain = mrijax.synthesize(variables, volume, mask, tile=None)
    mirrored = mrijax.synthesize(variables, volume[::-1], mask[::-1], tile=None)[::-1]
    both = mrijax.synthesize(variables, volume, mask, tile=None, flip=True)
    np.testing.assert_allclose(both, 0.5 * (plain + mirrored), atol=1e-6)
    assert np.abs(plain - mirrored).max() > 1e-3  # the network is not mirror-symmetric: the mean is not a no-op


def test_anchored_brain_loss_augmented_run_resumes_exactly_and_exports_its_table(phantom_subjects, tmp_path):
    def run(workdir, epochs):
        config = PRESETS["smoke"].replace(variant="shallow", epochs=epochs, max_steps_per_epoch=2, max_val_batches=1,
                                          anchor="lut", loss="brain", augment="all", jitter=4)
        train, val = split_subjects(phantom_subjects, 1)
        return Trainer(config, train, val, workdir, progress=False, log=lambda *a: None)

    full = run(tmp_path / "full", 2).fit()
    run(tmp_path / "cut", 1).fit()
    resumed = run(tmp_path / "cut", 2).fit(resume=True)
    assert set(resumed["variables"]) == {"params", "batch_stats", "lut"}
    for a, b in zip(jax.tree_util.tree_leaves(full["variables"]), jax.tree_util.tree_leaves(resumed["variables"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # the table is the training subjects' LUT, carried (untrained) into the exported model
    variables, meta = checkpoint.load_model(tmp_path / "cut")
    assert meta["anchor"] == "lut" and meta["voxel_size_mm"] == [2.0, 2.0, 2.0]
    np.testing.assert_array_equal(variables["lut"]["values"], _fitted_table(phantom_subjects[:-1])[1])
    # a warm start takes the weights but refits the table on its own training subjects (pretrain, then fine-tune)
    warm = Trainer(PRESETS["smoke"].replace(variant="shallow", anchor="lut", init_from=str(tmp_path / "cut")),
                   phantom_subjects[-1:], [], tmp_path / "warm", progress=False).new_state()
    np.testing.assert_array_equal(warm.constants["lut"]["values"], _fitted_table(phantom_subjects[-1:])[1])
    assert not np.array_equal(warm.constants["lut"]["values"], variables["lut"]["values"])
    for a, b in zip(jax.tree_util.tree_leaves(variables["params"]), jax.tree_util.tree_leaves(warm.params)):
        np.testing.assert_array_equal(a, b)
    # warm starts keep the kind of model
    with pytest.raises(ValueError, match="anchor"):
        Trainer(PRESETS["smoke"].replace(variant="shallow", init_from=str(tmp_path / "cut")), phantom_subjects[:2],
                [], tmp_path / "plain", progress=False).new_state()


def test_source_groups_keep_sources_and_sessions_together():
    ids = ["sub-gli00000", "sub-gli00001", "sub-mni152", "sub-ms07", "sub-omslp01s1", "sub-omslp01s2", "sub-tcgadu1"]
    assert cv.source_groups(ids) == [["sub-gli00000", "sub-gli00001"], ["sub-mni152"], ["sub-ms07"],
                                     ["sub-omslp01s1", "sub-omslp01s2"], ["sub-tcgadu1"]]
    assert cv.source_groups(ids, ["sub-m*", "sub-gli*,sub-tcga*", "sub-omslp*"]) == [
        ["sub-mni152", "sub-ms07"], ["sub-gli00000", "sub-gli00001", "sub-tcgadu1"], ["sub-omslp01s1", "sub-omslp01s2"]]
    with pytest.raises(ValueError, match="no --groups|no subject|exactly one"):
        cv.source_groups(ids, ["sub-m*", "sub-gli*"])
    with pytest.raises(ValueError, match="matches no subject"):
        cv.source_groups(ids, ["sub-x*", "sub-*"])


def test_cv_refuses_a_warm_start_that_saw_a_held_out_subject(tmp_path):
    model = tmp_path / "pretrained"
    model.mkdir()
    (model / "model.json").write_text(json.dumps({"variant": "base", "train_subjects": ["sub-a1", "sub-b1"]}))
    groups = [["sub-a1", "sub-a2"], ["sub-c1"]]
    with pytest.raises(ValueError, match="trained on sub-a1, which the CV holds out"):
        cv.run_cv([], groups, PRESETS["smoke"].replace(init_from=str(model)), tmp_path / "cv")
    assert not (tmp_path / "cv").exists()  # refused before anything was written
    cv.check_no_leak(PRESETS["smoke"].replace(init_from=str(model)), [["sub-c1"], ["sub-d1"]])  # disjoint: fine


def test_cv_command_refuses_a_leaking_warm_start_before_reading_any_volume(tmp_path):
    from mrijax.cli import cv as cv_cli

    model = tmp_path / "pretrained"
    model.mkdir()
    (model / "model.json").write_text(json.dumps({"variant": "base", "train_subjects": ["sub-a1"]}))
    for sid in ("sub-a1", "sub-b1"):  # unreadable images: loading them would fail with another error
        anat = tmp_path / "data" / sid / "anat"
        anat.mkdir(parents=True)
        for modality in ("T1w", "T2w"):
            (anat / f"{sid}_{modality}.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="trained on sub-a1, which the CV holds out"):
        cv_cli.main(["--data", str(tmp_path / "data"), "--preset", "smoke", "--init-from", str(model),
                     "--out", str(tmp_path / "cv"), "--no-progress"])
    assert not (tmp_path / "cv").exists()


def _run_cv(argv, capsys) -> tuple[int, str, str]:
    """`mrijax cv` in this process, as the script runs it (`cli.run`: exit status, one-line errors); compiled steps
    are shared between the calls."""
    from mrijax import cli
    from mrijax.cli import cv as cv_cli

    with pytest.raises(SystemExit) as exited:
        cli.run(lambda: cv_cli.main(argv))
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


@pytest.mark.slow
def test_cv_command_trains_one_model_per_fold_and_scores_every_held_out_subject(phantom_subjects, tmp_path, capsys,
                                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = Path(phantom_subjects[0].paths["source"]).parents[2]
    flags = ["--data", str(root), "--preset", "smoke", "--variant", "shallow", "--epochs", "1",
             "--max-steps-per-epoch", "2", "--anchor", "lut", "--loss", "brain",
             "--groups", phantom_subjects[0].id, f"{phantom_subjects[1].id},{phantom_subjects[2].id}",
             "--baselines", "lut", "own-lut", "--out", str(tmp_path / "cv"), "--no-progress"]
    # a second process may train part of the folds ahead (--train-folds): it exports their models and scores nothing
    code, _, err = _run_cv(flags + ["--train-folds", "2"], capsys)
    assert code == 0, err[-3000:]
    assert [p.parent.parent.name for p in (tmp_path / "cv").glob("*/model/model.json")] == [
        cv.fold_name(1, [phantom_subjects[1].id, phantom_subjects[2].id])]
    assert not (tmp_path / "cv" / "cv.json").exists()
    code, out, err = _run_cv(flags, capsys)
    assert code == 0, err[-3000:]
    assert out.count("steps/epoch") == 1  # only the first fold trained here; the second was reused
    report = json.loads((tmp_path / "cv" / "cv.json").read_text())
    rows = report["rows"]
    assert {(r["subject"], r["method"]) for r in rows} == {
        (s.id, m) for s in phantom_subjects for m in ("CAE", "LUT", "OWN-LUT")}
    assert [len(f["train"]) for f in report["folds"]] == [2, 1]
    assert all(np.isfinite(r["snr"]) for r in rows)
    # the own-subject LUT is fitted in-sample: never worse than the LUT fitted on other subjects
    by = {(r["subject"], r["method"]): r for r in rows}
    assert all(by[(s.id, "OWN-LUT")]["mse"] <= by[(s.id, "LUT")]["mse"] + 1e-9 for s in phantom_subjects)
    assert "| **mean** |" in (tmp_path / "cv" / "cv.md").read_text()
    assert len(list((tmp_path / "cv").glob("worst_*_slices.png"))) == 2  # slices and error maps per fold
    assert len(list((tmp_path / "cv").glob("worst_*_errors.png"))) == 2
    card = cv.add_to_card(tmp_path / "cv" / report["folds"][0]["fold"] / "model", tmp_path / "cv" / "cv.json")
    recorded = json.loads(card.read_text())["cv"]
    assert recorded["summary"]["CAE"]["snr"] == report["summary"]["CAE"]["snr"]
    assert recorded["recipe"]["anchor"] == "lut" and [f["test"] for f in recorded["folds"]] == [
        [phantom_subjects[0].id], [phantom_subjects[1].id, phantom_subjects[2].id]]
    # run again: the fold models are reused, not retrained (same report, no training log)
    code, out, _ = _run_cv(flags, capsys)
    assert code == 0 and "steps/epoch" not in out
    # a changed recipe in the same folder is refused rather than mixed; through the script, as a user runs it
    changed = subprocess.run([sys.executable, str(REPO / "experiments" / "cv.py"), *flags, "--lr", "0.5"],
                             capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert changed.returncode == 2 and "another configuration (lr 0.001 -> 0.5)" in changed.stderr


def test_a_fold_another_live_process_trains_is_waited_for_and_a_dead_ones_lock_ignored(tmp_path):
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    threading.Thread(target=trainer.wait).start()  # reaps it when it ends (another CV process is not our child)
    (tmp_path / cv.TRAINING_LOCK).write_text(str(trainer.pid))
    told = []
    cv.wait_for_other_trainer(tmp_path, poll_seconds=0.05, log=told.append)
    assert trainer.poll() is not None  # returned only once the other process had ended
    assert told == [f"fold {tmp_path.name}: process {trainer.pid} is training it; waiting for its model"]
    told.clear()
    cv.wait_for_other_trainer(tmp_path, poll_seconds=0.05, log=told.append)  # its lock is stale now
    assert told == []


def test_train_folds_names_folds_by_name_or_number_and_lists_them_when_unknown():
    groups = [["sub-mni152"], ["sub-ms07", "sub-ms19"], ["sub-tcgadu7294", "sub-tcgafg6692"]]
    assert cv.select_folds(groups, ["3", "2-ms"]) == ["3-tcgadu-tcgafg", "2-ms"]
    with pytest.raises(ValueError, match="'4' is not a fold of these --groups; the folds: 1-mni, 2-ms, 3-tcgadu"):
        cv.select_folds(groups, ["4"])


def test_compare_puts_each_recipes_cae_beside_the_baselines(tmp_path):
    def report(name, cae):
        rows = [{"subject": s, "method": m, "snr": v} for s, lut_snr, c in zip(("sub-a", "sub-b"), (5.0, 7.0), cae)
                for m, v in (("CAE", c), ("LUT", lut_snr))]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"rows": rows}))
        return path

    table = cv.compare({"old": report("old", (4.0, 8.0)), "new": report("new", (6.0, 7.5))})
    lines = table.splitlines()
    assert lines[0] == "| subject | LUT | CAE old | CAE new |"
    assert lines[2] == "| sub-a | 5.00 | 4.00 | 6.00 |" and lines[4] == "| **mean** | **6.00** | **6.00** | **6.75** |"
    assert "CAE old: beats the global LUT on 1/2 subjects, margin min -1.00 dB, mean +0.00 dB." in table
    assert "CAE new: beats the global LUT on 2/2 subjects, margin min +0.50 dB, mean +0.75 dB." in table


def test_no_validation_subjects_trains_on_all_and_exports_the_last_state(phantom_subjects, tmp_path):
    train, val = split_subjects(phantom_subjects, 0)
    assert [s.id for s in train] == [s.id for s in phantom_subjects] and val == []
    config = PRESETS["smoke"].replace(variant="shallow", epochs=2, max_steps_per_epoch=1)
    result = Trainer(config, train, val, tmp_path, progress=False, log=lambda *a: None).fit()
    variables, meta = checkpoint.load_model(tmp_path)  # <workdir>/best: written every epoch, so the last one
    assert meta["epoch"] == 1 and meta["val_subjects"] == []
    for a, b in zip(jax.tree_util.tree_leaves(result["variables"]), jax.tree_util.tree_leaves(variables)):
        np.testing.assert_array_equal(a, b)
