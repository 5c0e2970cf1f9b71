"""Studies: every study runs end to end at --preset smoke on a tiny phantom; outputs exist and agree.

All studies share one results folder, so `base` is trained once (as it would be for a user). Ten distinct
models must be compiled and trained, so runs are cut to one epoch of one step and use the reference
convolution (`impl="xla"`, the fastest to compile); compilation dominates the file's time.
"""
import csv
import importlib.util
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import mrijax
from mrijax import data, metrics, studies
from mrijax.baselines.lut import apply_lut, fit_lut
from mrijax.config import PRESETS

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 1
OVERRIDES = {"impl": "xla", "max_steps_per_epoch": 1}  # as the CLI flags below; smoke keeps 2 val batches


def _load_cli():
    spec = importlib.util.spec_from_file_location("study_cli", REPO / "experiments" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    # 6 mm: 33x39x32 volumes (2-4 blocks of 16^3 per subject, 14-16 at the few-subject run's step 8), so the
    # whole-volume synthesis of the validation subject that every model's record holds takes half its 4 mm time
    return data.make_phantom_dataset(tmp_path_factory.mktemp("phantom6"), n_subjects=3, seed=7, resolution=6)


@pytest.fixture(scope="module")
def results(phantom_root, tmp_path_factory):
    """Every study into one folder: width through the CLI (in-process), the others through run_study."""
    out = tmp_path_factory.mktemp("studies")
    cli = _load_cli()
    cli.main(["--study", "width", "--preset", "smoke", "--data", str(phantom_root), "--out", str(out),
              "--epochs", str(EPOCHS), "--impl", "xla", "--max-steps-per-epoch", "1"])
    subjects = data.load_subjects(phantom_root)
    logs = []
    found = {"width": json.loads((out / "width.json").read_text())}
    for name in studies.STUDY_NAMES[1:]:
        found[name] = studies.run_study(name, "smoke", subjects, 1, out, EPOCHS, overrides=OVERRIDES,
                                        log=logs.append)
    return out, found, subjects, logs


@pytest.mark.parametrize("name", studies.STUDY_NAMES)
def test_study_outputs_are_complete_and_consistent(results, name):
    out, found, subjects, _ = results
    for suffix in ("png", "md", "csv", "json"):
        assert (out / f"{name}.{suffix}").stat().st_size > 0
    doc = json.loads((out / f"{name}.json").read_text())
    study = studies.STUDIES[name]
    assert [r["label"] for r in doc["runs"]] == [run.label for run in study.runs]  # one curve per model
    assert doc["val_subjects"] == [subjects[-1].id]
    with open(out / f"{name}.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == [run.label for run in study.runs]
    markdown = (out / f"{name}.md").read_text()
    for run, record, row in zip(study.runs, doc["runs"], rows):
        config = studies.run_config(run, "smoke", EPOCHS, **OVERRIDES)
        assert record["identity"]["config"] == json.loads(json.dumps(config.to_dict()))
        assert [h["epoch"] for h in record["history"]] == list(range(EPOCHS))
        losses = [h[k] for h in record["history"] for k in ("train_mse", "val_mse")]
        assert all(math.isfinite(x) and x > 0 for x in losses)
        assert record["final_val_mse"] == record["history"][-1]["val_mse"]
        assert record["best_val_mse"] == min(h["val_mse"] for h in record["history"])
        assert record["params"] == mrijax.count_params(mrijax.init_variables(config.variant)["params"])
        assert int(row["params"]) == record["params"]
        synth = record["synthesis"][subjects[-1].id]
        assert all(math.isfinite(synth[k]) for k in ("mae", "mse", "snr"))
        assert float(row["mse"]) == pytest.approx(synth["mse"])
        assert f"| {run.label} |" in markdown
        # the run's own training folder holds the same curve
        lines = (out / run.label / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["val_mse"] for line in lines] == [h["val_mse"] for h in record["history"]]
    # the LUT reference: fitted on the training subjects, scored on the same validation subject as the CAEs
    train, (val,) = subjects[:-1], subjects[-1:]
    lut = fit_lut([s.source for s in train], [s.target for s in train], [s.mask for s in train])
    expected = metrics.mse(apply_lut(lut, val.source, val.mask), val.target, val.mask)
    assert doc["reference"]["LUT"][val.id]["mse"] == pytest.approx(expected, rel=1e-6)
    assert "| LUT (reference) |" in markdown


def test_runs_differ_as_the_studies_say(results):
    _, found, subjects, _ = results
    by = {name: {r["label"]: r for r in doc["runs"]} for name, doc in found.items()}
    assert [by["width"][k]["variant"] for k in ("narrow", "base", "wide")] == ["narrow", "base", "wide"]
    assert by["width"]["base"]["params"] == 168_289 and by["width"]["wide"]["params"] == 376_849
    assert by["depth"]["deep"]["params"] == 251_521
    reg = by["regularisation"]
    assert reg["dropout"]["identity"]["config"]["dropout"] == 0.1
    assert reg["l2"]["identity"]["config"]["weight_decay"] == 1e-4
    # dataset: the few-subject run trains on fewer subjects with the patch step halved
    few, full = by["dataset"]["few"], by["dataset"]["base"]
    assert len(few["train_subjects"]) == 1 < len(full["train_subjects"]) == len(subjects) - 1
    assert few["identity"]["config"]["patch_step"] == PRESETS["smoke"].step // 2
    counts = data.patch_counts(subjects, PRESETS["smoke"].step // 2)
    assert few["train_blocks"] == counts[few["train_subjects"][0]]


def test_base_is_trained_once_and_reused_across_studies(results):
    out, found, _, logs = results
    bases = [r for doc in found.values() for r in doc["runs"] if r["label"] == "base"]
    assert len(bases) == len(studies.STUDY_NAMES)  # every study compares against base
    assert [r["reused"] for r in bases] == [False] + [True] * (len(bases) - 1)  # trained by the first (width)
    assert sum(line.startswith("base: reusing") for line in logs) == len(bases) - 1
    assert len({json.dumps(r["history"]) for r in bases}) == 1


def test_subject_source_is_a_fixed_point_of_the_normalisation(results):
    """Subject.source is normalised already (the studies synthesize from it without normalising again), so
    `synthesize`, which normalises its input, gives a user the same on it."""
    _, _, subjects, _ = results
    s = subjects[-1]
    np.testing.assert_allclose(data.normalise(s.source, s.mask), s.source, rtol=1e-5, atol=1e-7)


def test_a_folder_holding_another_configuration_is_refused(results, tmp_path):
    out, _, subjects, _ = results
    with pytest.raises(ValueError, match="another configuration"):
        studies.run_study("width", "smoke", subjects, 1, out, EPOCHS, overrides={**OVERRIDES, "lr": 0.5},
                          log=lambda *a: None)


def test_a_folder_trained_on_another_data_folder_is_refused(results, phantom_root, tmp_path):
    """The same subjects copied elsewhere are another --data: refused by the trainer's resume check, before any
    training, with the folder named once and the way out."""
    out, _, _, _ = results
    moved = shutil.copytree(phantom_root, tmp_path / "moved")
    expected = (f"{out / 'narrow'} holds a run trained with another data folder ({phantom_root.resolve()}; now "
                f"{moved.resolve()}); use the same flags or a new --out")
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        studies.run_study("width", "smoke", data.load_subjects(moved), 1, out, EPOCHS, overrides=OVERRIDES,
                          log=lambda *a: None)


def test_bad_flags_give_one_line_errors():
    from mrijax.cli import flags, study as cli  # the wrapper script only runs it

    with pytest.raises(SystemExit):
        cli.parse_args(["--study", "colour"])
    with pytest.raises(ValueError, match="^--epochs must be >= 1, got 0$"):  # `cli.run` prints it as one line
        flags.config_overrides(cli.parse_args(["--study", "width", "--epochs", "0"]))
    with pytest.raises(ValueError, match="unknown study"):
        studies.get_study("colour")
