"""Ensembles: several trained models whose predictions are averaged, as a model folder (`mrijax ensemble`) and as a
recipe judged by the cross-validation (`mrijax cv --ensemble`)."""
import json

import numpy as np
import pytest

import mrijax
from mrijax import checkpoint, cv, data, inference, metrics, methods, models
from mrijax.config import PRESETS
from mrijax.trainer import Trainer


@pytest.fixture(scope="module")
def phantom_subjects(tmp_path_factory):
    root = data.make_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_subjects=3, seed=11, resolution=4)
    return data.load_subjects(root)


def _export(directory, seed, **card):
    """A shallow model (quick to compile) with its own initial weights (the averaging does not depend on training)."""
    meta = {"source": "T1w", "target": "T2w", "train_subjects": ["sub-a", "sub-b"], "val_subjects": [],
            "config": {"seed": seed}, **card}
    return checkpoint.export_model(directory, models.init_variables("shallow", seed=seed), meta)


def test_an_ensemble_folder_loads_as_its_members_and_synthesizes_their_mean(phantom_subjects, tmp_path):
    members = [_export(tmp_path / f"m{seed}", seed) for seed in (1, 2, 3)]
    ensemble = checkpoint.export_ensemble(tmp_path / "ens", members, {"command": "test"})
    variables, meta = checkpoint.load_model(ensemble)
    assert len(variables) == 3 and meta["members"] == ["members/1", "members/2", "members/3"]
    assert (meta["variant"], meta["source"], meta["train_subjects"]) == ("shallow", "T1w", ["sub-a", "sub-b"])
    assert [checkpoint.read_card(ensemble / m)["config"]["seed"] for m in meta["members"]] == [1, 2, 3]
    subject = phantom_subjects[0]
    slab = np.s_[:, :, subject.mask.shape[2] // 2 - 8:subject.mask.shape[2] // 2 + 8]
    source, mask = subject.inputs[slab], subject.mask[slab]
    singles = [inference.synthesize_normalised(checkpoint.load_model(m)[0], source, mask) for m in members]
    mean = inference.synthesize_normalised(variables, source, mask)
    np.testing.assert_allclose(mean, np.mean(singles, axis=0), atol=1e-6)
    assert min(np.abs(a - b).max() for a, b in zip(singles, singles[1:])) > 1e-3  # the members differ
    method = methods.CAEMethod(str(ensemble))
    assert method.name == "CAE-shallowx3"
    np.testing.assert_array_equal(method.predict(source, mask), mean)


def test_an_ensemble_refuses_members_of_other_data_an_existing_folder_and_serving_as_a_warm_start(
        phantom_subjects, tmp_path):
    a, b = _export(tmp_path / "a", 1), _export(tmp_path / "b", 2)
    other = _export(tmp_path / "other", 3, train_subjects=["sub-a", "sub-c"])
    with pytest.raises(ValueError, match="other: its train_subjects .* differs from"):
        checkpoint.export_ensemble(tmp_path / "mixed", [a, other])
    assert not (tmp_path / "mixed").exists()
    with pytest.raises(ValueError, match="two or more"):
        checkpoint.export_ensemble(tmp_path / "one", [a])
    ensemble = checkpoint.export_ensemble(tmp_path / "ens", [a, b])
    with pytest.raises(FileExistsError, match="exists; choose a new output folder"):
        checkpoint.export_ensemble(ensemble, [a, b])
    with pytest.raises(ValueError, match="is an ensemble itself"):
        checkpoint.export_ensemble(tmp_path / "nested", [ensemble, a])
    with pytest.raises(ValueError, match="is an ensemble of 2 models; start from one of them"):
        Trainer(PRESETS["smoke"].replace(variant="shallow", init_from=str(ensemble)), phantom_subjects, [],
                tmp_path / "warm", progress=False).new_state()


def _fake_cv(out, groups, seed):
    """A finished CV's folder: one exported model per fold and its cv.json (what `mrijax cv --ensemble` reads)."""
    folds = []
    for index, group in enumerate(groups):
        name = cv.fold_name(index, group)
        _export(out / name / "model", seed + index, train_seconds=10.0)
        folds.append({"fold": name, "test": group})
    config = PRESETS["smoke"].replace(variant="shallow", seed=seed).to_dict()
    (out / "cv.json").write_text(json.dumps({"config": config, "folds": folds, "rows": []}))
    return out


@pytest.fixture(scope="module")
def ensemble_cv(phantom_subjects, tmp_path_factory):
    """Two member CVs and the ensemble CV of them: (groups, member folders, the ensemble CV's folder, its result)."""
    root = tmp_path_factory.mktemp("cv")
    groups = [[phantom_subjects[0].id], [phantom_subjects[1].id, phantom_subjects[2].id]]
    members = [_fake_cv(root / f"cv{seed}", groups, seed) for seed in (0, 5)]
    result = cv.run_ensemble_cv(phantom_subjects, groups, cv.ensemble_recipe(members, groups), root / "ens",
                                baselines=("lut",))
    return groups, members, root / "ens", result


def test_ensemble_cv_scores_the_mean_of_the_member_cvs_fold_models(phantom_subjects, ensemble_cv):
    groups, members, out, result = ensemble_cv
    rows = {(r["subject"], r["method"]): r for r in result["rows"]}
    for index, group in enumerate(groups):
        name = cv.fold_name(index, group)
        fold_variables = [checkpoint.load_model(m / name / "model")[0] for m in members]
        for subject in (s for s in phantom_subjects if s.id in group):
            singles = [inference.synthesize_normalised(v, subject.inputs, subject.mask) for v in fold_variables]
            expected = metrics.snr(np.mean(singles, axis=0), subject.target, subject.mask)
            assert rows[(subject.id, "CAE")]["snr"] == pytest.approx(expected, abs=1e-4)
            assert rows[(subject.id, "CAE")]["snr"] != pytest.approx(metrics.snr(singles[0], subject.target,
                                                                                 subject.mask), abs=1e-3)
    report = json.loads((out / "cv.json").read_text())
    assert [r["seed"] for r in report["config"]["members"]] == [0, 5]
    assert [f["train_seconds"] for f in report["folds"]] == [20.0, 20.0]  # both members' training
    assert set(report["summary"]) == {"CAE", "LUT"}


def test_ensemble_cv_refuses_unfinished_or_mismatched_member_cvs(phantom_subjects, tmp_path):
    groups = [[phantom_subjects[0].id], [phantom_subjects[1].id, phantom_subjects[2].id]]
    good = _fake_cv(tmp_path / "good", groups, 0)
    other_folds = _fake_cv(tmp_path / "other", [groups[1], groups[0]], 1)
    with pytest.raises(ValueError, match="other: its folds hold out .* pass the same --data and --groups"):
        cv.ensemble_recipe([good, other_folds], groups)
    unfinished = _fake_cv(tmp_path / "unfinished", groups, 2)
    fold = cv.fold_name(1, groups[1])
    (unfinished / fold / "model" / "model.json").unlink()
    with pytest.raises(ValueError, match=f"unfinished/{fold}/model: no fold model"):
        cv.ensemble_recipe([good, unfinished], groups)
    with pytest.raises(ValueError, match="no cv.json"):
        cv.ensemble_recipe([good, tmp_path / "absent"], groups)
    with pytest.raises(ValueError, match="two or more"):
        cv.ensemble_recipe([good], groups)


def test_ensemble_command_writes_a_model_with_its_cv_and_refuses_training_flags_in_cv(phantom_subjects, ensemble_cv,
                                                                                       tmp_path):
    from mrijax.cli import cv as cv_cli, ensemble as ensemble_cli, infer as infer_cli

    _, members, cv_out, _ = ensemble_cv
    a, b = _export(tmp_path / "a", 1), _export(tmp_path / "b", 2)
    with pytest.raises(ValueError, match="absent: no cv.json"):
        ensemble_cli.main([str(a), str(b), "-o", str(tmp_path / "never"), "--cv", str(tmp_path / "absent")])
    assert not (tmp_path / "never").exists()
    assert ensemble_cli.main([str(a), str(b), "-o", str(tmp_path / "ens"), "--cv", str(cv_out)]) == 0
    card = checkpoint.read_card(tmp_path / "ens")
    assert card["cv"]["recipe"]["members"][1]["seed"] == 5 and card["command"].startswith("mrijax ensemble ")
    with pytest.raises(ValueError, match="--ensemble trains nothing, so --lr does not apply"):
        cv_cli.main(["--ensemble", str(members[0]), str(members[1]), "--lr", "0.1", "--out", str(tmp_path / "x")])
    source = str(phantom_subjects[0].paths["source"])
    assert infer_cli.main(["-i", source, "-o", str(tmp_path / "synth.nii.gz"), "--checkpoint", str(tmp_path / "ens"),
                           "--no-tta"]) == 0
    written = data.load_volume(tmp_path / "synth.nii.gz").data
    expected = mrijax.synthesize(checkpoint.load_model(tmp_path / "ens")[0], data.load_volume(source).data)
    np.testing.assert_allclose(written, expected, atol=1e-5)
