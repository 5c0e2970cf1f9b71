"""Combine trained models into one: `mrijax ensemble -o ckpt/my-ensemble runs/a runs/b runs/c`.

The ensemble predicts the mean of its members' predictions (one network pass per member, so N times the
time of one model). The members (shipped names, export folders or training workdirs) are copied under
<output>/members/; they must map the same contrasts and be trained on the same subjects. `--cv DIR` records,
in the ensemble's card, the cross-validation of its recipe (`mrijax cv --ensemble ... --out DIR`). Use the
result like any model: `mrijax infer --checkpoint <output>`, or by name from a folder in $MRIJAX_MODELS.
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mrijax ensemble", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="MODEL", help="two or more trained models")
    p.add_argument("-o", "--output", required=True, help="new folder for the ensemble (an existing one is refused)")
    p.add_argument("--cv", metavar="CV_DIR",
                   help="the --out folder of `mrijax cv --ensemble` over these models' recipes, recorded in the card")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mrijax import checkpoint, cv

    report = cv.report_json(args.cv) if args.cv else None  # checked before anything is written
    command = "mrijax ensemble " + " ".join(sys.argv[1:] if argv is None else argv)
    directory = checkpoint.export_ensemble(args.output, args.models, {"command": command})
    if report:
        cv.add_to_card(directory, report)
    print(f"{directory}: ensemble of {len(args.models)} models")
    return 0
