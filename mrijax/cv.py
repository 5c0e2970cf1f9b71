"""Leave-one-source-out cross-validation: does a training recipe work on scanners it never saw?

Users always run a model on a new scanner, so a recipe is judged by training it on all sources but one and
testing on the held-out source, for every source in turn. Per test subject the report compares the CAE
with three intensity-only or example-based references fitted on the same training subjects: the global
look-up table (LUT), MIMECS, and the LUT fitted on the test subject itself (in-sample: the best any
intensity mapping can do). Subjects are grouped into sources by glob patterns of their ids (default: the
letters of the id, so both sessions of one person always share a fold).

Each fold's model is exported to `<out>/<fold>/model` and reused when the CV is run again (a stopped fold
resumes from its checkpoints); baseline predictions are cached under `--baseline-cache` (they do not depend
on the recipe), so comparing recipes costs only their training. An ensemble of recipes is judged from their
finished CVs without training: each fold averages the predictions of the CVs' models of that fold.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np

from mrijax import checkpoint, metrics, report
from mrijax.config import TrainConfig

BASELINES = ("lut", "own-lut", "mimecs")
METRICS = ("mae", "mse", "snr", "ssim")


def source_key(subject_id: str) -> str:
    """The default source of a subject: the letters of its id (sub-ms07 -> ms, sub-omslp01s2 -> omslp)."""
    match = re.match(r"(?:sub-)?([A-Za-z]+)", subject_id)
    return match.group(1) if match else subject_id


def source_groups(ids, patterns=None) -> list[list[str]]:
    """Test groups (folds) of subject ids: one per comma-separated glob list in `patterns` ("sub-tcga*,sub-gli*"),
    or by `source_key`. Every subject must fall in exactly one group."""
    ids = list(ids)
    if not patterns:
        keys = list(dict.fromkeys(source_key(i) for i in ids))
        return [[i for i in ids if source_key(i) == key] for key in keys]
    groups = [[i for i in ids if any(fnmatch.fnmatch(i, p) for p in pattern.split(",") if p)] for pattern in patterns]
    for pattern, group in zip(patterns, groups):
        if not group:
            raise ValueError(f"--groups {pattern!r} matches no subject; available: {', '.join(ids)}")
    counts = {i: sum(i in g for g in groups) for i in ids}
    unplaced = [i for i, n in counts.items() if n != 1]
    if unplaced:
        raise ValueError(f"subject(s) {', '.join(unplaced)} fall in {'no' if not counts[unplaced[0]] else 'several'} "
                         "--groups pattern(s); every subject must match exactly one group")
    return groups


def fold_name(index: int, group: list[str]) -> str:
    keys = list(dict.fromkeys(source_key(i) for i in group))
    return f"{index + 1}-" + ("-".join(keys) if len(keys) < 4 else f"{keys[0]}-and-{len(keys) - 1}-more")


def _cache_key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def baseline_prediction(name: str, train, subject, cache_dir: Path | None) -> tuple[np.ndarray, float]:
    """(prediction, seconds) of one baseline for one test subject. MIMECS (minutes per volume, and independent of
    the recipe) is cached on disk by (method, data) when asked; a LUT is refitted (a fraction of a second)."""
    from mrijax import methods

    fit_on = [subject] if name == "own-lut" else train
    path = None
    if cache_dir is not None and name == "mimecs":
        files = lambda s: str({k: s.paths[k] for k in ("source", "target", "mask")})  # what MIMECS reads
        key = _cache_key(name, subject.id, files(subject), [(s.id, files(s)) for s in fit_on])
        path = Path(cache_dir) / f"{subject.id}_{name}_{key}.npz"
        if path.is_file():
            with np.load(path) as cached:
                return cached["prediction"].astype(np.float32), float(cached["seconds"])
    method = methods.mimecs_method(fit_on) if name == "mimecs" else methods.lut_method(fit_on)
    prediction, seconds = methods.timed_predict(method, subject.source, subject.mask)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, prediction=prediction.astype(np.float16), seconds=seconds)
    return prediction, seconds


def train_fold(config: TrainConfig, train, fold_dir: Path, progress: bool = False, log=print,
               group=None) -> tuple[dict, float]:
    """The fold's model (variables) and its training seconds: trained on `train` with no validation subjects
    (the test source must not pick the model), so the last state is exported. Reused when already exported.
    With `group` (`--workers`), this process is one of the workers training it; worker 0 writes the files."""
    from mrijax import trainer

    model_dir = fold_dir / "model"
    wait_for_other_trainer(fold_dir, log=log)
    exported = (model_dir / "model.json").is_file()
    if group:  # all workers decide alike (the lock is written after this, by worker 0, so no worker waits for it)
        exported = group.any(exported)
    if exported:
        variables, meta = checkpoint.load_model(model_dir)
        stored = {k: meta[k] for k in ("config", "train_subjects", "val_subjects") if k in meta}
        trainer.check_resume(stored, trainer.run_identity(config, train, []), model_dir, "--out")
        return variables, float(meta.get("train_seconds", math.nan))
    writer = group is None or group.index == 0
    lock = fold_dir / TRAINING_LOCK
    if writer:
        fold_dir.mkdir(parents=True, exist_ok=True)
        lock.write_text(str(os.getpid()))
    try:
        t0 = time.perf_counter()
        run = trainer.Trainer(config, train, [], fold_dir / "run", progress=progress, log=log, group=group)
        result = run.fit(resume=True)  # a stopped fold continues; an empty folder starts
        seconds = time.perf_counter() - t0
        if writer:
            meta = run.model_meta(result["history"][-1] if result["history"] else {"epoch": -1})
            checkpoint.export_model(model_dir, result["variables"], {**meta, "train_seconds": seconds})
    finally:
        if writer:
            lock.unlink(missing_ok=True)
    return result["variables"], seconds


TRAINING_LOCK = "training.pid"  # the id of the process training a fold (`--train-folds` in another process)


def wait_for_other_trainer(fold_dir: Path, poll_seconds: float = 30.0, log=print) -> None:
    """Wait while another live process trains this fold (its id in TRAINING_LOCK), so two processes sharing a
    CV's --out folder never train one fold twice; a lock left by a process that died is ignored (the fold resumes)."""
    lock = Path(fold_dir) / TRAINING_LOCK
    told = False
    while lock.is_file():
        try:
            pid = int(lock.read_text().strip())
        except (OSError, ValueError):
            return
        if pid == os.getpid() or not _alive(pid):
            return
        if not told:
            log(f"fold {Path(fold_dir).name}: process {pid} is training it; waiting for its model")
            told = True
        time.sleep(poll_seconds)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True


def _scores(prediction, subject) -> dict:
    values = metrics.evaluate(prediction, subject.target, subject.mask)
    return {k: float(values[k]) for k in METRICS}


def check_no_leak(config: TrainConfig, groups) -> None:
    """A warm start (`init_from`) must not have been trained on a subject the CV holds out."""
    if not config.init_from:
        return
    seen = set(checkpoint.read_card(config.init_from).get("train_subjects", []))
    held = [i for group in groups for i in group if i in seen]
    if held:
        raise ValueError(f"--init-from {config.init_from} was trained on {', '.join(held)}, which the CV holds out: "
                         "its scores would not be held-out; start from a model trained without them")


def run_cv(subjects, groups, config: TrainConfig, out, *, warm_start=None, progress: bool = False, log=print,
           **scoring) -> dict:
    """Train one model per fold and score every held-out subject; returns {"rows", "summary", "folds"}.

    `warm_start`: the folder of an earlier CV over the same folds; each fold then continues from that CV's
    model of the same fold (`init_from`), so a recipe can be trained further without leaking a held-out source.
    `scoring`: the keyword arguments of `score_folds` (baselines, baseline_cache, flip, compute_dtype).
    """
    check_no_leak(config, groups)
    fold_model = _fold_trainer(config, Path(out), warm_start, progress, log)
    return score_folds(subjects, groups, fold_model, config.to_dict(), out, log=log, **scoring)


def _fold_trainer(config: TrainConfig, out: Path, warm_start, progress: bool, log, group=None):
    def fold_model(name, train):
        fold_config = config.replace(init_from=str(Path(warm_start) / name / "model")) if warm_start else config
        return train_fold(fold_config, train, out / name, progress=progress, log=log, group=group)
    return fold_model


def select_folds(groups, wanted) -> list[str]:
    """Fold names for `wanted` (names such as '3-omslp' or 1-based numbers), or a one-line error listing them."""
    names = [fold_name(i, g) for i, g in enumerate(groups)]
    chosen = []
    for item in wanted:
        match = [n for i, n in enumerate(names) if item in (n, str(i + 1))]
        if not match:
            raise ValueError(f"--train-folds {item!r} is not a fold of these --groups; the folds: {', '.join(names)}")
        chosen += match
    return chosen


def train_folds(subjects, groups, config: TrainConfig, out, names, *, warm_start=None, progress: bool = False,
                log=print, group=None) -> None:
    """Train (and export) only the named folds' models, no scoring: part of a CV for a second process, or as one
    worker of `group` (`--workers`)."""
    check_no_leak(config, groups)
    fold_model = _fold_trainer(config, Path(out), warm_start, progress, log, group)
    for name, _, train in _folds(subjects, groups, log, only=names):
        fold_model(name, train)


def _folds(subjects, groups, log, only=None):
    """(fold name, held-out ids, training subjects) per fold (those named in `only`, if given), each announced."""
    for index, group in enumerate(groups):
        name = fold_name(index, group)
        if only is None or name in only:
            train = [s for s in subjects if s.id not in group]
            log(f"fold {name}: train on {len(train)} subjects, test on {', '.join(group)}")
            yield name, group, train


def report_json(cv_dir) -> Path:
    """The report (cv.json) of a finished CV's --out folder, or a one-line error naming the folder."""
    path = Path(cv_dir) / "cv.json"
    if not path.is_file():
        raise ValueError(f"{cv_dir}: no cv.json; pass the --out folder of a finished `mrijax cv` run")
    return path


def ensemble_recipe(cv_dirs, groups=None) -> dict:
    """The recipe of an ensemble of finished CVs (their `--out` folders): each one's recipe, checked to share the
    contrasts and (given `groups`) to hold a model for every fold of `groups`."""
    if len(cv_dirs) < 2:
        raise ValueError(f"an ensemble needs two or more CV folders, got {len(cv_dirs)}")
    recipes = []
    for cv_dir in map(Path, cv_dirs):
        stored = json.loads(report_json(cv_dir).read_text())
        if groups is not None and [f["test"] for f in stored["folds"]] != groups:
            raise ValueError(f"{cv_dir}: its folds hold out {[f['test'] for f in stored['folds']]}, not {groups}; "
                             "pass the same --data and --groups as that CV")
        missing = [f for f in (fold_name(i, g) for i, g in enumerate(groups or []))
                   if not (cv_dir / f / "model" / "model.json").is_file()]
        if missing:
            raise ValueError(f"{cv_dir / missing[0] / 'model'}: no fold model; rerun that CV to restore it")
        recipe = stored["config"]
        if "members" in recipe:
            raise ValueError(f"{cv_dir} is an ensemble's CV; pass the CV folders of its members instead")
        pair = (recipe["source"], recipe["target"])
        if recipes and pair != (recipes[0]["source"], recipes[0]["target"]):
            raise ValueError(f"{cv_dir}: its recipe maps {recipe['source']}->{recipe['target']}, the first "
                             f"{recipes[0]['source']}->{recipes[0]['target']}; ensemble models of one contrast pair")
        recipes.append(recipe)
    return {"members": recipes, "cv": [str(d) for d in cv_dirs]}


def run_ensemble_cv(subjects, groups, recipe: dict, out, *, log=print, **scoring) -> dict:
    """Score an ensemble of finished CVs (`recipe`: `ensemble_recipe(cv_dirs, groups)`) on the same folds, without
    training: each held-out subject's prediction is the mean of the CVs' fold models' predictions."""

    def fold_model(name, train):
        loaded = [checkpoint.load_model(Path(d) / name / "model") for d in recipe["cv"]]
        return [v for v, _ in loaded], sum(float(meta.get("train_seconds", math.nan)) for _, meta in loaded)

    return score_folds(subjects, groups, fold_model, recipe, out, log=log, **scoring)


def score_folds(subjects, groups, fold_model, recipe: dict, out, *, baselines=BASELINES, baseline_cache=None,
                flip: bool = False, compute_dtype: str = "float32", log=print) -> dict:
    """Score every held-out subject of every fold with the fold's model (`fold_model(name, train)` -> (variables,
    training seconds)) and the baselines; write the report (with `recipe`) and the worst subject's figures."""
    from mrijax import inference, plotting

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    by_id = {s.id: s for s in subjects}
    rows, folds = [], []
    for name, group, train in _folds(subjects, groups, log):
        test = [by_id[i] for i in group]
        variables, train_seconds = fold_model(name, train)
        folds.append({"fold": name, "test": group, "train": [s.id for s in train], "train_seconds": train_seconds})
        worst = None
        for subject in test:
            t0 = time.perf_counter()
            prediction = inference.synthesize_normalised(variables, subject.inputs, subject.mask, flip=flip,
                                                         compute_dtype=compute_dtype)
            images = {"source": subject.source, "truth": subject.target, "CAE": prediction}
            fold_rows = [{"fold": name, "subject": subject.id, "method": "CAE", **_scores(prediction, subject),
                          "seconds": time.perf_counter() - t0}]
            for baseline in baselines:
                prediction_b, seconds = baseline_prediction(baseline, train, subject, baseline_cache)
                images[baseline.upper()] = prediction_b
                fold_rows.append({"fold": name, "subject": subject.id, "method": baseline.upper(),
                                  **_scores(prediction_b, subject), "seconds": seconds})
            for row in fold_rows:
                log(f"  {row['subject']:>16} {row['method']:>8}  " +
                    "  ".join(f"{k} {row[k]:.4g}" for k in METRICS) + f"  {row['seconds']:.1f}s")
            rows += fold_rows
            margin = fold_rows[0]["snr"] - next((r["snr"] for r in fold_rows if r["method"] == "LUT"), math.nan)
            if worst is None or margin < worst[0]:
                worst = (margin, subject, images)
        if worst is not None:
            _, subject, images = worst
            shown = {k: v for k, v in images.items() if k != "OWN-LUT"}
            plotting.plot_comparison(shown, subject.mask, out / f"worst_{name}_{subject.id}_slices.png")
            plotting.plot_comparison({k: v for k, v in shown.items() if k != "source"}, subject.mask,
                                     out / f"worst_{name}_{subject.id}_errors.png", error_of="truth")
    summary = summarise(rows)
    write(out, rows, summary, folds, recipe, flip)
    return {"rows": rows, "summary": summary, "folds": folds}


def summarise(rows) -> dict:
    """Mean of each metric per method, and the CAE's SNR margin over each baseline per subject (min and mean)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    summary = {m: {k: float(np.mean([r[k] for r in rows if r["method"] == m])) for k in (*METRICS, "seconds")}
               for m in methods}
    cae = {r["subject"]: r["snr"] for r in rows if r["method"] == "CAE"}
    for m in methods:
        if m == "CAE":
            continue
        margins = [cae[r["subject"]] - r["snr"] for r in rows if r["method"] == m and r["subject"] in cae]
        summary[m]["cae_snr_margin_min"] = float(min(margins))
        summary[m]["cae_snr_margin_mean"] = float(np.mean(margins))
        summary[m]["cae_wins"] = f"{sum(x > 0 for x in margins)}/{len(margins)}"
    return summary


def _markdown(rows, summary, folds, recipe: dict, flip) -> str:
    methods = list(summary)
    subjects = list(dict.fromkeys(r["subject"] for r in rows))
    row_of = {(r["subject"], r["method"]): r for r in rows}
    lines = [f"Leave-one-source-out CV, recipe: {json.dumps(recipe)}; test-time flip: {flip}.",
             "SNR (dB) on brain voxels per held-out subject (MAE / MSE / SSIM in report.csv); SSIM: the paper's "
             "(data range 1, 7^3 window, brain bounding box).", "",
             "| fold | subject | " + " | ".join(methods) + " | CAE - LUT |",
             "|---|---|" + "---|" * (len(methods) + 1)]
    for s in subjects:
        fold = row_of[(s, "CAE")]["fold"]
        cells = [f"{row_of[(s, m)]['snr']:.2f}" if (s, m) in row_of else "" for m in methods]
        delta = row_of[(s, "CAE")]["snr"] - row_of[(s, "LUT")]["snr"] if (s, "LUT") in row_of else math.nan
        lines.append(f"| {fold} | {s} | " + " | ".join(cells) + f" | {delta:+.2f} |")
    lines.append("| **mean** | | " + " | ".join(f"**{summary[m]['snr']:.2f}**" for m in methods) + " | |")
    lines += ["", "| method | MAE | MSE | SNR | SSIM | seconds per volume | CAE SNR margin: min / mean | CAE wins |",
              "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        row = summary[m]
        margin = (f"{row['cae_snr_margin_min']:+.2f} / {row['cae_snr_margin_mean']:+.2f}"
                  if "cae_snr_margin_min" in row else "")
        lines.append(f"| {m} | {row['mae']:.4f} | {row['mse']:.5f} | {row['snr']:.2f} | {row['ssim']:.3f} | "
                     f"{row['seconds']:.1f} | {margin} | {row.get('cae_wins', '')} |")
    lines += ["", "Training seconds per fold: " + ", ".join(f"{f['fold']} {f['train_seconds']:.0f}" for f in folds)]
    return "\n".join(lines) + "\n"


def write(out, rows, summary, folds, recipe: dict, flip) -> dict:
    """The report; `recipe`: a TrainConfig's dict, or an ensemble's (`ensemble_recipe`)."""
    return report.write_report(out, rows, _markdown(rows, summary, folds, recipe, flip),
                               {"config": recipe, "flip": flip, "folds": folds, "summary": summary},
                               name="cv")



def card_entry(report_json) -> dict:
    """What a model card (`model.json`) records of its recipe's cross-validation: per-method means, the CAE's
    margins over each baseline, the folds and where the full report is."""
    stored = json.loads(Path(report_json).read_text())
    return {"report": str(report_json), "flip": stored["flip"], "summary": stored["summary"],
            "folds": [{"fold": f["fold"], "test": f["test"]} for f in stored["folds"]],
            "recipe": stored["config"]}


def add_to_card(model_dir, report_json) -> Path:
    """Record a cross-validation report in a model's card (model.json) under "cv"."""
    card = Path(model_dir) / "model.json"
    meta = json.loads(card.read_text())
    meta["cv"] = card_entry(report_json)
    card.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return card


def compare(reports: dict) -> str:
    """One Markdown table of SNR per held-out subject across several CV reports ({label: cv.json path}): the
    baselines once (from the first report that has them), then the CAE of each recipe, and the means."""
    loaded = {label: json.loads(Path(path).read_text()) for label, path in reports.items()}
    subjects = list(dict.fromkeys(r["subject"] for stored in loaded.values() for r in stored["rows"]))
    columns = {}  # column name -> {subject: SNR}; a baseline's value comes from the first report holding it
    for label, stored in loaded.items():
        for row in stored["rows"]:
            name = f"CAE {label}" if row["method"] == "CAE" else row["method"]
            columns.setdefault(name, {}).setdefault(row["subject"], row["snr"])
    names = [n for n in columns if not n.startswith("CAE")] + [n for n in columns if n.startswith("CAE")]
    lines = ["| subject | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for s in subjects:
        lines.append(f"| {s} | " + " | ".join(f"{columns[n][s]:.2f}" if s in columns[n] else "" for n in names) + " |")
    means = [np.mean(list(columns[n].values())) if len(columns[n]) == len(subjects) else math.nan for n in names]
    lines.append("| **mean** | " + " | ".join(f"**{m:.2f}**" for m in means) + " |")
    if "LUT" in columns:
        for n in names:
            if n.startswith("CAE") and len(columns[n]) == len(subjects):
                margins = [columns[n][s] - columns["LUT"][s] for s in subjects]
                lines.append(f"\n{n}: beats the global LUT on {sum(m > 0 for m in margins)}/{len(margins)} subjects, "
                             f"margin min {min(margins):+.2f} dB, mean {np.mean(margins):+.2f} dB.")
    return "\n".join(lines) + "\n"
