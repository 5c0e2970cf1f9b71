#!/usr/bin/env python3
"""`mrijax evaluate` as a script: `python experiments/evaluate.py --help` lists the flags (mrijax/cli/evaluate.py)."""
from mrijax.cli.main import run_command

if __name__ == "__main__":
    run_command("evaluate")  # before any heavy import: it may restart the process (mrijax.cli.tune_malloc)
from mrijax.cli.evaluate import main  # noqa: E402, F401  (for in-process use)
