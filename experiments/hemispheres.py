#!/usr/bin/env python3
"""`mrijax hemispheres` as a script: `python experiments/hemispheres.py --help` lists the flags (mrijax/cli/hemispheres.py)."""
from mrijax.cli.hemispheres import main  # noqa: F401  (for in-process use)
from mrijax.cli.main import run_command

if __name__ == "__main__":
    run_command("hemispheres")
