"""Synthesize a missing contrast for NIfTI files: `mrijax infer -i T1w.nii.gz -o T2w_synth.nii.gz`.

Input: a file, a folder (BIDS-like: every sub-*/anat/*_<source>.nii.gz; or flat: every .nii/.nii.gz) or a
text file listing one path per line. Output: a file (single input) or a folder; by default
<input name>_synth-<target>.nii.gz in ./mrijax-out. Outputs are float32 on the input's grid with its affine
and qform/sform, zero outside the brain, in normalised target units (target / (3 x its brain mean)).
A failing file is reported and the others go on; the exit status is 1 if any failed. Inputs whose voxel
size is far from the model's training data get a one-line warning: resample them to ~1 mm first.

A model trained on several source contrasts (model card "source": "T1w,FLAIR") takes one file per contrast:
`-i T1w.nii.gz -i FLAIR.nii.gz`, in the card's order; in a BIDS-like folder each subject's FLAIR is found
beside its T1w.

With no arguments: runs the default shipped model on the embedded phantom dataset's test subject and
prints its metrics against the simulated ground truth.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from mrijax import cli
from mrijax.cli import flags

NIFTI = re.compile(r"\.nii(\.gz)?$")
VOXEL_TOLERANCE = 2.0  # warn when an axis' voxel size is over 2x, or under 1/2x, the model's training data's
TRAINED_VOXEL_MM = (1.0, 1.0, 1.0)  # model cards without "voxel_size_mm": the shipped models' ~1 mm data


def parse_args(argv=None):
    from mrijax import checkpoint

    p = argparse.ArgumentParser(prog="mrijax infer", description=__doc__,
                                epilog=f"models found by name: {', '.join(checkpoint.shipped_models()) or 'none'} "
                                       f"(default {checkpoint.DEFAULT_MODEL})",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", action="append",
                   help="NIfTI file, folder, or text file of paths; a model with several source contrasts takes one "
                        "-i file per contrast, in its order (e.g. -i T1w.nii.gz -i FLAIR.nii.gz)")
    p.add_argument("-o", "--output", help="output file (single input) or folder (default: ./mrijax-out)")
    flags.add_model(p)
    p.add_argument("--mask", help="brain mask NIfTI (single input; default: positive voxels of the input)")
    p.add_argument("--method", choices=["cae", "mimecs", "lut"], default="cae")
    p.add_argument("--tile", type=int,
                   help="cae: output tile edge of the whole-volume pass, even (default: mrijax.inference.DEFAULT_TILE, "
                        "128; smaller, e.g. 64: less memory, slower; 0: the whole volume in one pass)")
    p.add_argument("--atlas", help="mimecs/lut: folder of subjects with both contrasts (BIDS-like or manifest)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction,
                   help="cae: test-time augmentation, the mean of the predictions for the volume and its left-right "
                        "mirror, at twice the time (default: on for a single model, off for an ensemble, whose "
                        "members' mean already gains what flipping would); --no-tta: one pass, as "
                        "mrijax.synthesize's default")
    flags.add_config_flags(p, ("compute_dtype", "source", "target"), title=None)
    args = p.parse_args(argv)
    if args.tile is not None and args.tile < 0:
        p.error(f"--tile must be 0 (one pass) or a positive even number, got {args.tile}")
    if args.method != "cae" and not args.atlas:
        p.error(f"--method {args.method} needs --atlas DIR (subjects with both contrasts)")
    if args.input and len(args.input) > 1 and not all(NIFTI.search(i) for i in args.input):
        p.error("several -i go with a multi-source model, one NIfTI file per source contrast; folders and lists "
                "take one -i")
    if args.mask and args.input and not NIFTI.search(args.input[0]):
        p.error("--mask goes with a single input file; for folders put sub-*_mask.nii.gz beside each image")
    return args


def _beside(image: Path, source: str, other: str) -> Path:
    """The `other` contrast's file of the subject `image` (<stem>_<source>.nii.gz) belongs to."""
    stem = NIFTI.sub("", image.name)
    stem = stem[: -len(source) - 1] if stem.endswith(f"_{source}") else stem
    found = sorted(image.parent.glob(f"{stem}_{other}.nii*"))
    return found[0] if found else image.parent / f"{stem}_{other}.nii.gz"


def list_inputs(specs: list[str], sources: list[str]) -> list[tuple[list[Path], Path | None]]:
    """(one image per source contrast, mask or None) from NIfTI files (one per source), a folder or a list file.

    A model with several sources reads BIDS-like folders, where each subject's other contrasts lie beside its
    first (sub-x_FLAIR.nii.gz beside sub-x_T1w.nii.gz; possibly missing, which `main` reports per subject).
    """
    for spec in specs:
        if not Path(spec).exists():
            raise FileNotFoundError(f"{spec}: no such file or folder; pass a NIfTI file, a folder or a list file")
    path = Path(specs[0])
    if path.is_file() and NIFTI.search(path.name):
        if len(specs) < len(sources):
            raise ValueError(f"no {' or '.join(sources[len(specs):])} image given: the model takes "
                             f"{','.join(sources)}; pass one -i per contrast, in this order")
        if len(specs) > len(sources):
            raise ValueError(f"{len(specs)} -i files for a model that takes {len(sources)} ({','.join(sources)}); "
                             "pass one -i per contrast, in this order")
        return [([Path(s) for s in specs], None)]
    multi = len(sources) > 1
    bids = sorted(path.glob(f"sub-*/anat/*_{sources[0]}.nii*")) if path.is_dir() else []
    if multi and not bids:
        raise ValueError(f"{path}: a model with source contrasts {','.join(sources)} reads BIDS-like folders "
                         f"(sub-*/anat/*_{sources[0]}.nii.gz beside *_{sources[1]}.nii.gz) or one -i file per "
                         "contrast")
    if path.is_file():
        lines = [l.strip() for l in path.read_text().splitlines() if l.strip() and not l.startswith("#")]
        return [([(path.parent / l) if not Path(l).is_absolute() else Path(l)], None) for l in lines]
    if bids:
        pairs = []
        for image in bids:
            masks = list(image.parent.glob(NIFTI.sub("", image.name).rsplit("_", 1)[0] + "_mask.nii*"))
            pairs.append(([image, *(_beside(image, sources[0], other) for other in sources[1:])],
                          masks[0] if masks else None))
        return pairs
    flat = sorted(p for p in path.iterdir() if NIFTI.search(p.name))
    if not flat:
        raise FileNotFoundError(f"{path}: no .nii/.nii.gz files found (nor sub-*/anat/*_{sources[0]}.nii.gz)")
    return [([p], None) for p in flat]


def model_sources(args) -> list[str]:
    """The source contrasts to read: --source, else the CAE model card's (read without loading weights)."""
    from mrijax import checkpoint, data

    if args.source:
        return data.source_names(args.source)
    if args.method == "cae":
        return data.source_names(checkpoint.read_card(args.checkpoint).get("source", "T1w"))
    return ["T1w"]


def output_for(image: Path, output: str | None, single: bool, target: str) -> Path:
    if output and single and NIFTI.search(output):
        return Path(output)
    folder = Path(output or "mrijax-out")
    return folder / f"{NIFTI.sub('', image.name)}_synth-{target}.nii.gz"


def canonical_zooms(path: Path) -> tuple[float, ...] | None:
    """Voxel size (mm) per canonical RAS axis from the header alone; None if unreadable (loading reports it)."""
    import nibabel as nib

    try:
        image = nib.load(path)
        zooms = image.header.get_zooms()[:3]
        axes = nib.orientations.io_orientation(image.affine)[:, 0]
        if len(zooms) != 3 or any(z <= 0 for z in zooms):
            return None
        return tuple(float(z) for _, z in sorted(zip(axes, zooms)))
    except Exception:  # noqa: BLE001 - any unreadable header: load_volume gives the one-line error later
        return None


def voxel_size_warning(path, zooms, trained=TRAINED_VOXEL_MM) -> str | None:
    """One warning line when any axis' voxel size is outside [1/2, 2] x the model's training voxel size."""
    if zooms is None or all(1 / VOXEL_TOLERANCE <= z / t <= VOXEL_TOLERANCE for z, t in zip(zooms, trained)):
        return None
    size = lambda mm: " x ".join(f"{z:.3g}" for z in mm)  # noqa: E731
    return (f"warning: {path}: voxel size {size(zooms)} mm is far from the model's training data ({size(trained)} "
            f"mm); resample to ~1 mm (e.g. FreeSurfer mri_convert -vs 1 1 1, or ANTs/FSL) for a reliable result")


def build_method(args, source, target):
    from mrijax import data, methods

    if args.method == "cae":
        tile = methods.DEFAULT_TILE if args.tile is None else args.tile
        method = methods.CAEMethod(args.checkpoint, compute_dtype=flags.config_value(args, "compute_dtype"), tile=tile)
        method.flip = args.tta if args.tta is not None else "members" not in method.meta
        return method
    atlas = data.load_subjects(args.atlas, source=source, target=target)
    return methods.mimecs_method(atlas) if args.method == "mimecs" else methods.lut_method(atlas)


def demo(args) -> int:
    """No arguments: the shipped model on the phantom dataset's held-out subject, with metrics."""
    from mrijax import data, methods, metrics

    method = build_method(args, "T1w", "T2w")
    root = data.ensure_phantom_dataset()
    subject = data.load_subjects(root)[-1]
    pred, seconds = methods.timed_predict(method, subject.inputs, subject.mask)
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

    sources = model_sources(args)
    inputs = list_inputs(args.input, sources)  # cheap checks before loading a model
    method = build_method(args, ",".join(sources), args.target or "T2w")
    target = args.target or getattr(method, "target", "T2w")
    trained = tuple((getattr(method, "meta", None) or {}).get("voxel_size_mm", TRAINED_VOXEL_MM))
    single = len(inputs) == 1
    failed = 0
    for images, mask in tqdm(inputs, desc="volumes", unit="vol", disable=single or not sys.stderr.isatty()):
        image = images[0]
        warning = args.method == "cae" and voxel_size_warning(image, canonical_zooms(image), trained)
        if warning:
            print(warning, file=sys.stderr)
        try:
            absent = [(name, p) for name, p in zip(sources, images) if not p.is_file()]
            if absent:
                raise FileNotFoundError(f"{absent[0][1]}: no {absent[0][0]} image for {image.name}; the model takes "
                                        f"{','.join(sources)}: add the file, or pass one -i per contrast")
            result = methods.synthesize_file(method, images if len(images) > 1 else image,
                                             output_for(image, args.output, single, target),
                                             mask_path=args.mask or mask, target=target)
            print(f"{result['input']} -> {result['output']}  ({result['seconds']:.1f} s)")
        except (ValueError, OSError) as e:
            failed += 1
            print(f"error: {cli.one_line(e, images)}", file=sys.stderr)
    if failed:
        print(f"{failed} of {len(inputs)} file(s) failed", file=sys.stderr)
    return 1 if failed else 0
