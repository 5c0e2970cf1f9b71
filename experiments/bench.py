#!/usr/bin/env python3
"""`mrijax bench` as a script: `python experiments/bench.py --help` lists the flags (mrijax/cli/bench.py)."""
from mrijax.cli.bench import main  # noqa: F401  (for in-process use)
from mrijax.cli.main import run_command

if __name__ == "__main__":
    run_command("bench")
