"""Write a simulated dataset: `mrijax phantom --out DIR [--subjects N] [--resolution 1] [--random-contrasts]`.

The embedded default (`mrijax train` without --data) is this with 6 subjects at 2 mm. With --random-contrasts
every subject gets its own protocol, tissue and bias / noise levels: synthetic pretraining pairs (`mrijax train
--data DIR`, then `--init-from` the result on real subjects). A SIMULATION of the MNI152 anatomy: results on it
say nothing about real scans.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mrijax phantom", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="new folder for the dataset (refused if it exists)")
    p.add_argument("--subjects", type=int, default=6, help="number of simulated subjects")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=2, choices=(1, 2, 3, 4), help="voxel edge in mm")
    p.add_argument("--random-contrasts", action="store_true",
                   help="draw each subject's sequence parameters, tissue and bias / noise levels widely")
    p.add_argument("--no-lesions", dest="lesions", action="store_false", help="no MS-like lesions")
    args = p.parse_args(argv)
    if args.subjects < 1:
        p.error(f"--subjects must be >= 1, got {args.subjects}")
    return args


def main(argv=None):
    args = parse_args(argv)
    from mrijax import data

    out = Path(args.out)
    if out.exists():
        raise ValueError(f"{out} already exists; give a new --out (nothing was written)")
    data.ensure_phantom_dataset(out, n_subjects=args.subjects, seed=args.seed, resolution=args.resolution,
                                lesions=args.lesions, random_contrasts=args.random_contrasts)
    print(f"wrote {args.subjects} simulated subjects to {out}")
    return 0
