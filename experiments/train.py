#!/usr/bin/env python3
"""Train a CAE variant: `python experiments/train.py --variant wide [--data DIR] [--preset quick]`.

Without --data it trains on the embedded phantom dataset (generated on first use; a simulation for
demos). Writes checkpoints, metrics.jsonl, loss.png and the best model (best/) under --workdir.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mrijax import cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    from mrijax.config import PRESETS
    from mrijax.models import VARIANTS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="base", choices=VARIANTS)
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                   help="smoke: seconds; quick (default): minutes on 2 CPU cores; paper: the paper's protocol")
    p.add_argument("--data", help="BIDS-like folder or CSV/TSV manifest (default: embedded phantom dataset)")
    p.add_argument("--source", default="T1w")
    p.add_argument("--target", default="T2w")
    p.add_argument("--val-subjects", default="1",
                   help="comma-separated subject ids, or a count taken from the end (default 1)")
    p.add_argument("--train-subjects", type=int, help="use only the first N training subjects")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch (samples per step; paper: 32)")
    p.add_argument("--lr", type=float)
    p.add_argument("--crop", type=int, help="output block edge (16 = the paper's patches; larger = dense)")
    p.add_argument("--patch-step", type=int, help="grid step of block centres (paper: 16; default: = crop)")
    p.add_argument("--jitter", type=int, help="augmentation: random shift of block centres, voxels per axis")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="augmentation: add left-right mirrored training subjects (--no-flip: off)")
    p.add_argument("--schedule", choices=["constant", "cosine"], help="learning-rate schedule")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="convolution input precision")
    p.add_argument("--impl", help="convolution implementation (see mrijax.ops)")
    p.add_argument("--weight-decay", type=float, help="L2 penalty on kernels")
    p.add_argument("--dropout", type=float, help="dropout rate before hidden convolutions")
    p.add_argument("--seed", type=int)
    p.add_argument("--workdir", help="output folder (default: ckpt/runs/<variant>-<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir where it stopped")
    p.add_argument("--init-from", metavar="MODEL",
                   help="start from a trained model's weights (a model folder or shipped name, e.g. t1w-t2w-base): "
                        "fine-tune it on --data with a fresh optimizer")
    p.add_argument("--baseline", choices=["lut", "mimecs"],
                   help="fit this baseline on the training subjects and draw its validation MSE on the curve")
    p.add_argument("--no-progress", action="store_true")
    cli.add_distributed_flags(p)
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "crop", "patch_step"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.lr is not None and not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    return args


def main(argv=None):
    args = parse_args(argv)
    cli.init_distributed(args)
    from mrijax import data, trainer
    from mrijax.config import PRESETS

    config = PRESETS[args.preset].replace(
        variant=args.variant, source=args.source, target=args.target, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, crop=args.crop, patch_step=args.patch_step, seed=args.seed,
        compute_dtype=args.dtype, impl=args.impl, weight_decay=args.weight_decay, dropout=args.dropout,
        jitter=args.jitter, flip=args.flip, schedule=args.schedule, init_from=args.init_from)
    root = args.data or data.ensure_phantom_dataset()
    subjects = data.load_subjects(root, source=config.source, target=config.target)
    val = int(args.val_subjects) if args.val_subjects.isdigit() else args.val_subjects.split(",")
    train_subjects, val_subjects = trainer.split_subjects(subjects, val, args.train_subjects)
    workdir = Path(args.workdir or REPO / "ckpt" / "runs" / f"{config.variant}-{args.preset}")
    shipped = REPO / "ckpt"
    if workdir.resolve().parent == shipped.resolve() and (workdir / "model.json").exists():
        raise ValueError(f"--workdir {workdir} is a shipped model; choose another folder")
    run = trainer.Trainer(config, train_subjects, val_subjects, workdir, progress=not args.no_progress)
    if args.baseline:
        from mrijax import methods

        method = (methods.MimecsMethod if args.baseline == "mimecs" else methods.LUTMethod)(train_subjects)
        predictions = {s.id: method.predict(s.source, s.mask) for s in val_subjects}
        run.baseline_mse = trainer.block_mse(predictions, val_subjects, run.val_records, run.out_shape)
        run.baseline_label = method.name
        print(f"{method.name} validation MSE over the same blocks: {run.baseline_mse:.5f}")
    result = run.fit(resume=args.resume)
    last = result["history"][-1] if result["history"] else {}
    print(json.dumps({"workdir": str(workdir), "best_val_mse": result["best_val_mse"], **last}))


if __name__ == "__main__":
    cli.tune_malloc()
    cli.run(main)
