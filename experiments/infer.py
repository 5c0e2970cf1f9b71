#!/usr/bin/env python3
"""Synthesize a missing contrast for NIfTI files: `python experiments/infer.py -i T1.nii.gz -o T2_synth.nii.gz`.

Input: a file, a folder (BIDS-like: every sub-*/anat/*_<source>.nii.gz; or flat: every .nii/.nii.gz) or a
text file listing one path per line. Output: a file (single input) or a folder; by default
<input name>_synth-<target>.nii.gz in ./mrijax-out. Outputs are float32 on the input's grid with its affine
and qform/sform, zero outside the brain, in normalised target units (target / (3 x its brain mean)).
A failing file is reported and the others go on; the exit status is 1 if any failed.

With no arguments: runs the default shipped model on the embedded phantom dataset's test subject and
prints its metrics against the simulated ground truth.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mrijax import cli  # noqa: E402

NIFTI = re.compile(r"\.nii(\.gz)?$")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", help="NIfTI file, folder, or text file of paths")
    p.add_argument("-o", "--output", help="output file (single input) or folder (default: ./mrijax-out)")
    p.add_argument("--checkpoint", help="model: shipped name in ckpt/, an export folder or a training workdir")
    p.add_argument("--mask", help="brain mask NIfTI (single input; default: positive voxels of the input)")
    p.add_argument("--method", choices=["cae", "mimecs", "lut"], default="cae")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="cae: convolution input precision (bfloat16: f32 accumulation, faster on CPUs with bf16 "
                        "units; see README)")
    p.add_argument("--tile", type=int,
                   help="cae: output tile edge of the whole-volume pass, even (default: mrijax.inference.DEFAULT_TILE, "
                        "128; smaller, e.g. 64: less memory, slower; 0: the whole volume in one pass)")
    p.add_argument("--atlas", help="mimecs/lut: folder of subjects with both contrasts (BIDS-like or manifest)")
    p.add_argument("--source", help="source contrast (default: the model's, e.g. T1w)")
    p.add_argument("--target", help="target contrast (default: the model's, e.g. T2w)")
    args = p.parse_args(argv)
    if args.tile is not None and args.tile < 0:
        p.error(f"--tile must be 0 (one pass) or a positive even number, got {args.tile}")
    if args.method != "cae" and not args.atlas:
        p.error(f"--method {args.method} needs --atlas DIR (subjects with both contrasts)")
    if args.mask and args.input and not NIFTI.search(args.input):
        p.error("--mask goes with a single input file; for folders put sub-*_mask.nii.gz beside each image")
    return args


def list_inputs(spec: str, source: str) -> list[tuple[Path, Path | None]]:
    """(image, mask or None) pairs from a file, a folder or a list file."""
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder; pass a NIfTI file, a folder or a list file")
    if path.is_file() and NIFTI.search(path.name):
        return [(path, None)]
    if path.is_file():
        lines = [l.strip() for l in path.read_text().splitlines() if l.strip() and not l.startswith("#")]
        return [((path.parent / l) if not Path(l).is_absolute() else Path(l), None) for l in lines]
    bids = sorted(path.glob(f"sub-*/anat/*_{source}.nii*"))
    if bids:
        pairs = []
        for image in bids:
            masks = list(image.parent.glob(NIFTI.sub("", image.name).rsplit("_", 1)[0] + "_mask.nii*"))
            pairs.append((image, masks[0] if masks else None))
        return pairs
    flat = sorted(p for p in path.iterdir() if NIFTI.search(p.name))
    if not flat:
        raise FileNotFoundError(f"{path}: no .nii/.nii.gz files found (nor sub-*/anat/*_{source}.nii.gz)")
    return [(p, None) for p in flat]


def output_for(image: Path, output: str | None, single: bool, target: str) -> Path:
    if output and single and NIFTI.search(output):
        return Path(output)
    folder = Path(output or "mrijax-out")
    return folder / f"{NIFTI.sub('', image.name)}_synth-{target}.nii.gz"


def build_method(args, source, target):
    from mrijax import data, methods

    if args.method == "cae":
        tile = methods.DEFAULT_TILE if args.tile is None else args.tile
        return methods.CAEMethod(args.checkpoint, compute_dtype=args.dtype, tile=tile)
    atlas = data.load_subjects(args.atlas, source=source, target=target)
    return methods.MimecsMethod(atlas) if args.method == "mimecs" else methods.LUTMethod(atlas)


def demo(args) -> int:
    """No arguments: the shipped model on the phantom dataset's held-out subject, with metrics."""
    from mrijax import data, methods, metrics

    method = build_method(args, "T1w", "T2w")
    root = data.ensure_phantom_dataset()
    subject = data.load_subjects(root)[-1]
    pred, seconds = methods.timed_predict(method, subject.source, subject.mask)
    out = output_for(Path(subject.paths["source"]), args.output, True, "T2w")
    data.save_like(pred, subject.source_volume, out, description=f"mrijax synth T2w ({method.name})")
    result = {"subject": subject.id, "method": method.name, "output": str(out), "seconds": round(seconds, 2),
              **{k: round(v, 5) for k, v in metrics.evaluate(pred, subject.target, subject.mask).items()}}
    print("note: the phantom is a simulation; real results come from real data (see README)")
    print(json.dumps(result))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.input:
        return demo(args)
    from tqdm import tqdm

    from mrijax import methods

    inputs = list_inputs(args.input, args.source or "T1w")  # cheap checks before loading a model
    method = build_method(args, args.source or "T1w", args.target or "T2w")
    target = args.target or getattr(method, "target", "T2w")
    single = len(inputs) == 1
    failed = 0
    for image, mask in tqdm(inputs, desc="volumes", unit="vol", disable=single or not sys.stderr.isatty()):
        try:
            result = methods.synthesize_file(method, image, output_for(image, args.output, single, target),
                                             mask_path=args.mask or mask, target=target)
            print(f"{result['input']} -> {result['output']}  ({result['seconds']:.1f} s)")
        except (ValueError, OSError) as e:
            failed += 1
            print(f"error: {image}: {str(e).splitlines()[0]}", file=sys.stderr)
    if failed:
        print(f"{failed} of {len(inputs)} file(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    cli.tune_malloc()
    cli.run(main)
