#!/usr/bin/env python3
"""Rerun one of the paper's studies: `python experiments/study.py --study width [--data DIR] [--preset quick]`.

Studies: width (narrow/base/wide), depth (shallow/base/deep), architecture (base/progressive/residual),
dataset (few vs all training subjects), regularisation (none/dropout/L2), or all. Each writes
<out>/<study>.png (train/validation loss per epoch of every model), <study>.md/.csv/.json (final MSEs,
parameter counts, seconds per epoch, synthesis metrics on the validation subjects) and one training folder
per model; runs shared between studies (base) are trained once per --out. Without --data it uses the
embedded phantom dataset (a simulation: fine to try the commands, meaningless as a result).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mrijax import cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    from mrijax.studies import STUDY_NAMES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, choices=[*STUDY_NAMES, "all"])
    p.add_argument("--preset", default="quick", choices=["smoke", "quick", "paper"],
                   help="smoke: seconds per model; quick (default): minutes per model on 2 CPU cores; "
                        "paper: the paper's protocol")
    p.add_argument("--data", help="BIDS-like folder or CSV/TSV manifest (default: embedded phantom dataset)")
    p.add_argument("--source", default="T1w")
    p.add_argument("--target", default="T2w")
    p.add_argument("--val-subjects", default="1",
                   help="comma-separated subject ids, or a count taken from the end (default 1)")
    p.add_argument("--few-subjects", type=int,
                   help="training subjects of the dataset study's 'few' run (default: 1/8 of them, at least 1)")
    p.add_argument("--epochs", type=int, help="override the preset's epochs for every model")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="convolution input precision for every model (bfloat16: f32 accumulation, faster on CPU)")
    p.add_argument("--impl", help="convolution implementation (see mrijax.ops)")
    p.add_argument("--max-steps-per-epoch", type=int, help="cap the steps of every epoch (quick checks)")
    p.add_argument("--baseline-mse", type=float, help="draw this validation MSE (e.g. MIMECS) on the curves")
    p.add_argument("--out", help="results folder (default: results/studies/<preset>)")
    p.add_argument("--progress", action="store_true", help="show a progress bar per epoch")
    args = p.parse_args(argv)
    for name in ("epochs", "few_subjects", "max_steps_per_epoch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def main(argv=None):
    args = parse_args(argv)
    from mrijax import data, studies

    root = args.data or data.ensure_phantom_dataset()
    subjects = data.load_subjects(root, source=args.source, target=args.target)
    val = int(args.val_subjects) if args.val_subjects.isdigit() else args.val_subjects.split(",")
    out = Path(args.out or REPO / "results" / "studies" / args.preset)
    overrides = {"compute_dtype": args.dtype, "impl": args.impl, "max_steps_per_epoch": args.max_steps_per_epoch}
    names = studies.STUDY_NAMES if args.study == "all" else (args.study,)
    for name in names:
        result = studies.run_study(name, args.preset, subjects, val, out, args.epochs,
                                   few_subjects=args.few_subjects, overrides=overrides,
                                   baseline_mse=args.baseline_mse,
                                   progress=args.progress)
        print(studies.report_markdown(result))
        print(f"wrote {out / name}.png .md .csv .json")


if __name__ == "__main__":
    cli.tune_malloc()
    cli.run(main)
