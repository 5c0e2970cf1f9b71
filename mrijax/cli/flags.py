"""Every flag shared by two or more commands, defined once.

Training flags are generated from the `TrainConfig` fields (help, flag name and choices from each field's
metadata), so a new field is a new flag everywhere it is asked for. They default to None: only the flags a
user gives override the preset (`config_overrides`). The other shared flags (data, subjects, models,
devices, presets) are small functions here, so the same flag takes the same values in every command.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing

from mrijax import cli
from mrijax.config import PRESETS, TrainConfig

# Bounds a given flag must respect; the checks run on the parsed value, before any data is loaded.
CHECKS = {
    "epochs": (lambda v: v >= 1, ">= 1"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "crop": (lambda v: v >= 1, ">= 1"),
    "patch_step": (lambda v: v >= 1, ">= 1"),
    "max_steps_per_epoch": (lambda v: v >= 1, ">= 1"),
    "max_val_batches": (lambda v: v >= 1, ">= 1"),
    "jitter": (lambda v: v >= 0, ">= 0"),
    "workers": (lambda v: v >= 1, ">= 1"),
    "lr": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


def _dtype(text: str) -> str:
    """--dtype's parser: says so when bfloat16 is asked for on a CPU where it runs slower than float32 (not again
    in a process `cli.tune_malloc` re-started, which parses the same flags a second time)."""
    note = None if cli.restarted() else cli.slow_bf16_note(text)
    if note:
        print(note, file=sys.stderr)
    return text


# Parsers of flags whose value needs more than its type (applied where the flag is given).
TYPES = {"compute_dtype": _dtype}


def _comma_tuple(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.split(",") if t)


def _argument(field: dataclasses.Field, hint) -> tuple[str, dict]:
    """(flag, add_argument keywords) of one TrainConfig field."""
    meta = field.metadata
    flag = meta.get("flag", "--" + field.name.replace("_", "-"))
    kwargs = {"dest": field.name, "default": None, "help": meta.get("help", field.name)}
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:  # `int | None`
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    if hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(hint) is tuple:
        kwargs.update(type=_comma_tuple, metavar="A,B,...")
    else:
        kwargs["type"] = TYPES.get(field.name, hint)
    for key in ("choices", "metavar"):
        if key in meta:
            kwargs[key] = meta[key]
    return flag, kwargs


def config_fields() -> dict[str, dataclasses.Field]:
    """The TrainConfig fields that are flags (metadata {"cli": False} keeps a field off the command line)."""
    return {f.name: f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)}


def add_config_flags(parser, names=None, title: str | None = "training configuration (default: the preset's)"):
    """Add the flags of the TrainConfig fields `names` (default: all of them), each defaulting to None."""
    fields = config_fields()
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group(title) if title else parser
    for name in names or fields:
        flag, kwargs = _argument(fields[name], hints[name])
        group.add_argument(flag, **kwargs)


def config_overrides(args) -> dict:
    """The TrainConfig fields given on the command line, checked against `CHECKS`; the rest stay None-free."""
    given = {name: getattr(args, name) for name in config_fields() if getattr(args, name, None) is not None}
    for name, value in given.items():
        check = CHECKS.get(name)
        if check and not check[0](value):
            flag = config_fields()[name].metadata.get("flag", "--" + name.replace("_", "-"))
            raise ValueError(f"{flag} must be {check[1]}, got {value}")
    return given


def config_value(args, name: str):
    """A config flag's value, or TrainConfig's default when not given (commands without a preset)."""
    value = getattr(args, name, None)
    return getattr(TrainConfig(), name) if value is None else value


def add_preset(parser) -> None:
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                        help="smoke: seconds; quick (default): minutes on 2 CPU cores; paper: the paper's protocol; "
                             "ship: how the shipped models were trained; adapt: the shipped base fine-tuned on "
                             "your scanner's paired subjects")


def add_data(parser, required: bool = False, default_help: str = "the embedded phantom dataset") -> None:
    parser.add_argument("--data", required=required,
                        help=f"BIDS-like folder or CSV/TSV manifest of subjects (default: {default_help})")


def subject_ids(text: str) -> list[str]:
    """Comma-separated subject ids (with or without the sub- prefix where the data lookup allows it)."""
    return [t for t in text.split(",") if t]


def _val_subjects(text: str):
    return int(text) if text.isdigit() else subject_ids(text)


def add_val_subjects(parser) -> None:
    parser.add_argument("--val-subjects", type=_val_subjects, default=1,
                        help="comma-separated subject ids, or a count taken from the end (default 1; 0: train on every "
                             "subject, no validation, and export the last state as the model)")


def add_model(parser) -> None:
    parser.add_argument("--checkpoint", metavar="MODEL",
                        help="model: a shipped name (see `mrijax infer --help`), a folder holding model.json (an "
                             "export) or a training workdir (its best/); shipped names are also looked up in "
                             "$MRIJAX_MODELS")


def add_devices(parser) -> None:
    parser.add_argument("--devices", type=int, default=1,
                        help="CPU devices per process (jax_num_cpu_devices, default 1), each taking its share of the "
                             "batch in the pmapped step; one per core lets each core run its share of the step's "
                             "non-product work")


def add_distributed(parser) -> None:
    add_devices(parser)
    g = parser.add_argument_group("several processes / machines (jax.distributed)")
    g.add_argument("--coordinator", default=os.environ.get("MRIJAX_COORDINATOR"),
                   help="host:port of process 0 (env MRIJAX_COORDINATOR); enables multi-process training")
    g.add_argument("--num-processes", type=int, default=int(os.environ.get("MRIJAX_NUM_PROCESSES", "1")))
    g.add_argument("--process-id", type=int, default=int(os.environ.get("MRIJAX_PROCESS_ID", "0")))
