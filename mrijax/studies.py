"""The paper's controlled studies as data: which models are compared, how each is trained, what the paper said.

A `Study` is a name, a tuple of `Run`s (a label plus `TrainConfig` overrides on top of a preset) and a note
on what the paper reported. `run_study` trains every run with the one `Trainer`, then writes the paper's
kind of figure (train and validation MSE per epoch for all compared models, Figs. 9-11, 14) and a table
(final MSEs, parameter counts, seconds per epoch, whole-volume synthesis metrics on the validation
subjects) as markdown, CSV and JSON.

Runs are stored by label in `out_dir/<label>/`, with a `run.json` that records exactly what was trained
(configuration, subject ids and a data fingerprint). A later study that asks for an identical run reuses
it, so `base`, shared by every study, is trained once per `out_dir`; a run with more epochs than stored
resumes the stored one; anything else in that folder is refused rather than mixed up (`check_resume`, the
trainer's own check: configuration, data folder, subjects, and here the data fingerprints too).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mrijax import checkpoint, metrics, models, plotting, report
from mrijax.config import PRESETS, TrainConfig
from mrijax.inference import synthesize_normalised
from mrijax.trainer import Trainer, check_resume, run_identity, split_subjects


@dataclasses.dataclass(frozen=True)
class Run:
    """One trained model of a study: `overrides` change fields of the preset's TrainConfig.

    `train_fraction` keeps that share of the training subjects (at least one); `step_divisor` divides the
    patch grid step, multiplying the blocks per subject by its cube (the paper's dataset-size study halves
    the step for the few-subject run so that patch counts stay comparable).
    """

    label: str
    overrides: tuple[tuple[str, Any], ...] = ()  # (TrainConfig field, value) pairs
    note: str = ""
    train_fraction: float | None = None
    step_divisor: int = 1


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    runs: tuple[Run, ...]
    question: str
    paper: str  # what the paper reported, and where


# The paper's loss-curve figures for these studies are Figs. 9-11 and 14 (Secs. 3.4, 3.5, 4); their outcomes
# are not transcribed into mrijax: compare the measured curves with the paper itself, and say where they differ.
UNTRANSCRIBED = "Outcome: see the paper's loss curves (Figs. 9-11, 14); not transcribed here."
BASE = Run("base", note="paper's reference model: 32 filters, convs 3/3/2")

STUDIES: dict[str, Study] = {
    "width": Study(
        "width",
        (Run("narrow", (("variant", "narrow"),), "16 filters"), BASE,
         Run("wide", (("variant", "wide"),), "48 filters")),
        "Does a wider network (more filters per convolution) learn a better T1->T2 mapping?",
        "narrow (16) / base (32) / wide (48) filters, same layers; the paper reports 168,289 (base) and 376,849 "
        "(wide) trainable parameters. " + UNTRANSCRIBED),
    "depth": Study(
        "depth",
        (Run("shallow", (("variant", "shallow"),), "convs 2/2/1"), BASE,
         Run("deep", (("variant", "deep"),), "convs 4/4/3")),
        "Do more convolutions (a larger receptive field) help?",
        "shallow (2/2/1) / base (3/3/2) / deep (4/4/3) convolutions before pooling / between / after "
        "upsampling; the paper reports 251,521 trainable parameters (deep). " + UNTRANSCRIBED),
    "architecture": Study(
        "architecture",
        (BASE, Run("progressive", (("variant", "progressive"),),
                   "three single-axis pools (Fig. 12)"),
         Run("residual", (("variant", "residual"),), "conv3 output concatenated into conv7 (Fig. 13)")),
        "Do progressive pooling or a residual (skip) connection improve on the base network?",
        "progressive pooling (paper Fig. 12) and a residual connection (Fig. 13) against base. "
        + UNTRANSCRIBED),
    "dataset": Study(
        "dataset",
        (Run("base", note="all training subjects, preset patch step"),
         Run("few", note="1/8 of the training subjects, patch step halved", train_fraction=1 / 8,
             step_divisor=2)),
        "Do more subjects help, at a comparable number of training patches?",
        "few training subjects with the patch step halved (8x the patches per subject, so comparable patch "
        "counts) against all training subjects. " + UNTRANSCRIBED),
    "regularisation": Study(
        "regularisation",
        (Run("base", note="no regularisation (the paper's setting)"),
         Run("dropout", (("dropout", 0.1),), "dropout 0.1 before hidden convs"),
         Run("l2", (("weight_decay", 1e-4),), "L2 weight decay 1e-4 on kernels")),
        "Does dropout or an L2 penalty reduce the gap between training and validation loss?",
        "dropout and L2 weight decay against the unregularised base network. " + UNTRANSCRIBED),
}
STUDY_NAMES: tuple[str, ...] = tuple(STUDIES)


def get_study(name: str | Study) -> Study:
    if isinstance(name, Study):
        return name
    try:
        return STUDIES[name]
    except KeyError:
        raise ValueError(f"unknown study {name!r}; choose one of {', '.join(STUDY_NAMES)}") from None


def run_config(run: Run, preset: str | TrainConfig, epochs: int | None = None, **overrides) -> TrainConfig:
    """The TrainConfig of one run: preset, then the run's overrides, then the caller's (None = keep)."""
    base = PRESETS[preset] if isinstance(preset, str) else preset
    config = base.replace(**dict(run.overrides)).replace(epochs=epochs, **overrides)
    if run.step_divisor > 1:
        config = config.replace(patch_step=max(1, config.step // run.step_divisor))
    return config


def run_subjects(run: Run, subjects, val, few_subjects: int | None = None):
    """(train, val) subjects of a run; `few_subjects` overrides the count a `train_fraction` gives."""
    if run.train_fraction is None:
        return split_subjects(subjects, val)
    n_train = len(split_subjects(subjects, val)[0])
    return split_subjects(subjects, val, few_subjects or max(1, round(n_train * run.train_fraction)))


def _fingerprint(subjects) -> list:
    """Subject ids, shapes and intensity sums: equal data gives equal fingerprints, so runs can be reused."""
    return [[s.id, list(s.source.shape), f"{np.sum(s.source, dtype=np.float64):.9e}",
             f"{np.sum(s.target, dtype=np.float64):.9e}"] for s in subjects]


def _identity(config: TrainConfig, train, val) -> dict:
    """The trainer's `run_identity` plus data fingerprints, so a run is reused only on the same data."""
    return {**run_identity(config, train, val), "train": _fingerprint(train), "val": _fingerprint(val)}


def _reusable(stored: dict, identity: dict) -> bool:
    """A finished run can stand for this one: every entry it recorded is the same (entries recorded only by
    later versions are unknown in older records, and accepted, as in `check_resume`)."""
    return all(identity.get(k) == v for k, v in stored.items())


def _seconds_per_epoch(history) -> float:
    """Mean epoch time, leaving out the first epoch when there are others (it includes XLA compilation)."""
    rows = history[1:] or history
    return float(np.mean([h["seconds"] for h in rows]))


def synthesis_metrics(variables, subjects, impl: str | None = None) -> dict[str, dict[str, float]]:
    """Whole-volume synthesis + `metrics.evaluate` per subject (Subject.source is normalised already, so it goes
    to the network as it is)."""
    return {s.id: metrics.evaluate(synthesize_normalised(variables, s.inputs, s.mask, impl=impl), s.target, s.mask)
            for s in subjects}


def lut_reference(train, val) -> dict[str, dict[str, float]]:
    """The intensity look-up table fitted on `train`, scored like the CAEs on `val`: the bar context must beat."""
    from mrijax.methods import lut_method

    lut = lut_method(train)
    return {s.id: metrics.evaluate(lut.predict(s.source, s.mask), s.target, s.mask) for s in val}


def train_run(run: Run, config: TrainConfig, train, val, run_dir, *, baseline_mse=None, progress=False,
              log=print) -> dict:
    """Train one run into `run_dir` (or reuse/resume what is there) and return its record (run.json)."""
    run_dir = Path(run_dir)
    record_path = run_dir / "run.json"
    identity = _identity(config, train, val)
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if _reusable(record["identity"], identity):
            log(f"{run.label}: reusing the finished run in {run_dir}")
            return {**record, "reused": True}
        # Otherwise only what a resume may change differs (e.g. more epochs), or this refuses.
        check_resume(record["identity"], identity, run_dir, "--out")
    trainer = Trainer(config, train, val, run_dir, baseline_mse=baseline_mse, progress=progress, log=log)
    result = trainer.fit(resume=True)  # fresh if the folder is empty; the checkpoint passes `check_resume` too
    history = result["history"]
    if len(history) != config.epochs:
        raise ValueError(f"{run_dir} holds a run of {len(history)} epochs, not {config.epochs}; choose another "
                         "--out or remove that folder")
    variables, _ = checkpoint.load_model(run_dir / "best")
    t0 = time.perf_counter()
    per_subject = synthesis_metrics(variables, val, config.impl)
    record = {
        "label": run.label, "note": run.note, "variant": config.variant, "identity": identity,
        "train_subjects": [s.id for s in train], "val_subjects": [s.id for s in val],
        "train_blocks": int(len(trainer.train_records)), "steps_per_epoch": int(trainer.steps_per_epoch),
        "params": models.count_params(result["variables"]["params"]), "epochs": len(history),
        "final_train_mse": history[-1]["train_mse"], "final_val_mse": history[-1]["val_mse"],
        "best_val_mse": result["best_val_mse"], "seconds_per_epoch": _seconds_per_epoch(history),
        "synthesis_seconds": (time.perf_counter() - t0) / max(len(val), 1),
        "synthesis": per_subject, "history": history,
    }
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return {**record, "reused": False}


SCALARS = ("label", "variant", "note", "params", "train_subjects", "train_blocks", "epochs", "final_train_mse",
           "final_val_mse", "best_val_mse", "seconds_per_epoch", "mae", "mse", "snr", "psnr", "ssim")


def _row(record: dict) -> dict:
    """One flat table row: synthesis metrics are means over the validation subjects."""
    summary = metrics.summarise(list(record["synthesis"].values()))
    return {**{k: record[k] for k in SCALARS if k in record}, "train_subjects": len(record["train_subjects"]),
            **{name: mean for name, (mean, _) in summary.items()}}


def _fmt(value) -> str:
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def report_markdown(result: dict) -> str:
    """The study's markdown: question, setup, what the paper reported, training table, synthesis table, figure."""
    runs = result["runs"]
    training_cols = ("params", "train_subjects", "train_blocks", "epochs", "final_train_mse", "final_val_mse",
                     "best_val_mse", "seconds_per_epoch")
    lines = [f"# Study: {result['study']}", "", result["question"], "",
             f"Preset `{result['preset']}`, validation subjects {', '.join(result['val_subjects'])}, "
             f"{len(result['subjects'])} subjects in all; wall time {result['seconds']:.0f} s.", "",
             f"**Paper:** {result['paper']}", "", "## Training (MSE in normalised units)", "",
             "| run | " + " | ".join(training_cols) + " | note |", "|---" * (len(training_cols) + 2) + "|"]
    for r in runs:
        row = _row(r)
        lines.append(f"| {r['label']} | " + " | ".join(_fmt(row[c]) for c in training_cols) + f" | {r['note']} |")
    synth = {r["label"]: metrics.summarise(list(r["synthesis"].values())) for r in runs}
    for name, per_subject in result.get("reference", {}).items():
        synth[f"{name} (reference)"] = metrics.summarise(list(per_subject.values()))
    lines += ["", "## Whole-volume synthesis of the validation subjects (best model by validation MSE)", "",
              metrics.SSIM_NOTES["paper"] + ".", "", metrics.format_table(synth),
              f"![{result['study']}]({result['study']}.png)", ""]
    return "\n".join(lines)


def run_study(study: str | Study, preset: str, subjects, val, out_dir, epochs: int | None = None, *,
              few_subjects: int | None = None, overrides: Mapping | None = None, baseline_mse: float | None = None,
              progress: bool = False, log=print) -> dict:
    """Train (or reuse) every run of `study` into `out_dir/<label>/` and write `out_dir/<study>.{png,md,csv,json}`.

    `val`: validation subject ids or a count from the end (see `split_subjects`); `overrides`: extra
    TrainConfig changes for every run (e.g. max_steps_per_epoch in tests). Returns the JSON document.
    """
    study = get_study(study)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records = []
    for run in study.runs:
        config = run_config(run, preset, epochs, **dict(overrides or {}))
        train, val_subjects = run_subjects(run, subjects, val, few_subjects)
        log(f"[{study.name}] {run.label}: {config.variant}, {len(train)} train subjects, {config.epochs} epochs")
        records.append(train_run(run, config, train, val_subjects, out_dir / run.label, baseline_mse=baseline_mse,
                                 progress=progress, log=log))
    result = {"study": study.name, "question": study.question, "paper": study.paper, "preset": preset,
              "val_subjects": records[0]["val_subjects"], "subjects": [s.id for s in subjects],
              "seconds": time.perf_counter() - t0, "runs": records,
              "reference": {"LUT": lut_reference(*split_subjects(subjects, val))}}
    plotting.plot_loss_curves({r["label"]: r["history"] for r in records}, out_dir / f"{study.name}.png",
                              baseline_mse=baseline_mse, title=f"{study.name} study ({preset})")
    report.write_report(out_dir, [_row(r) for r in records], report_markdown(result), result, name=study.name)
    return result
