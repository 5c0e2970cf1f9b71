"""The training loop: data -> pmapped steps -> validation -> metrics, curves and orbax checkpoints.

One generic trainer for every variant and study. Per epoch it streams shuffled blocks (grain) through
the pmapped `train_step`, evaluates MSE on the validation subjects, appends a line to `metrics.jsonl`,
redraws `loss.png`, saves the full train state (resumable) and exports the best model by validation MSE
to `<workdir>/best`. Resume continues at the exact step: the data order is a pure function of
(seed, epoch), so skipping the batches already seen reproduces the uninterrupted run.

Several processes (machines): call `jax.distributed.initialize` first; each process feeds its shard of
every epoch to its local devices and pmap spans all devices. Only process 0 writes logs and exports. Worker
processes on one machine (`--workers`, `mrijax.collectives`): each runs a Trainer with its `group`, feeds its
shard, and worker 0 alone writes.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mrijax import checkpoint, data, models, training
from mrijax.config import TrainConfig, augment_name
from mrijax.data.augment import augment_config


def split_subjects(subjects, val_subjects, train_subjects: int | None = None):
    """Validation = the named ids, or the last N subjects (the paper validates on the last patients); N = 0
    trains on every subject (a model to ship: the trainer then exports its last state)."""
    ids = [s.id for s in subjects]
    if isinstance(val_subjects, int):
        if not 0 <= val_subjects < len(subjects):
            raise ValueError(f"--val-subjects {val_subjects}: need between 0 and {len(subjects) - 1} of the "
                             f"{len(subjects)} subjects found")
        val_ids = ids[len(ids) - val_subjects:]
    else:
        missing = [v for v in val_subjects if v not in ids]
        if missing:
            raise ValueError(f"validation subject(s) {', '.join(missing)} not found; available: {', '.join(ids)}")
        val_ids = list(val_subjects)
    train = [s for s in subjects if s.id not in val_ids]
    if train_subjects is not None:
        if not 0 < train_subjects <= len(train):
            raise ValueError(f"--train-subjects {train_subjects}: only {len(train)} training subjects available")
        train = train[:train_subjects]
    if not train:
        raise ValueError("no training subjects left after taking the validation subjects out")
    return train, [s for s in subjects if s.id in val_ids]


def block_mse(predictions: dict, subjects, records, out_shape, loss: str = "all") -> float:
    """MSE of whole-volume predictions over the given blocks (all voxels, or brain voxels for loss="brain"): the
    metric of the validation curve, so a baseline (LUT, MIMECS) can be drawn beside the CAE's (paper Fig. 3)."""
    by_index = {i: s for i, s in enumerate(subjects)}
    sq, count = 0.0, 0
    for subject_index, *centre in np.asarray(records):
        subject = by_index[int(subject_index)]
        pred = data.extract_patch(predictions[subject.id], centre, out_shape)
        target = data.extract_patch(subject.target, centre, out_shape)
        voxels = np.ones(out_shape, bool) if loss == "all" else data.extract_patch(subject.mask, centre, out_shape)
        sq += float(np.sum(((pred - target) ** 2)[voxels], dtype=np.float64))
        count += int(voxels.sum())
    return sq / max(count, 1)


def _local_replica(tree):
    """The first local device's copy of a pmapped pytree, as host numpy (works across processes)."""
    def first(x):
        shard = np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)[:1]
        return shard[0] if shard.ndim == np.ndim(x) else shard

    return jax.tree_util.tree_map(first, tree)


@contextlib.contextmanager
def stop_requests():
    """While training, Ctrl-C and SIGTERM (`kill`, cluster schedulers) only set a flag, checked between steps.

    Raising from the signal handler itself can land anywhere (even inside an XLA garbage-collection callback,
    where Python drops the exception), so the run instead stops at the next step boundary, saves and exits. A
    second signal interrupts at once. Yields the list of signals received.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        received.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s, previous in kept.items():
        if previous is not signal.SIG_IGN:  # respect an ignored signal (nohup, background jobs)
            signal.signal(s, handler)
    try:
        yield received
    finally:
        for s, previous in kept.items():
            signal.signal(s, previous)


# Fields a resumed run may change: how long it runs and how it computes (the state is f32 either way; impl gives
# the same numbers, compute_dtype rounds the convolution inputs differently from then on, workers normalises smaller
# batches from then on).
RESUMABLE_CHANGES = ("epochs", "impl", "compute_dtype", "workers")
# What else names a run, as a refusal words it ("train"/"val": the studies' data fingerprints; others by key).
IDENTITY_LABELS = {"data": "another data folder", "train_subjects": "other training subjects",
                   "val_subjects": "other validation subjects", "train": "other training data",
                   "val": "other validation data"}


def run_defining(config: dict) -> dict:
    """The settings a resumed run must share with the stored one (fields added since count at their default)."""
    full = {**TrainConfig().to_dict(), **config}
    full["augment"] = augment_name(full["augment"])
    return {k: v for k, v in full.items() if k not in RESUMABLE_CHANGES}


def data_folder(subjects) -> str | None:
    """The folder holding every subject's image files (their common parent), or None for in-memory subjects.

    It stands for `--data`: it changes when --data names another folder, and a manifest that points at the
    same files gives the same folder."""
    files = [str(Path(p).resolve()) for s in subjects for p in (s.paths or {}).values() if p is not None]
    if not files:
        return None
    folder = Path(os.path.commonpath(files))
    return str(folder.parent if folder.is_file() else folder)


def run_identity(config: TrainConfig, train_subjects, val_subjects) -> dict:
    """What a stored run was trained with, as JSON: configuration, data folder and subject ids (in order, since
    the order of the training subjects is the order of their blocks). Checkpoints carry it; see `check_resume`."""
    return json.loads(json.dumps({"config": config.to_dict(), "data": data_folder([*train_subjects, *val_subjects]),
                                  "train_subjects": [s.id for s in train_subjects],
                                  "val_subjects": [s.id for s in val_subjects]}))


def _short(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def check_resume(stored: dict, current: dict, folder, new_folder_flag: str = "--workdir") -> None:
    """Refuse (one-line ValueError naming all that differs) to continue the run stored in `folder` as `current`
    when they differ in a run-defining setting (`run_defining`) or in another entry of `stored` (data folder,
    subjects, ...).

    An entry missing from `stored` (a checkpoint written before it was recorded) is unknown and accepted, so
    older runs still resume; so is a `None` on either side (subjects without files)."""
    old, new = run_defining(stored.get("config", {})), run_defining(current["config"])
    changed = [f"{k} {_short(old.get(k))} -> {_short(new.get(k))}" for k in sorted({*old, *new})
               if old.get(k) != new.get(k)]
    differences = [f"another configuration ({'; '.join(changed)})"] if changed else []
    differences += [f"{IDENTITY_LABELS.get(k, 'another ' + k)} ({_short(v)}; now {_short(current[k])})"
                    for k, v in stored.items()
                    if k != "config" and k in current and None not in (v, current[k]) and v != current[k]]
    if differences:
        raise ValueError(f"{folder} holds a run trained with {', '.join(differences)}; use the same flags or a new "
                         f"{new_folder_flag}")


def training_lut(subjects):
    """The global look-up table of the training subjects, the one an anchored model carries."""
    from mrijax.baselines import lut

    return lut.fit_lut([s.source for s in subjects], [s.target for s in subjects], [s.mask for s in subjects],
                       bins=models.LUT_BINS)


class Trainer:
    """Holds what one training run needs; `fit()` runs it. Pure steps live in `mrijax.training`."""

    def __init__(self, config: TrainConfig, train_subjects, val_subjects, workdir, *,
                 baseline_mse: float | None = None, baseline_label: str = "baseline", progress: bool = True,
                 log=print, group=None):
        if config.workers != (group.count if group else 1):
            raise ValueError(f"--workers {config.workers}: worker processes are started by `mrijax train` "
                             "and `mrijax cv`; other commands train in one process")
        self.config, self.group = config, group
        # Which share of the data this process feeds: its worker index, else its jax.distributed process index.
        self.process_index = group.index if group else jax.process_index()
        self.process_count = group.count if group else jax.process_count()
        self.train_subjects, self.val_subjects = train_subjects, val_subjects
        self.workdir = Path(workdir)
        self.baseline_mse, self.baseline_label = baseline_mse, baseline_label
        self.progress = progress and self.process_index == 0
        self.log = log if self.process_index == 0 else (lambda *a, **k: None)
        self.variant = models.configure(config.variant, anchor=config.anchor == "lut", dropout=config.dropout,
                                        in_channels=len(data.source_names(config.source)))
        n_proc, n_local = self.process_count, jax.local_device_count()
        if config.batch_size % (n_proc * n_local):
            raise ValueError(f"--batch-size {config.batch_size} must be a multiple of the "
                             f"{n_proc * n_local} devices ({n_proc} processes x {n_local} local)")
        self.local_batch = config.batch_size // n_proc
        self.out_shape = (config.crop,) * 3
        self.in_shape = models.input_shape(self.variant, config.crop)
        self.augment = augment_config(config.augment)
        # Training reads mirrored copies too when augmenting; `train_subjects` stays the real ones (metadata).
        self.fit_subjects = list(train_subjects) + ([data.mirrored(s) for s in train_subjects] if config.flip else [])
        self.train_records = data.patch_records(self.fit_subjects, config.step)
        self.val_records = data.patch_records(val_subjects, config.step) if val_subjects else None
        self.steps_per_epoch = data.num_batches(len(self.train_records), self.local_batch, n_proc)
        if config.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, config.max_steps_per_epoch)
        if self.steps_per_epoch < 1:
            raise ValueError(f"only {len(self.train_records)} training blocks for a global batch of "
                             f"{config.batch_size}: lower --batch-size or --patch-step, or add subjects")
        self.identity = run_identity(config, train_subjects, val_subjects)

    # -- state -------------------------------------------------------------------------------------------
    def new_state(self):
        c = self.config
        decay_steps = c.epochs * self.steps_per_epoch if c.schedule == "cosine" else None
        state = training.create_train_state(self.variant, lr=c.lr, seed=c.seed, impl=c.impl,
                                            compute_dtype=jnp.dtype(c.compute_dtype), weight_decay=c.weight_decay,
                                            decay_steps=decay_steps, loss=c.loss)
        if c.init_from:
            state = self._warm_start(state)
        if self.variant.anchor:
            table = training_lut(self.train_subjects)
            anchored = models.set_lut(state.variables, table.bin_centres, table.values)
            return state.replace(constants={"lut": anchored["lut"]})
        return state

    def _warm_start(self, state):
        """Weights and BatchNorm statistics from `init_from` (an export or shipped model) in a fresh state (its
        optimizer state depends only on parameter shapes): fine-tuning a trained model on new subjects, or continuing
        a finished schedule with a new one. An anchored model's LUT is not taken over: `new_state` refits it on this
        run's training subjects, as for a fresh model (the network learns a correction to the LUT of the data it
        is trained on; a model pretrained on simulated pairs must not keep their LUT)."""
        variables, meta = checkpoint.load_model(self.config.init_from)
        if "members" in meta:
            raise ValueError(f"--init-from {self.config.init_from} is an ensemble of {len(meta['members'])} models; "
                             f"start from one of them, e.g. "
                             f"{checkpoint.resolve_model_dir(self.config.init_from) / meta['members'][0]}")
        if meta["variant"] != self.variant.name:
            raise ValueError(f"--init-from {self.config.init_from} holds a {meta['variant']} model; train with "
                             f"--variant {meta['variant']} or start from a {self.variant.name} model")
        if ("lut" in variables) != self.variant.anchor:
            kind = "an anchored (anchor=lut)" if "lut" in variables else "a plain (anchor=none)"
            raise ValueError(f"--init-from {self.config.init_from} holds {kind} model; train with the same --anchor")
        sources = data.source_names(meta.get("source", "T1w"))
        if len(sources) != self.variant.in_channels:
            raise ValueError(f"--init-from {self.config.init_from} takes {len(sources)} source contrast(s) "
                             f"({', '.join(sources)}); train with --source naming as many")
        if (meta.get("source"), meta.get("target")) != (self.config.source, self.config.target):
            self.log(f"warm start from a {meta.get('source')}->{meta.get('target')} model for "
                     f"{self.config.source}->{self.config.target}")
        as_jax = lambda tree: jax.tree_util.tree_map(jnp.asarray, tree)
        return state.replace(params=as_jax(variables["params"]), batch_stats=as_jax(variables["batch_stats"]))

    def _batches(self, subjects, records, epoch, shuffle, batch_size, drop_remainder, augment=None):
        return data.patch_dataset(
            subjects, records,
            self.in_shape, self.out_shape, batch_size=batch_size, seed=self.config.seed, epoch=epoch,
            shuffle=shuffle, shard_index=self.process_index, shard_count=self.process_count,
            drop_remainder=drop_remainder, augment=augment)

    def evaluate(self, rstate) -> float:
        """Validation MSE over every validation block (uneven last batches are zero-weighted padding)."""
        _, p_eval = training.parallel_steps(group=self.group)
        n_batches = data.num_batches(len(self.val_records), self.local_batch, self.process_count,
                                     drop_remainder=False)
        if self.config.max_val_batches:
            n_batches = min(n_batches, self.config.max_val_batches)
        sq, count = 0.0, 0.0
        it = iter(self._batches(self.val_subjects, self.val_records, 0, False, self.local_batch, False))
        for _ in range(n_batches):
            batch = next(it, None)
            padded = {"source": np.zeros((self.local_batch, *self.in_shape, self.variant.in_channels), np.float32),
                      "target": np.zeros((self.local_batch, *self.out_shape, 1), np.float32),
                      "mask": np.zeros((self.local_batch, *self.out_shape, 1), np.float32),
                      "weight": np.zeros((self.local_batch,), np.float32)}
            if batch is not None:
                n = len(batch["source"])
                for key in ("source", "target", "mask"):
                    padded[key][:n] = batch[key]
                padded["weight"][:n] = 1.0
            out = p_eval(rstate, training.shard_batch(padded))
            sq += float(out["sq_error"][0])
            count += float(out["count"][0])
        return sq / max(count, 1.0)

    # -- loop --------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        """Train up to `config.epochs` (continuing the run stored in the workdir when `resume`); returns the
        metrics history, the final variables and the best validation MSE. Ctrl-C / SIGTERM save and re-raise."""
        p_train, _ = training.parallel_steps(group=self.group)
        self.workdir.mkdir(parents=True, exist_ok=True)
        manager = checkpoint.make_manager(self.workdir)
        state, history = self._restore_or_start(manager, resume)
        self._write_history(history)
        self._log_start(state)
        rstate = training.replicate(state)
        best = min((h["val_mse"] for h in history), default=math.inf)
        first_epoch, skip = divmod(int(state.step), self.steps_per_epoch)
        with stop_requests() as stop:
            try:
                for epoch in range(first_epoch, self.config.epochs):
                    t0, losses = time.perf_counter(), []
                    for rstate, loss in self._epoch_steps(p_train, rstate, epoch, skip if epoch == first_epoch else 0):
                        losses.append(loss)
                        if self._stopping(stop):
                            raise KeyboardInterrupt
                    history, best = self._end_epoch(manager, rstate, epoch, losses, time.perf_counter() - t0,
                                                    history, best)
                    if self._stopping(stop):
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                self._save_interrupted(manager, rstate)
                raise
        return {"history": history, "variables": _local_replica(rstate.variables), "best_val_mse": best}

    def _stopping(self, stop: list) -> bool:
        """Whether to stop here: a stop was requested (in any worker, so that all stop at the same step)."""
        return self.group.any(bool(stop)) if self.group else bool(stop)

    @property
    def _saves(self) -> bool:
        """Whether this process writes checkpoints and exports: all jax.distributed processes (orbax synchronises
        them), worker 0 of a group."""
        return self.group is None or self.group.index == 0

    def _restore_or_start(self, manager, resume: bool):
        """(state, history): the stored run's latest state and its epochs' metrics rows when resuming one that
        `check_resume` accepts, else a new state. A stored run without `resume` is refused, never mixed."""
        state = self.new_state()
        if manager.latest_step() is None:
            return state, []
        if not resume:
            raise ValueError(f"{self.workdir} already holds a run; pass --resume to continue it or choose "
                             "another --workdir")
        state, meta = checkpoint.restore_state(manager, state)
        check_resume(meta, self.identity, self.workdir)
        stored_dtype = meta.get("config", {}).get("compute_dtype", self.config.compute_dtype)
        if stored_dtype != self.config.compute_dtype:
            self.log(f"resuming with {self.config.compute_dtype} convolution inputs (was {stored_dtype})")
        done_epochs = int(state.step) // self.steps_per_epoch
        path = self.workdir / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        self.log(f"resumed from step {int(state.step)} in {self.workdir}")
        return state, [h for h in rows if h["epoch"] < done_epochs]

    def _log_start(self, state) -> None:
        c = self.config
        n_val_blocks = len(self.val_records) if self.val_subjects else 0
        self.log(f"{self.variant.name}: {models.count_params(state.params):,} parameters | "
                 f"{len(self.train_subjects)} train / {len(self.val_subjects)} val subjects | "
                 f"{len(self.train_records)} train / {n_val_blocks} val blocks of "
                 f"{self.in_shape[0]}->{c.crop} | {self.steps_per_epoch} steps/epoch of {c.batch_size} | "
                 + (f"{self.group.count} worker processes" if self.group else f"{jax.device_count()} devices"))

    def _patches_per_block(self) -> float:
        """One training block = this many of the paper's 16^3 patches (for comparable throughput figures)."""
        return (self.config.crop / 16) ** 3

    def _epoch_steps(self, p_train, rstate, epoch: int, skip: int):
        """One epoch's training steps, from batch `skip` on (a resumed epoch): yields (state, loss) after each.

        The epoch's batches are an indexable dataset whose order and augmentation are pure functions of
        (seed, epoch, index), so starting at index `skip` gives the uninterrupted run's remaining batches
        without cutting the skipped ones. The caller holds the latest state at every yield, which is what an
        interruption saves."""
        c = self.config
        records = data.jitter_records(self.train_records, c.jitter, data.epoch_seed(c.seed + 1, epoch))
        batches = self._batches(self.fit_subjects, records, epoch, True, self.local_batch, True, augment=self.augment)
        t0, done, previous = time.perf_counter(), 0, None
        with tqdm(total=self.steps_per_epoch, initial=skip, disable=not self.progress,
                  desc=f"epoch {epoch + 1}/{c.epochs}", unit="step", leave=False) as bar:
            for b in range(skip, self.steps_per_epoch):
                rstate, m = p_train(rstate, training.shard_batch(batches[b]))
                yield rstate, m["loss"]
                if previous is not None:
                    # At most two steps in flight: dispatch is asynchronous, and without this the loop could run
                    # far ahead, so a stop request would wait for every queued step before saving.
                    jax.block_until_ready(previous)
                previous, done = m["loss"], done + 1
                bar.update(1)
                rate = done * c.batch_size * self._patches_per_block() / (time.perf_counter() - t0)
                bar.set_postfix_str(f"{rate:.1f} patches/s")

    def _end_epoch(self, manager, rstate, epoch: int, losses, seconds: float, history: list, best: float):
        """Validate, then save the train state, export the model if its validation MSE is the best so far, and
        write metrics.jsonl and loss.png; returns (history with this epoch's row, best validation MSE)."""
        c = self.config
        train_mse = float(np.mean([np.asarray(loss)[0] for loss in losses]))
        val_mse = self.evaluate(rstate) if self.val_records is not None else float("nan")
        row = {"epoch": epoch, "step": (epoch + 1) * self.steps_per_epoch, "train_mse": train_mse,
               "val_mse": val_mse, "seconds": seconds,
               "patches_per_s": len(losses) * c.batch_size * self._patches_per_block() / seconds}
        history = [*history, row]
        host_state = _local_replica(rstate)
        if self._saves:
            checkpoint.save_state(manager, host_state, self._checkpoint_meta(epoch))
        # Without validation subjects every epoch's state is exported: the model is the last state.
        if val_mse < best or not self.val_subjects:
            best = min(best, val_mse)
            if self._saves:
                checkpoint.export_model(self.workdir / "best", host_state.variables, self.model_meta(row))
        if self.process_index == 0:
            self._write_history(history)
            self._plot(history)
        self.log(f"epoch {epoch + 1}/{c.epochs}  train_mse {train_mse:.5f}  val_mse {val_mse:.5f}  "
                 f"{seconds:.0f}s  {row['patches_per_s']:.1f} patches/s")
        return history, best

    def _save_interrupted(self, manager, rstate) -> None:
        """Save the state an interruption reached, unless the epoch's own save already holds that step."""
        host_state = _local_replica(rstate)
        step = int(host_state.step)
        if self._saves and manager.latest_step() != step:
            checkpoint.save_state(manager, host_state, self._checkpoint_meta(step // self.steps_per_epoch))
        self.log(f"interrupted: saved step {step} to {manager.directory}; continue with --resume")

    def _checkpoint_meta(self, epoch: int) -> dict:
        """A train state's metadata: its epoch and what the run is (`run_identity`, read by `check_resume`)."""
        return {"epoch": epoch, **self.identity}

    def model_meta(self, row: dict) -> dict:
        c = self.config
        zooms = [np.abs(np.diag(s.affine)[:3]) for s in self.train_subjects]
        return {"source": c.source, "target": c.target, "units": "target / (3 x its brain mean)",
                "voxel_size_mm": [round(float(z), 3) for z in np.median(zooms, axis=0)],
                "train_subjects": [s.id for s in self.train_subjects],
                "val_subjects": [s.id for s in self.val_subjects], "epoch": row["epoch"], "step": row.get("step"),
                "val_mse": row["val_mse"], "train_mse": row["train_mse"], "config": c.to_dict()}

    def _write_history(self, history) -> None:
        (self.workdir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))

    def _plot(self, history) -> None:
        from mrijax import plotting
        plotting.plot_loss_curves({self.variant.name: history}, self.workdir / "loss.png",
                                  baseline_mse=self.baseline_mse, baseline_label=self.baseline_label)
