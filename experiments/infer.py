#!/usr/bin/env python3
"""`mrijax infer` as a script: `python experiments/infer.py --help` lists the flags (mrijax/cli/infer.py)."""
from mrijax.cli.infer import main  # noqa: F401  (for in-process use)
from mrijax.cli.main import run_command

if __name__ == "__main__":
    run_command("infer")
