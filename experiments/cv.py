#!/usr/bin/env python3
"""`mrijax cv` as a script: `python experiments/cv.py --help` lists the flags (mrijax/cli/cv.py)."""
from mrijax.cli.cv import main  # noqa: F401  (for in-process use)
from mrijax.cli.main import run_command

if __name__ == "__main__":
    run_command("cv")
