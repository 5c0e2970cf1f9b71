#!/usr/bin/env python3
"""`mrijax study` as a script: `python experiments/study.py --help` lists the flags (mrijax/cli/study.py)."""
from mrijax.cli.main import run_command

if __name__ == "__main__":
    run_command("study")  # before any heavy import: it may restart the process (mrijax.cli.tune_malloc)
from mrijax.cli.study import main  # noqa: E402, F401  (for in-process use)
