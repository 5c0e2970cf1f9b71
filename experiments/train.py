#!/usr/bin/env python3
"""`mrijax train` as a script: `python experiments/train.py --help` lists the flags (mrijax/cli/train.py)."""
from mrijax.cli.main import run_command

if __name__ == "__main__":
    run_command("train")  # before any heavy import: it may restart the process (mrijax.cli.tune_malloc)
from mrijax.cli.train import main  # noqa: E402, F401  (for in-process use)
