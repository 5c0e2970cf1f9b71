"""Train state and pure train/eval steps (Adam, MSE), data-parallel with `jax.pmap`.

All mutable training state (params, BatchNorm statistics, optimizer state, step, RNG) lives in one
`TrainState` pytree, so a step is a pure function state -> state and a checkpoint is that pytree.
Under pmap, gradients are averaged with `pmean` and BatchNorm batch statistics are synchronised across
devices (the model's `bn_axis_name`), so N devices compute what one device computes on the global batch. Worker
processes (`mrijax.collectives.HostGroup`) average gradients and BatchNorm's running statistics on the host,
between `gradients` and `apply_gradients`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from mrijax import collectives, models, ops

AXIS = "devices"


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    constants: Any  # variable collections that are not trained, e.g. an anchored model's "lut"; {} otherwise
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    loss: str = struct.field(pytree_node=False, default="all")  # "all" voxels of a block or "brain" voxels

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats, **self.constants}


def make_optimizer(lr: float, weight_decay: float = 0.0, decay_steps: int | None = None) -> optax.GradientTransformation:
    """Adam (the paper); `weight_decay` adds an L2 penalty's gradient on kernels (regularisation study).

    `decay_steps` switches the constant learning rate (the paper) to a cosine decay to zero over that many
    steps: with a fixed compute budget the last, small steps settle the weights instead of hopping.
    """
    def kernels_only(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: "kernel" in jax.tree_util.keystr(path), params)

    parts = [optax.add_decayed_weights(weight_decay, mask=kernels_only)] if weight_decay else []
    rate = optax.cosine_decay_schedule(lr, decay_steps) if decay_steps else lr
    return optax.chain(*parts, optax.adam(rate))


def create_train_state(variant: str | models.CAEConfig = "base", *, lr: float = 1e-3, seed: int = 0,
                       impl: str | None = None, compute_dtype=jnp.float32, weight_decay: float = 0.0,
                       decay_steps: int | None = None, bn_axis_name: str | None = AXIS,
                       loss: str = "all") -> TrainState:
    """A fresh state; `bn_axis_name` must match the pmap axis (None for a plain, unmapped step). `loss`: "all"
    averages the squared error over every voxel of an output block (the paper), "brain" over its brain voxels."""
    if loss not in ("all", "brain"):
        raise ValueError(f"loss {loss!r}: choose all or brain")
    model, tx = _model_and_optimizer(models.get_config(variant), impl or ops.DEFAULT_IMPL, jnp.dtype(compute_dtype),
                                     bn_axis_name, lr, weight_decay, decay_steps)
    variables = models.init_variables(variant, seed)
    constants = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                      rng=jax.random.PRNGKey(seed + 1), constants=constants, apply_fn=model.apply, tx=tx, loss=loss)


@functools.lru_cache(maxsize=32)
def _model_and_optimizer(config, impl, compute_dtype, bn_axis_name, lr, weight_decay, decay_steps):
    """Cached so that equal settings give identical static state fields and reuse compiled steps."""
    model = models.build_model(config, impl=impl, compute_dtype=compute_dtype, bn_axis_name=bn_axis_name)
    return model, make_optimizer(lr, weight_decay, decay_steps)


def squared_error(prediction, batch: dict, loss: str):
    """(sum of squared errors, voxel count) of a batch: over every voxel ("all", the paper) or over the brain
    voxels of each block ("brain": batch["mask"]), each sample weighted by batch["weight"] when present."""
    error = (prediction.astype(jnp.float32) - batch["target"]) ** 2
    voxels = jnp.ones_like(error) if loss == "all" else batch["mask"].astype(jnp.float32)
    weight = batch.get("weight", jnp.ones(error.shape[:1], jnp.float32)).reshape(-1, *([1] * (error.ndim - 1)))
    return jnp.sum(error * voxels * weight), jnp.sum(voxels * weight)


def mse_loss(prediction, batch: dict, loss: str = "all"):
    sq, count = squared_error(prediction, batch, loss)
    return sq / jnp.maximum(count, 1.0)


def gradients(state: TrainState, batch: dict, replica=None):
    """(loss, gradients, updated BatchNorm statistics) of the MSE over a batch's output blocks; `replica` (this
    replica's index) gives each replica its own dropout."""
    dropout_rng = jax.random.fold_in(state.rng, state.step)
    if replica is not None:
        dropout_rng = jax.random.fold_in(dropout_rng, replica)

    def loss_fn(params):
        pred, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats, **state.constants},
                                       batch["source"], train=True, mutable=["batch_stats"],
                                       rngs={"dropout": dropout_rng})
        return mse_loss(pred, batch, state.loss), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return loss, grads, batch_stats


def apply_gradients(state: TrainState, grads, batch_stats) -> TrainState:
    """The Adam step: the state after applying these gradients, with these BatchNorm statistics."""
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state)


def train_step(state: TrainState, batch: dict, axis_name: str | None = None):
    """One Adam step on MSE over the output block; returns (new state, {"loss"})."""
    loss, grads, batch_stats = gradients(state, batch, None if axis_name is None else jax.lax.axis_index(axis_name))
    if axis_name is not None:
        grads, loss = jax.lax.pmean((grads, loss), axis_name)
    return apply_gradients(state, grads, batch_stats), {"loss": loss}


def eval_step(state: TrainState, batch: dict, axis_name: str | None = None):
    """Squared-error sum and voxel count (the state's `loss` voxels) with running BatchNorm statistics.

    batch["weight"] (B,) is 1 for real samples and 0 for padding, so uneven last batches average exactly.
    """
    pred = state.apply_fn(state.variables, batch["source"], train=False)
    sq, count = squared_error(pred, batch, state.loss)
    if axis_name is not None:
        sq, count = jax.lax.psum(sq, axis_name), jax.lax.psum(count, axis_name)
    return {"sq_error": sq, "count": count}


@functools.lru_cache(maxsize=None)
def parallel_steps(donate: bool = True, group: collectives.HostGroup | None = None):
    """pmapped train and eval steps over all (global) devices along AXIS. With a worker `group`
    (`mrijax.collectives`): steps over this process's one device whose gradients, loss and BatchNorm running
    statistics (each worker normalises its own share of the batch) are averaged over the group's processes on the
    host, between the gradient and the update; eval sums likewise. Worker steps are synchronous."""
    if group is None:
        p_train = jax.pmap(functools.partial(train_step, axis_name=AXIS), axis_name=AXIS,
                           donate_argnums=(0,) if donate else ())
        return p_train, jax.pmap(functools.partial(eval_step, axis_name=AXIS), axis_name=AXIS)
    p_gradients = jax.pmap(functools.partial(gradients, replica=group.index), axis_name=AXIS)
    p_apply = jax.pmap(apply_gradients, axis_name=AXIS, donate_argnums=(0,) if donate else ())
    p_eval = jax.pmap(eval_step, axis_name=AXIS)

    def worker_train(rstate, batch):
        loss, grads, batch_stats = group.mean(jax.device_get(p_gradients(rstate, batch)))
        return p_apply(rstate, grads, batch_stats), {"loss": loss}

    def worker_eval(rstate, batch):
        return {k: v * group.count for k, v in group.mean(jax.device_get(p_eval(rstate, batch))).items()}

    return worker_train, worker_eval


def replicate(state: TrainState) -> TrainState:
    """Copy the state onto every local device (leading device axis), for the pmapped steps."""
    devices = jax.local_devices()
    # Placed with the sharding pmap itself produces, so the second step reuses the first step's compile.
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)),
                                          jax.sharding.PartitionSpec(AXIS))
    return jax.tree_util.tree_map(
        lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (len(devices), *np.shape(x))), sharding), state)


def shard_batch(batch: dict, n_devices: int | None = None) -> dict:
    """Split a host batch (B, ...) into (n_devices, B / n_devices, ...)."""
    n = n_devices or jax.local_device_count()

    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by the {n} local devices")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return jax.tree_util.tree_map(split, batch)
