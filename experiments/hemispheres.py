#!/usr/bin/env python3
"""`mrijax hemispheres` as a script: `python experiments/hemispheres.py --help` lists the flags (mrijax/cli/hemispheres.py)."""
from mrijax.cli.main import run_command

if __name__ == "__main__":
    run_command("hemispheres")  # before any heavy import: it may restart the process (mrijax.cli.tune_malloc)
from mrijax.cli.hemispheres import main  # noqa: E402, F401  (for in-process use)
