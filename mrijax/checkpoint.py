"""Orbax checkpoints: full train states for resuming, and small exported models for inference.

- Train states (params, BatchNorm statistics, Adam state, step, RNG) go through an orbax
  `CheckpointManager` under `<workdir>/checkpoints`: one save per epoch (or on Ctrl-C), the last few kept,
  written atomically (orbax finalises a step directory only when it is complete).
- A model for inference is just {"params", "batch_stats"} plus `model.json` (variant, contrasts, how it
  was trained and measured). Shipped models live in the repository's `ckpt/` folder in this format.
- An ensemble is a folder of such models (`members/`) and a card listing them; it loads as a list of variables
  dicts, whose predictions `mrijax.synthesize` averages.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from mrijax import models
from mrijax.data.subjects import source_names

# The shipped models: the repository's top-level ckpt/, which the wheel carries as mrijax/ckpt (pyproject.toml).
_PACKAGED = Path(__file__).resolve().parent / "ckpt"
REPO_CKPT_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parents[1] / "ckpt"
MODELS_ENV = "MRIJAX_MODELS"  # folders of the user's own models, searched by name before the shipped ones
# The shipped model whose recipe did best in the leave-one-source-out CV: the only one above the global LUT on every
# held-out subject (RESULTS.md, "The three-model mean"); `t1w-t2w-base` is one model instead of three.
DEFAULT_MODEL = "t1w-t2w-ensemble"


def _state_tree(state) -> dict:
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "rng": state.rng, "constants": state.constants}


def make_manager(workdir: str | os.PathLike, max_to_keep: int = 3) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(Path(workdir).resolve() / "checkpoints", options=options)


def save_state(manager: ocp.CheckpointManager, state, meta: dict) -> None:
    """Save an (unreplicated) train state under its step number, with JSON metadata (epoch, config...)."""
    step = int(jax.device_get(state.step))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_state_tree(state)),
                                              meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()


def restore_state(manager: ocp.CheckpointManager, template_state, step: int | None = None):
    """Restore the latest (or given) step into the structure of `template_state`; returns (state, meta)."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint to resume from in {manager.directory}")
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _state_tree(template_state))
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             meta=ocp.args.JsonRestore()))
    tree = restored["state"]
    return template_state.replace(**tree), dict(restored["meta"])


def export_model(directory: str | os.PathLike, variables: dict, meta: dict) -> Path:
    """Write the variables ({"params", "batch_stats"}, and "lut" for an anchored model) and model.json;
    overwrites an earlier export in `directory`.

    In a multi-process run every process must call this (orbax synchronises them); process 0 writes.
    """
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    variables = jax.device_get(models.model_variables(variables))
    config = models.recognise_config(variables)
    meta = {"variant": config.name, "anchor": "lut" if config.anchor else "none", **meta}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "variables", variables, force=True)
    if jax.process_index() == 0:
        (directory / "model.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return directory


def model_dirs() -> list[Path]:
    """Folders searched for a model given by name: $MRIJAX_MODELS (os.pathsep-separated), then the shipped."""
    user = [Path(p) for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p]
    return [*user, REPO_CKPT_DIR]


def shipped_models() -> list[str]:
    """Names of the models found by name (`model_dirs`), first occurrence wins; ckpt/runs/ is not searched."""
    names = [p.parent.name for d in model_dirs() for p in sorted(d.glob("*/model.json"))]
    return list(dict.fromkeys(names))


def resolve_model_dir(name_or_path: str | os.PathLike | None = None) -> Path:
    """A model directory from a path, or a model's name in `model_dirs()` (default: DEFAULT_MODEL)."""
    candidate = Path(name_or_path or DEFAULT_MODEL)
    for path in (candidate, *(d / candidate for d in model_dirs())):
        if (path / "model.json").is_file():
            return path.resolve()
    # A training workdir: use its best export.
    if (candidate / "best" / "model.json").is_file():
        return (candidate / "best").resolve()
    raise FileNotFoundError(f"no model at {candidate}: pass a directory holding model.json (a training "
                            f"workdir's best/ or an export) or a model name: {', '.join(shipped_models()) or 'none'}")


def read_card(name_or_path: str | os.PathLike | None = None) -> dict:
    """A model's card (model.json: variant, contrasts, training subjects, recipe), without loading its weights."""
    return json.loads((resolve_model_dir(name_or_path) / "model.json").read_text())


def load_model(name_or_path: str | os.PathLike | None = None) -> tuple[dict | list[dict], dict]:
    """(variables, meta) of an exported or shipped model, ready for `mrijax.synthesize`; for an ensemble the
    variables are a list, one dict per member."""
    directory = resolve_model_dir(name_or_path)
    meta = read_card(directory)
    if "members" in meta:
        return [load_model(directory / member)[0] for member in meta["members"]], meta
    config = models.configure(meta["variant"], anchor=meta.get("anchor", "none") == "lut",
                              in_channels=len(source_names(meta.get("source", "T1w"))))
    abstract = jax.eval_shape(lambda: models.init_variables(config))
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(directory / "variables", abstract)
    return jax.tree_util.tree_map(np.asarray, variables), meta


# Card fields every member of an ensemble must share: they decide what the averaged predictions mean.
ENSEMBLE_SHARED = ("source", "target", "units", "voxel_size_mm", "train_subjects", "val_subjects")


def export_ensemble(directory: str | os.PathLike, member_models: list, meta: dict | None = None) -> Path:
    """Write an ensemble: copies of the member models (names, export folders or training workdirs) under
    `directory/members/<i>` (each keeps its own card and recipe) and a card listing them, with the fields they
    share (ENSEMBLE_SHARED, which must agree) plus `meta`. Refuses an existing `directory`, so nothing is overwritten."""
    directory = Path(directory)
    if len(member_models) < 2:
        raise ValueError(f"an ensemble needs two or more models, got {len(member_models)}")
    if directory.exists():
        raise FileExistsError(f"{directory} exists; choose a new output folder (nothing was overwritten)")
    sources = [resolve_model_dir(m) for m in member_models]
    cards = [read_card(s) for s in sources]
    nested = [str(m) for m, c in zip(member_models, cards) if "members" in c]
    if nested:
        raise ValueError(f"{nested[0]} is an ensemble itself; pass its members instead")
    for key in ENSEMBLE_SHARED:
        for model, card in zip(member_models, cards):
            if card.get(key) != cards[0].get(key):
                raise ValueError(f"{model}: its {key} ({card.get(key)}) differs from {member_models[0]}'s "
                                 f"({cards[0].get(key)}); ensemble models trained on the same data and contrasts")
    members = [f"members/{i + 1}" for i in range(len(sources))]
    for source, member in zip(sources, members):
        shutil.copytree(source, directory / member)
    variants = list(dict.fromkeys(c["variant"] for c in cards))
    anchors = list(dict.fromkeys(c.get("anchor", "none") for c in cards))
    card = {"variant": "+".join(variants), "anchor": "+".join(anchors),
            **{k: cards[0][k] for k in ENSEMBLE_SHARED if k in cards[0]}, "members": members, **(meta or {})}
    (directory / "model.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    return directory
