#!/usr/bin/env python3
"""`mrijax ensemble` as a script: `python experiments/ensemble.py --help` lists the flags (mrijax/cli/ensemble.py)."""
from mrijax.cli.main import run_command

if __name__ == "__main__":
    run_command("ensemble")  # before any heavy import: it may restart the process (mrijax.cli.tune_malloc)
from mrijax.cli.ensemble import main  # noqa: E402, F401  (for in-process use)
