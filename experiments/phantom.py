#!/usr/bin/env python3
"""`mrijax phantom` as a script: `python experiments/phantom.py --help` lists the flags (mrijax/cli/phantom.py)."""
from mrijax.cli.phantom import main  # noqa: F401  (for in-process use)
from mrijax.cli.main import run_command

if __name__ == "__main__":
    run_command("phantom")
