"""Rerun one of the paper's studies: `mrijax study --study width [--data DIR] [--preset quick]`.

Studies: width (narrow/base/wide), depth (shallow/base/deep), architecture (base/progressive/residual),
dataset (few vs all training subjects), regularisation (none/dropout/L2), or all. Each writes
<out>/<study>.png (train/validation loss per epoch of every model), <study>.md/.csv/.json (final MSEs,
parameter counts, seconds per epoch, synthesis metrics on the validation subjects) and one training folder
per model; runs shared between studies (base) are trained once per --out. Without --data it uses the
embedded phantom dataset (a simulation: fine to try the commands, meaningless as a result).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mrijax import cli
from mrijax.cli import flags

# The TrainConfig fields a user may set for every run of a study (the study itself varies the others).
CONFIG_FLAGS = ("epochs", "compute_dtype", "impl", "max_steps_per_epoch")


def parse_args(argv=None):
    from mrijax.studies import STUDY_NAMES

    p = argparse.ArgumentParser(prog="mrijax study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, choices=[*STUDY_NAMES, "all"])
    flags.add_preset(p)
    flags.add_data(p)
    flags.add_config_flags(p, ("source", "target"), title=None)
    flags.add_val_subjects(p)
    p.add_argument("--few-subjects", type=int,
                   help="training subjects of the dataset study's 'few' run (default: 1/8 of them, at least 1)")
    p.add_argument("--baseline-mse", type=float, help="draw this validation MSE (e.g. MIMECS) on the curves")
    p.add_argument("--out", help="results folder (default: results/studies/<preset>)")
    p.add_argument("--progress", action="store_true", help="show a progress bar per epoch")
    flags.add_config_flags(p, CONFIG_FLAGS, title="for every run of the study (default: the preset's)")
    args = p.parse_args(argv)
    if args.few_subjects is not None and args.few_subjects < 1:
        p.error(f"--few-subjects must be >= 1, got {args.few_subjects}")
    return args


def main(argv=None):
    args = parse_args(argv)
    overrides = flags.config_overrides(args)
    from mrijax import data, studies

    epochs = overrides.pop("epochs", None)  # run_study's own argument
    root = args.data or data.ensure_phantom_dataset()
    subjects = data.load_subjects(root, source=flags.config_value(args, "source"),
                                  target=flags.config_value(args, "target"))
    out = Path(args.out or cli.output_root() / "results" / "studies" / args.preset)
    names = studies.STUDY_NAMES if args.study == "all" else (args.study,)
    for name in names:
        result = studies.run_study(name, args.preset, subjects, args.val_subjects, out, epochs,
                                   few_subjects=args.few_subjects, overrides=overrides,
                                   baseline_mse=args.baseline_mse, progress=args.progress)
        print(studies.report_markdown(result))
        print(f"wrote {out / name}.png .md .csv .json")
