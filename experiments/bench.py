#!/usr/bin/env python3
"""`mrijax bench` as a script: `python experiments/bench.py --help` lists the flags (mrijax/cli/bench.py)."""
from mrijax.cli.main import run_command

if __name__ == "__main__":
    run_command("bench")  # before any heavy import: it may restart the process (mrijax.cli.tune_malloc)
from mrijax.cli.bench import main  # noqa: E402, F401  (for in-process use)
