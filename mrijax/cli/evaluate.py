"""Table-1-style evaluation: `mrijax evaluate --data DIR --models t1w-t2w-base t1w-t2w-wide --baselines lut mimecs`.

For every test subject and method: MAE, MSE, SNR, PSNR, SSIM on brain voxels and seconds per volume.
Writes report.md / report.csv / report.json, absolute-error maps on a fixed 0-0.2 scale (paper Fig. 15)
and a slice comparison of source, truth and every method (paper Fig. 2) into --out.
Baselines (LUT, MIMECS) are fitted on --atlas-subjects, by default the first model's training subjects.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mrijax import cli
from mrijax.cli import flags

METRICS = ("MAE", "MSE", "SNR", "PSNR", "SSIM")


def parse_args(argv=None):
    from mrijax.metrics import SSIM_VARIANTS

    p = argparse.ArgumentParser(prog="mrijax evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_data(p, default_help="$MRIJAX_SHARED_DATA or ../shared/data/mri if present, else the embedded phantom")
    p.add_argument("--models", nargs="*", metavar="MODEL",
                   help="shipped names, export folders or training workdirs (default: every model found by name)")
    p.add_argument("--baselines", nargs="*", default=["lut"], choices=["lut", "mimecs"])
    p.add_argument("--predictions", nargs=2, action="append", metavar=("NAME", "DIR"), default=[],
                   help="also score a folder of predictions (files named <subject id>*.nii.gz) as method NAME")
    p.add_argument("--test-subjects", type=flags.subject_ids,
                   help="comma-separated ids (default: the first model's validation subjects)")
    p.add_argument("--atlas-subjects", type=flags.subject_ids,
                   help="comma-separated ids for fitting baselines (default: the first model's training subjects)")
    p.add_argument("--ssim", choices=sorted(SSIM_VARIANTS), default="paper",
                   help="paper: 3D SSIM over brain voxels in normalised units; brats: the BraTS missing-MRI "
                        "challenge's (own 0.5-99.5 percentiles to [0, 1], whole volume)")
    flags.add_config_flags(p, ("source", "target"), title=None)
    p.add_argument("--out", help="results folder (default: results/eval)")
    return p.parse_args(argv)


def _default_data():
    shared = Path(os.environ.get("MRIJAX_SHARED_DATA", cli.output_root().parent / "shared" / "data" / "mri"))
    if shared.is_dir():
        return shared
    from mrijax import data

    return data.ensure_phantom_dataset()


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np

    from mrijax import checkpoint, data, methods, metrics, plotting, report

    out = Path(args.out or cli.output_root() / "results" / "eval")
    model_specs = args.models if args.models is not None else checkpoint.shipped_models()
    cae = [methods.CAEMethod(spec) for spec in model_specs]
    # The models' source contrasts unless --source says otherwise (all models must read the same ones).
    source = args.source or (cae[0].source if cae else flags.config_value(args, "source"))
    target = flags.config_value(args, "target")
    differing = [m for m in cae if m.source != source]
    if differing:
        raise ValueError(f"model {differing[0].model} takes {differing[0].source}, not {source}; evaluate models "
                         "with the same source contrasts together")
    subjects = data.load_subjects(args.data or _default_data(), source=source, target=target)
    by_id = {s.id: s for s in subjects}
    first_meta = cae[0].meta if cae else {}
    test_ids = args.test_subjects or first_meta.get("val_subjects") or [subjects[-1].id]
    atlas_ids = args.atlas_subjects or first_meta.get("train_subjects") or \
        [s.id for s in subjects if s.id not in test_ids]
    for i in test_ids + atlas_ids:
        if i not in by_id:
            raise ValueError(f"subject {i} not found in the data; available: {', '.join(by_id)}")
    if set(test_ids) & set(atlas_ids):
        print("warning: test and atlas subjects overlap", file=sys.stderr)
    atlas = [by_id[i] for i in atlas_ids]
    all_methods = list(cae)
    if "lut" in args.baselines:
        all_methods.append(methods.lut_method(atlas))
    if "mimecs" in args.baselines:
        all_methods.append(methods.mimecs_method(atlas))
    for name in {m.name for m in all_methods}:
        if sum(m.name == name for m in all_methods) > 1:  # two CAEs of one variant: name by folder
            for m in all_methods:
                if m.name == name:
                    m.name_override = f"{name} ({Path(str(m.model)).name})"

    out.mkdir(parents=True, exist_ok=True)
    score = lambda pred, subject: dict(zip(METRICS, metrics.evaluate(  # noqa: E731
        pred, subject.target, subject.mask, args.ssim).values()))
    rows, per_method = [], {}
    for sid in test_ids:
        subject = by_id[sid]
        images = {source: subject.source, "truth": subject.target}
        for m in all_methods:
            pred, seconds = methods.timed_predict(m, subject.inputs, subject.mask)
            name = getattr(m, "name_override", m.name)
            rows.append({"subject": sid, "method": name, **score(pred, subject), "seconds": seconds})
            per_method.setdefault(name, []).append(rows[-1])
            images[name] = pred
            print(f"{sid:>16} {name:>24}  " + "  ".join(f"{k} {rows[-1][k]:.5g}" for k in METRICS)
                  + f"  {seconds:.1f}s", flush=True)
        for name, folder in args.predictions:
            matches = sorted(Path(folder).glob(f"{sid}*.nii*"))
            if not matches:
                raise FileNotFoundError(f"{folder}: no prediction named {sid}*.nii.gz for method {name}")
            vol = data.load_volume(matches[0])
            data.check_same_grid(vol, subject.source_volume)
            pred = vol.data * subject.mask
            rows.append({"subject": sid, "method": name, **score(pred, subject), "seconds": float("nan")})
            per_method.setdefault(name, []).append(rows[-1])
            images[name] = pred
        plotting.plot_comparison(images, subject.mask, out / f"{sid}_comparison.png")
        plotting.plot_comparison({k: v for k, v in images.items() if k != source}, subject.mask,
                                 out / f"{sid}_error_maps.png", error_of="truth")

    table = {}
    for name, rs in per_method.items():
        summary = metrics.summarise([{k: r[k] for k in METRICS} for r in rs])
        table[name] = {**summary, "seconds": float(np.nanmean([r["seconds"] for r in rs]))}
    markdown = (f"Test subjects: {', '.join(test_ids)}; baselines fitted on: {', '.join(atlas_ids)}; "
                f"{source} -> {target}, metrics on brain voxels in normalised units (PSNR with data range 1). "
                f"{metrics.SSIM_NOTES[args.ssim]}.\n\n" + metrics.format_table(table))
    report.write_report(out, rows, markdown, {"test_subjects": test_ids, "atlas_subjects": atlas_ids,
                                              "ssim": args.ssim, "summary": table})
    print(markdown)
    return 0
