#!/usr/bin/env python3
"""`mrijax infer` as a script: `python experiments/infer.py --help` lists the flags (mrijax/cli/infer.py)."""
from mrijax.cli.main import run_command

if __name__ == "__main__":
    run_command("infer")  # before any heavy import: it may restart the process (mrijax.cli.tune_malloc)
from mrijax.cli.infer import main  # noqa: E402, F401  (for in-process use)
