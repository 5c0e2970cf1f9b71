"""Leave-one-source-out cross-validation of a training recipe: `mrijax cv --data DIR --preset ship --anchor lut`.

Trains one model per held-out source (a preset plus any training flag below) and scores every held-out
subject against the global LUT, the subject's own LUT and MIMECS (see mrijax/cv.py). Writes cv.md/csv/json,
one figure per fold (its worst subject: slices and error maps) and the fold models under --out.
With --ensemble it trains nothing: it scores the mean of the fold models of earlier CVs, the recipe of an ensemble.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mrijax import cli
from mrijax.cli import flags


def parse_args(argv=None):
    from mrijax import cv

    p = argparse.ArgumentParser(prog="mrijax cv", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_preset(p)
    flags.add_data(p)
    p.add_argument("--groups", nargs="+", metavar="GLOBS",
                   help="one held-out source per argument, comma-separated globs of subject ids, e.g. 'sub-ms*' "
                        "'sub-tcga*,sub-gli*' (default: one source per letter prefix of the ids)")
    p.add_argument("--baselines", nargs="*", default=list(cv.BASELINES), choices=cv.BASELINES)
    p.add_argument("--baseline-cache", help="folder caching baseline predictions, shared by recipes "
                                            "(default: <out>/baselines)")
    p.add_argument("--tta", action="store_true", help="test-time flip averaging for the CAE (twice the time)")
    p.add_argument("--out", default="results/cv", help="output folder (fold models, report, figures)")
    p.add_argument("--warm-start", metavar="CV_DIR",
                   help="continue each fold from the model of the same fold in an earlier CV's --out folder")
    p.add_argument("--card", metavar="MODEL_DIR",
                   help="also record the CV summary in this model's card (its model.json) under \"cv\"")
    p.add_argument("--ensemble", nargs="+", metavar="CV_DIR",
                   help="train nothing: score, per fold, the mean of the predictions of these finished CVs' fold "
                        "models (their --out folders, same --data and --groups), the recipe of an ensemble")
    p.add_argument("--train-folds", nargs="+", metavar="FOLD",
                   help="only train these folds' models (names as in the report, e.g. 3-omslp, or numbers) and stop; "
                        "a later run with the same flags scores all folds and reuses them, so a second process on "
                        "the other core can train part of a CV")
    p.add_argument("--compare", nargs="+", metavar="LABEL=DIR",
                   help="only print one SNR table of earlier CV reports (each DIR holds cv.json), CAE per recipe")
    p.add_argument("--no-progress", action="store_true")
    flags.add_config_flags(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mrijax import cv, data
    from mrijax.config import PRESETS

    if args.compare:
        reports = dict(item.split("=", 1) if "=" in item else (Path(item).name, item) for item in args.compare)
        print(cv.compare({label: cv.report_json(d) for label, d in reports.items()}))
        return 0
    overrides = flags.config_overrides(args)
    config = PRESETS[args.preset].replace(**overrides)
    if args.ensemble:
        training = [f"--{k.replace('_', '-')}" for k in overrides if k != "compute_dtype"]
        training += ["--warm-start"] * bool(args.warm_start) + ["--train-folds"] * bool(args.train_folds)
        if training:
            raise ValueError(f"--ensemble trains nothing, so {training[0]} does not apply: the members' recipes are "
                             "their CVs'")
        first = cv.ensemble_recipe(args.ensemble)["members"][0]  # the members' contrasts, checked to agree
        config = config.replace(source=first["source"], target=first["target"])
    entries, groups = _subjects_and_folds(args, config)
    if args.ensemble:  # folds and fold models checked before loading the volumes, so the error comes at once
        recipe = cv.ensemble_recipe(args.ensemble, groups)
    else:
        cv.check_no_leak(config, groups)
    chosen = cv.select_folds(groups, args.train_folds) if args.train_folds else None
    out = Path(args.out)
    if config.workers > 1:  # the worker processes train (and export) the fold models; scoring below loads them
        names = chosen or [cv.fold_name(i, g) for i, g in enumerate(groups)]
        code = cli.run_workers(config.workers, train_folds, args, config, entries, groups, names)
        if code or chosen:
            return code
    elif chosen:
        return train_folds(args, config, entries, groups, chosen)
    subjects = [data.load_subject(entry, config.source, config.target) for entry in entries]
    scoring = dict(baselines=args.baselines, flip=args.tta, compute_dtype=config.compute_dtype,
                   baseline_cache=Path(args.baseline_cache) if args.baseline_cache else out / "baselines")
    if args.ensemble:
        cv.run_ensemble_cv(subjects, groups, recipe, out, **scoring)
    else:
        cv.run_cv(subjects, groups, config, out, warm_start=args.warm_start, progress=not args.no_progress,
                  **scoring)
    print((out / "cv.md").read_text())
    if args.card:
        print(f"recorded in {cv.add_to_card(args.card, out / 'cv.json')}")
    return 0


def _subjects_and_folds(args, config):
    """The subject entries --data lists and their held-out groups (folds), checked."""
    from mrijax import cv, data

    root = args.data or data.ensure_phantom_dataset()
    entries = data.find_subjects(root, data.source_names(config.source) + [config.target])
    groups = cv.source_groups([e["id"] for e in entries], args.groups)
    if len(groups) < 2:
        raise ValueError(f"all subjects form one source ({', '.join(groups[0])}): cross-validation needs two or "
                         "more; pass --groups")
    return entries, groups


def train_folds(args, config, entries, groups, names, group=None) -> int:
    """Train (and export) the named folds' models, in this process or as one worker of `group`."""
    from mrijax import cv, data

    subjects = [data.load_subject(entry, config.source, config.target) for entry in entries]
    cv.train_folds(subjects, groups, config, Path(args.out), names, warm_start=args.warm_start,
                   progress=not args.no_progress, group=group)
    return 0
