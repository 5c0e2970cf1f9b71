"""Split subjects into left and right hemispheres, for own-subject upper bounds:
`mrijax hemispheres --data ../shared/data/mri --subjects ms19,tcgafg6692 --out /tmp/halves`.

Writes a BIDS-like folder with two subjects per given subject, `sub-<id>L` and `sub-<id>R`: their images are
links to the originals and their mask is the brain mask cut at the median left-right coordinate of the brain
(canonical axis 0). Training on the `L` halves and testing on the `R` halves measures what a method reaches
when train and test come from the same scan (same scanner, contrast, lesion load): an upper bound for what it
can reach on a new subject. Any other subjects named in --keep are linked unchanged (e.g. to fit baselines).
Each half is normalised by its own brain mean, as every subject is.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mrijax.cli import flags


def split_masks(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (left, right) halves of a canonical RAS+ brain mask, cut at the median x of its voxels."""
    x = np.nonzero(mask)[0]
    cut = int(np.median(x))
    left, right = mask.copy(), mask.copy()
    left[cut:] = False  # RAS+: x grows to the right
    right[:cut] = False
    return left, right


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve())


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mrijax hemispheres", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_data(p, required=True)
    p.add_argument("--subjects", required=True, type=flags.subject_ids, help="comma-separated ids to split")
    p.add_argument("--keep", default=[], type=flags.subject_ids, help="comma-separated ids to link unchanged")
    flags.add_config_flags(p, ("source", "target"), title=None)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mrijax import data

    source, target = flags.config_value(args, "source"), flags.config_value(args, "target")
    # Every id is checked (the library's lookup and message) before anything is written.
    kept = data.find_subjects(args.data, (source, target), args.keep)
    split = data.find_subjects(args.data, (source, target), args.subjects)
    out = Path(args.out)
    for entry in kept:
        for key in (source, target, "mask"):
            if entry.get(key):
                _link(Path(entry[key]), out / entry["id"] / "anat" / Path(entry[key]).name)
    for entry in split:
        subject = data.load_subject(entry, source, target)  # grid checks and the brain mask, as for training
        for side, half in zip("LR", split_masks(subject.mask)):
            name = f"{subject.id}{side}"
            for key in (source, target):
                _link(Path(entry[key]), out / name / "anat" / f"{name}_{key}.nii.gz")
            data.save_like(half.astype(np.float32), subject.source_volume, out / name / "anat" / f"{name}_mask.nii.gz",
                           description=f"{side} hemisphere of {subject.id}")
            print(f"{name}: {int(half.sum())} brain voxels")
    return 0
