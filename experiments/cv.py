#!/usr/bin/env python3
"""`mrijax cv` as a script: `python experiments/cv.py --help` lists the flags (mrijax/cli/cv.py)."""
from mrijax.cli.main import run_command

if __name__ == "__main__":
    run_command("cv")  # before any heavy import: it may restart the process (mrijax.cli.tune_malloc)
from mrijax.cli.cv import main  # noqa: E402, F401  (for in-process use)
