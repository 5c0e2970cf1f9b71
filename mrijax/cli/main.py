"""The `mrijax` command: one subcommand per module, each a thin layer over the library.

Adding a command is one line in COMMANDS: a module with `main(argv) -> int` (and its own `--help`).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys

from mrijax import cli


@dataclasses.dataclass(frozen=True)
class Command:
    module: str  # holds main(argv)
    summary: str
    tune_malloc: bool = True  # restart with the XLA-friendly allocator first (cli.tune_malloc)


COMMANDS = {
    "train": Command("mrijax.cli.train", "train a model (presets, every TrainConfig field as a flag)"),
    "infer": Command("mrijax.cli.infer", "synthesize the missing contrast for NIfTI files"),
    "evaluate": Command("mrijax.cli.evaluate", "score models and baselines on test subjects (md/csv/json report)"),
    "study": Command("mrijax.cli.study", "rerun one of the paper's studies (width, depth, ...)"),
    "bench": Command("mrijax.cli.bench", "measure speed, optionally beside PyTorch", tune_malloc=False),
    "hemispheres": Command("mrijax.cli.hemispheres", "split subjects into left/right half-brain subjects",
                           tune_malloc=False),
    "cv": Command("mrijax.cli.cv", "leave-one-source-out cross-validation of a training recipe"),
    "ensemble": Command("mrijax.cli.ensemble", "combine trained models into one that averages their predictions",
                        tune_malloc=False),
    "phantom": Command("mrijax.cli.phantom", "write a simulated dataset (demos, tests, synthetic pretraining)",
                       tune_malloc=False),
}


def run_command(name: str, argv=None) -> None:
    """Run one command as a process: the allocator restart if it wants one, one-line errors, the exit status."""
    command = COMMANDS[name]
    if command.tune_malloc:
        cli.tune_malloc()
    module = importlib.import_module(command.module)
    cli.run(lambda: module.main(sys.argv[1:] if argv is None else argv))


def main(argv=None) -> None:
    """`mrijax COMMAND [flags]`: the console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="mrijax", description="MRI contrast synthesis (T1w -> T2w and other "
                                     "pairs) with a 3D convolutional autoencoder. `mrijax COMMAND --help` for a "
                                     "command's flags.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        sub.add_parser(name, help=command.summary, add_help=False)
    name = parser.parse_args(argv[:1]).command
    run_command(name, argv[1:])


if __name__ == "__main__":
    main()
