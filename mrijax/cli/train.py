"""Train a CAE: `mrijax train --variant wide [--data DIR] [--preset quick]`.

Without --data it trains on the embedded phantom dataset (generated on first use; a simulation for
demos). Writes checkpoints, metrics.jsonl, loss.png and the best model (best/) under --workdir.
Every training flag below overrides the preset's value only when given.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mrijax import cli
from mrijax.cli import flags


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mrijax train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_preset(p)
    flags.add_data(p)
    flags.add_val_subjects(p)
    p.add_argument("--train-subjects", type=int, help="use only the first N training subjects")
    p.add_argument("--workdir", help="output folder (default: ckpt/runs/<variant>-<preset> in a checkout, "
                                     "else ./ckpt/runs/<variant>-<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir where it stopped")
    p.add_argument("--baseline", choices=["lut", "mimecs"],
                   help="fit this baseline on the training subjects and draw its validation MSE on the curve")
    p.add_argument("--no-progress", action="store_true")
    flags.add_config_flags(p)
    flags.add_distributed(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from mrijax.config import PRESETS

    config = PRESETS[args.preset].replace(**flags.config_overrides(args))
    if config.workers == 1:
        return train(args, config)
    if args.devices != 1 or args.coordinator:
        raise ValueError(f"--workers {config.workers} runs one process per core on this machine; drop --devices and "
                         "--coordinator")
    from mrijax import data

    if not args.data:
        data.ensure_phantom_dataset()  # once, before the workers look for it
    return cli.run_workers(config.workers, train, args, config)


def train(args, config, group=None) -> None:
    """The run the flags describe, in this process (one worker of `group`, if given)."""
    cli.init_distributed(args)
    from mrijax import checkpoint, data, trainer

    root = args.data or data.ensure_phantom_dataset()
    subjects = data.load_subjects(root, source=config.source, target=config.target)
    train_subjects, val_subjects = trainer.split_subjects(subjects, args.val_subjects, args.train_subjects)
    workdir = Path(args.workdir or cli.output_root() / "ckpt" / "runs" / f"{config.variant}-{args.preset}")
    if workdir.resolve().parent == checkpoint.REPO_CKPT_DIR.resolve() and (workdir / "model.json").exists():
        raise ValueError(f"--workdir {workdir} is a shipped model; choose another folder")
    run = trainer.Trainer(config, train_subjects, val_subjects, workdir, progress=not args.no_progress, group=group)
    if args.baseline:
        from mrijax import methods

        method = (methods.mimecs_method if args.baseline == "mimecs" else methods.lut_method)(train_subjects)
        predictions = {s.id: method.predict(s.inputs, s.mask) for s in val_subjects}
        run.baseline_mse = trainer.block_mse(predictions, val_subjects, run.val_records, run.out_shape, config.loss)
        run.baseline_label = method.name
        if run.process_index == 0:
            print(f"{method.name} validation MSE over the same blocks: {run.baseline_mse:.5f}")
    result = run.fit(resume=args.resume)
    last = result["history"][-1] if result["history"] else {}
    if run.process_index == 0:
        print(json.dumps({"workdir": str(workdir), "best_val_mse": result["best_val_mse"], **last}))
