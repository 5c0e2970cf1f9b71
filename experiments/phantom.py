#!/usr/bin/env python3
"""`mrijax phantom` as a script: `python experiments/phantom.py --help` lists the flags (mrijax/cli/phantom.py)."""
from mrijax.cli.main import run_command

if __name__ == "__main__":
    run_command("phantom")  # before any heavy import: it may restart the process (mrijax.cli.tune_malloc)
from mrijax.cli.phantom import main  # noqa: E402, F401  (for in-process use)
