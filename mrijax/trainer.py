"""The training loop: data -> pmapped steps -> validation -> metrics, curves and orbax checkpoints.

One generic trainer for every variant and study. Per epoch it streams shuffled blocks (grain) through
the pmapped `train_step`, evaluates MSE on the validation subjects, appends a line to `metrics.jsonl`,
redraws `loss.png`, saves the full train state (resumable) and exports the best model by validation MSE
to `<workdir>/best`. Resume continues at the exact step: the data order is a pure function of
(seed, epoch), so skipping the batches already seen reproduces the uninterrupted run.

Several processes (machines): call `jax.distributed.initialize` first; each process feeds its shard of
every epoch to its local devices and pmap spans all devices. Only process 0 writes logs and exports.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mrijax import checkpoint, data, models, training
from mrijax.config import TrainConfig


def split_subjects(subjects, val_subjects, train_subjects: int | None = None):
    """Validation = the named ids, or the last N subjects (the paper validates on the last patients)."""
    ids = [s.id for s in subjects]
    if isinstance(val_subjects, int):
        if not 0 < val_subjects < len(subjects):
            raise ValueError(f"--val-subjects {val_subjects}: need between 1 and {len(subjects) - 1} of the "
                             f"{len(subjects)} subjects found")
        val_ids = ids[-val_subjects:]
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

    Raising from the signal handler itself can land anywhere (measured: inside an XLA garbage-collection
    callback, where Python drops the exception), so the run instead stops at the next step boundary, saves
    and exits. A second signal interrupts at once. Yields the list of signals received.
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


# Fields a resumed run may change: how long it runs and how its convolutions compute (the state is f32 either
# way; impl gives the same numbers, compute_dtype rounds the convolution inputs differently from then on).
RESUMABLE_CHANGES = ("epochs", "impl", "compute_dtype")


def run_defining(config: dict) -> dict:
    """The settings a resumed run must share with the stored one (fields added since count at their default)."""
    full = {**TrainConfig().to_dict(), **config}
    return {k: v for k, v in full.items() if k not in RESUMABLE_CHANGES}


def training_lut(subjects) -> dict:
    """The global look-up table of the training subjects, as an anchored model's "lut" collection."""
    from mrijax.baselines import lut

    table = lut.fit_lut([s.source for s in subjects], [s.target for s in subjects], [s.mask for s in subjects],
                        bins=models.LUT_BINS)
    return {"centres": jnp.asarray(table.bin_centres), "values": jnp.asarray(table.values)}


class Trainer:
    """Holds what one training run needs; `fit()` runs it. Pure steps live in `mrijax.training`."""

    def __init__(self, config: TrainConfig, train_subjects, val_subjects, workdir, *,
                 baseline_mse: float | None = None, baseline_label: str = "baseline", progress: bool = True,
                 log=print):
        self.config = config
        self.train_subjects, self.val_subjects = train_subjects, val_subjects
        self.workdir = Path(workdir)
        self.baseline_mse, self.baseline_label = baseline_mse, baseline_label
        self.progress = progress and jax.process_index() == 0
        self.log = log if jax.process_index() == 0 else (lambda *a, **k: None)
        self.variant = dataclasses.replace(models.get_config(config.variant), dropout=config.dropout,
                                           anchor=config.anchor == "lut")
        n_proc, n_local = jax.process_count(), jax.local_device_count()
        if config.batch_size % (n_proc * n_local):
            raise ValueError(f"--batch-size {config.batch_size} must be a multiple of the "
                             f"{n_proc * n_local} devices ({n_proc} processes x {n_local} local)")
        self.local_batch = config.batch_size // n_proc
        self.out_shape = (config.crop,) * 3
        self.in_shape = models.input_shape(self.variant, config.crop)
        self.augment = None
        if config.augment:
            from mrijax.data.augment import AugmentConfig

            self.augment = AugmentConfig()
        # Training reads mirrored copies too when augmenting; `train_subjects` stays the real ones (metadata).
        self.fit_subjects = list(train_subjects) + ([data.mirrored(s) for s in train_subjects] if config.flip else [])
        self.train_records = data.patch_records(self.fit_subjects, config.step)
        self.val_records = data.patch_records(val_subjects, config.step) if val_subjects else None
        per_process = len(self.train_records) // n_proc
        self.steps_per_epoch = per_process // self.local_batch
        if config.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, config.max_steps_per_epoch)
        if self.steps_per_epoch < 1:
            raise ValueError(f"only {len(self.train_records)} training blocks for a global batch of "
                             f"{config.batch_size}: lower --batch-size or --patch-step, or add subjects")

    # -- state -------------------------------------------------------------------------------------------
    def new_state(self):
        c = self.config
        decay_steps = c.epochs * self.steps_per_epoch if c.schedule == "cosine" else None
        state = training.create_train_state(self.variant, lr=c.lr, seed=c.seed, impl=c.impl,
                                            compute_dtype=jnp.dtype(c.compute_dtype), weight_decay=c.weight_decay,
                                            decay_steps=decay_steps, loss=c.loss)
        if c.init_from:
            return self._warm_start(state)
        if self.variant.anchor:
            return state.replace(constants={"lut": training_lut(self.train_subjects)})
        return state

    def _warm_start(self, state):
        """Weights and BatchNorm statistics from `init_from` (an export or shipped model) in a fresh state (its
        optimizer state depends only on parameter shapes): fine-tuning a trained model on new subjects, or continuing
        a finished schedule with a new one."""
        variables, meta = checkpoint.load_model(self.config.init_from)
        if meta["variant"] != self.variant.name:
            raise ValueError(f"--init-from {self.config.init_from} holds a {meta['variant']} model; train with "
                             f"--variant {meta['variant']} or start from a {self.variant.name} model")
        if ("lut" in variables) != self.variant.anchor:
            kind = "an anchored (anchor=lut)" if "lut" in variables else "a plain (anchor=none)"
            raise ValueError(f"--init-from {self.config.init_from} holds {kind} model; train with the same --anchor")
        if (meta.get("source"), meta.get("target")) != (self.config.source, self.config.target):
            self.log(f"warm start from a {meta.get('source')}->{meta.get('target')} model for "
                     f"{self.config.source}->{self.config.target}")
        as_jax = lambda tree: jax.tree_util.tree_map(jnp.asarray, tree)
        constants = {"lut": as_jax(variables["lut"])} if "lut" in variables else {}
        return state.replace(params=as_jax(variables["params"]), batch_stats=as_jax(variables["batch_stats"]),
                             constants=constants)

    def _batches(self, subjects, records, epoch, shuffle, batch_size, drop_remainder, augment=None):
        return data.patch_dataset(
            subjects, records,
            self.in_shape, self.out_shape, batch_size=batch_size, seed=self.config.seed, epoch=epoch,
            shuffle=shuffle, shard_index=jax.process_index(), shard_count=jax.process_count(),
            drop_remainder=drop_remainder, augment=augment)

    def evaluate(self, rstate) -> float:
        """Validation MSE over every validation block (uneven last batches are zero-weighted padding)."""
        _, p_eval = training.parallel_steps()
        n_proc = jax.process_count()
        per_process = math.ceil(len(self.val_records) / n_proc)
        n_batches = math.ceil(per_process / self.local_batch)
        if self.config.max_val_batches:
            n_batches = min(n_batches, self.config.max_val_batches)
        sq, count = 0.0, 0.0
        it = iter(self._batches(self.val_subjects, self.val_records, 0, False, self.local_batch, False))
        for _ in range(n_batches):
            batch = next(it, None)
            padded = {"source": np.zeros((self.local_batch, *self.in_shape, 1), np.float32),
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
        c = self.config
        p_train, _ = training.parallel_steps()
        self.workdir.mkdir(parents=True, exist_ok=True)
        manager = checkpoint.make_manager(self.workdir)
        metrics_path = self.workdir / "metrics.jsonl"
        state, start_step = self.new_state(), 0
        history = []
        if resume and manager.latest_step() is not None:
            state, meta = checkpoint.restore_state(manager, state)
            stored = meta.get("config", {})
            if run_defining(stored) != run_defining(json.loads(json.dumps(c.to_dict()))):
                raise ValueError(f"--resume: {self.workdir} was trained with another configuration; "
                                 "use the same flags or a new --workdir")
            if stored.get("compute_dtype", c.compute_dtype) != c.compute_dtype:
                self.log(f"resuming with {c.compute_dtype} convolution inputs (was {stored['compute_dtype']})")
            start_step = int(state.step)
            history = [json.loads(line) for line in metrics_path.read_text().splitlines()] \
                if metrics_path.exists() else []
            history = [h for h in history if h["epoch"] < start_step // self.steps_per_epoch]
            self.log(f"resumed from step {start_step} in {self.workdir}")
        elif not resume and manager.latest_step() is not None:
            raise ValueError(f"{self.workdir} already holds a run; pass --resume to continue it or choose "
                             "another --workdir")
        self._write_history(metrics_path, history)
        self.log(f"{self.variant.name}: {models.count_params(state.params):,} parameters | "
                 f"{len(self.train_subjects)} train / {len(self.val_subjects)} val subjects | "
                 f"{len(self.train_records)} train / {len(self.val_records) if self.val_subjects else 0} val blocks of "
                 f"{self.in_shape[0]}->{c.crop} | {self.steps_per_epoch} steps/epoch of {c.batch_size} | "
                 f"{jax.device_count()} devices")
        rstate = training.replicate(state)
        best = min((h["val_mse"] for h in history), default=math.inf)
        patch_equiv = (c.crop / 16) ** 3  # one block = this many of the paper's 16^3 patches
        with stop_requests() as stop:
            try:
                for epoch in range(start_step // self.steps_per_epoch, c.epochs):
                    skip = start_step - epoch * self.steps_per_epoch if epoch == start_step // self.steps_per_epoch else 0
                    t0, losses = time.perf_counter(), []
                    records = data.jitter_records(self.train_records, c.jitter, data.epoch_seed(c.seed + 1, epoch))
                    it = iter(self._batches(self.fit_subjects, records, epoch, True, self.local_batch, True,
                                            augment=self.augment))
                    bar = tqdm(total=self.steps_per_epoch, initial=max(skip, 0), disable=not self.progress,
                               desc=f"epoch {epoch + 1}/{c.epochs}", unit="step", leave=False)
                    for b in range(self.steps_per_epoch):
                        batch = next(it)
                        if b < skip:
                            continue
                        rstate, m = p_train(rstate, training.shard_batch(batch))
                        losses.append(m["loss"])
                        if len(losses) > 1:
                            # At most two steps in flight: dispatch is asynchronous, and without this the loop could
                            # run far ahead, so a stop request waited for every queued step before saving (seen: a
                            # wide run still computing 50 s after SIGTERM, at ~6 s per step).
                            jax.block_until_ready(losses[-2])
                        bar.update(1)
                        elapsed = time.perf_counter() - t0
                        bar.set_postfix_str(f"{len(losses) * c.batch_size * patch_equiv / elapsed:.1f} patches/s")
                        if stop:
                            raise KeyboardInterrupt
                    bar.close()
                    train_mse = float(np.mean([np.asarray(l)[0] for l in losses]))
                    seconds = time.perf_counter() - t0
                    val_mse = self.evaluate(rstate) if self.val_records is not None else float("nan")
                    row = {"epoch": epoch, "step": (epoch + 1) * self.steps_per_epoch, "train_mse": train_mse,
                           "val_mse": val_mse, "seconds": seconds,
                           "patches_per_s": len(losses) * c.batch_size * patch_equiv / seconds}
                    history.append(row)
                    host_state = _local_replica(rstate)
                    checkpoint.save_state(manager, host_state, {"epoch": epoch, "config": c.to_dict()})
                    if val_mse < best:  # every process: orbax synchronises them while saving
                        best = val_mse
                        checkpoint.export_model(self.workdir / "best", host_state.variables, self.model_meta(row))
                    if jax.process_index() == 0:
                        self._write_history(metrics_path, history)
                        self._plot(history)
                    self.log(f"epoch {epoch + 1}/{c.epochs}  train_mse {train_mse:.5f}  val_mse {val_mse:.5f}  "
                             f"{seconds:.0f}s  {row['patches_per_s']:.1f} patches/s")
                    if stop:
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                host_state = _local_replica(rstate)
                step = int(host_state.step)
                if manager.latest_step() != step:  # interrupted right after an epoch's save: nothing new to save
                    checkpoint.save_state(manager, host_state, {"epoch": step // self.steps_per_epoch,
                                                                "config": c.to_dict()})
                self.log(f"interrupted: saved step {step} to {manager.directory}; continue with --resume")
                raise
        final = _local_replica(rstate.variables)
        return {"history": history, "variables": final, "best_val_mse": best}

    def model_meta(self, row: dict) -> dict:
        c = self.config
        zooms = [np.abs(np.diag(s.affine)[:3]) for s in self.train_subjects]
        return {"source": c.source, "target": c.target, "units": "target / (3 x its brain mean)",
                "voxel_size_mm": [round(float(z), 3) for z in np.median(zooms, axis=0)],
                "train_subjects": [s.id for s in self.train_subjects],
                "val_subjects": [s.id for s in self.val_subjects], "epoch": row["epoch"],
                "val_mse": row["val_mse"], "train_mse": row["train_mse"], "config": c.to_dict()}

    @staticmethod
    def _write_history(path: Path, history) -> None:
        path.write_text("".join(json.dumps(h) + "\n" for h in history))

    def _plot(self, history) -> None:
        from mrijax import plotting
        plotting.plot_loss_curves({self.variant.name: history}, self.workdir / "loss.png",
                                  baseline_mse=self.baseline_mse, baseline_label=self.baseline_label)
