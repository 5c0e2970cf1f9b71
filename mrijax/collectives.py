"""Worker processes on one machine, one per CPU core, that train as replicas (`--workers N`): their group, the
host-side mean through which they average each step's gradients, and how they are started.

Why workers: XLA:CPU's classic runtime (jax 0.6.2, the default install on Linux x86-64, which hands convolutions
to oneDNN) cannot run collectives, so a pmapped step over several CPU devices needs the slower runtime; and one
process on two cores runs three busy threads (its program's thread and two pool workers) whose placement slows
some steps by a fifth (RESULTS.md). One process per core, each with a one-thread pool, runs into neither. Between a
worker's `training.gradients` and `training.apply_gradients`, `HostGroup.mean` writes its values into its slot of a
shared buffer, waits until every worker has written its slot, and returns the mean of the slots summed in worker
order, so every worker gets the same bits and the replicas stay identical. (Done in the training loop, not as a
host callback inside the compiled step: such a callback, waiting for the other workers, once deadlocked against the
next step's dispatch.) BatchNorm normalises each worker's own share of the batch, as in
PyTorch's DistributedDataParallel without SyncBatchNorm; its running statistics are averaged.
"""
from __future__ import annotations

import ctypes
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import platform
import signal
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

# Values per worker slot of the shared buffer: the largest exchange, a wide model's gradients, BatchNorm statistics
# and loss (377,522 values), with room to spare.
CAPACITY = 1 << 19
_HEADER = 2  # per slot: the exchange's sequence number (FAILED: the worker failed), its length
FAILED = -1.0
INTERRUPTED = 130  # a worker's exit status after Ctrl-C or SIGTERM (the others stop at the same step)
STOP_GRACE_SECONDS = 30.0  # after a worker fails, how long the others may take to stop on their own (and exit with
# their own status) before they are terminated: a step or an evaluation between two exchanges, and interpreter exit
PR_SET_PDEATHSIG = 1


class WorkerFailed(RuntimeError):
    """Another worker of the group failed or vanished."""


@dataclasses.dataclass(frozen=True)
class HostGroup:
    """Worker `index` of `count` workers exchanging through `buffer` (shared float64). Hashable and compared by
    (name, index, count), so compiled steps can be cached per group."""

    name: str
    index: int
    count: int
    buffer: Any = dataclasses.field(compare=False, repr=False)
    _sequence: list = dataclasses.field(default_factory=lambda: [0], compare=False, repr=False)

    def _slots(self):
        """(2 parities, count, header + values): exchange n uses parity n % 2, so a worker may write exchange n + 1
        while another still reads n; it writes n + 2 only after every worker has written n + 1, i.e. read n."""
        return np.frombuffer(self.buffer, np.float64).reshape(2, self.count, _HEADER + CAPACITY)

    def host_mean(self, values) -> np.ndarray:
        """The mean over the group of every worker's `values` (same shape in all), summed in worker order in float64.
        The values are written before the sequence number that publishes them (x86 keeps stores in order)."""
        flat = np.asarray(values, np.float64).reshape(-1)
        if flat.size > CAPACITY:
            raise ValueError(f"a collective of {flat.size} values exceeds the shared buffer's {CAPACITY}")
        self._sequence[0] += 1
        sequence = self._sequence[0]
        slots = self._slots()[sequence % 2]
        slots[self.index, 1] = flat.size
        slots[self.index, _HEADER:_HEADER + flat.size] = flat
        slots[self.index, 0] = sequence
        self._wait(slots, sequence)
        if np.any(slots[:, 1] != flat.size):
            raise WorkerFailed(f"{self.name}: workers out of step at exchange {sequence} "
                               f"(lengths {slots[:, 1].astype(int).tolist()})")
        total = slots[0, _HEADER:_HEADER + flat.size].copy()
        for i in range(1, self.count):
            total += slots[i, _HEADER:_HEADER + flat.size]
        return (total / self.count).reshape(np.shape(values))

    def _wait(self, slots, sequence):
        """Until every slot holds this exchange: spinning (yielding the core), as a sleeping wait's wake-up cost
        milliseconds per exchange (RESULTS.md); every second, fail if a worker failed or the parent is gone."""
        parent, checked = os.getppid(), time.monotonic()
        while True:
            seen = slots[:, 0]
            if np.all(seen == sequence):
                return
            if np.any(self._slots()[..., 0] == FAILED):
                raise WorkerFailed(f"{self.name}: another worker failed")
            if time.monotonic() - checked > 1.0:
                if os.getppid() != parent:
                    raise WorkerFailed(f"{self.name}: the parent process is gone")
                checked = time.monotonic()
            os.sched_yield()

    def mean(self, tree):
        """The mean over the group of a pytree of arrays (host values; one exchange), each leaf in its own dtype."""
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        arrays = [np.asarray(leaf) for leaf in leaves]
        mean = self.host_mean(np.concatenate([a.reshape(-1).astype(np.float64) for a in arrays]))
        out, start = [], 0
        for a in arrays:
            out.append(mean[start:start + a.size].reshape(a.shape).astype(a.dtype))
            start += a.size
        return jax.tree_util.tree_unflatten(treedef, out)

    def any(self, flag: bool) -> bool:
        """Whether any worker's flag is set (the training loop's stop requests, so all stop at the same step)."""
        return bool(self.host_mean(np.array([float(flag)]))[0] > 0)

    def fail(self) -> None:
        """Mark this worker failed, so the others stop at their next exchange instead of waiting forever."""
        self._slots()[:, self.index, 0] = FAILED


def spawn(count: int, target: Callable, *args, grace: float = STOP_GRACE_SECONDS) -> list[int]:
    """Run target(group, *args) in `count` new processes and wait for them; returns their exit codes. Process i is
    pinned to the i-th core this process may use (when there are that many) and its XLA pool has one thread. When one
    fails, the others stop at their next exchange, or are terminated `grace` seconds later; when the parent dies,
    they get SIGTERM. target must be a module's top-level function, args picklable."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise ValueError(f"--workers needs an x86-64 CPU, this is {platform.machine()}: the exchange relies on its "
                         "store order; train with --workers 1")
    context = multiprocessing.get_context("spawn")
    buffer = context.RawArray("d", 2 * count * (_HEADER + CAPACITY))
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    name = f"mrijax-workers-{os.getpid()}"
    processes = [context.Process(target=_worker, name=f"{name}-{i}",
                                 args=(name, i, count, buffer, cores[i] if len(cores) >= count else None, target,
                                       args)) for i in range(count)]
    for p in processes:
        p.start()
    try:
        running, deadline, terminated = {p.sentinel: p for p in processes}, None, False
        while running:
            timeout = None if deadline is None or terminated else max(0.0, deadline - time.monotonic())
            ready = multiprocessing.connection.wait(list(running), timeout)
            if not ready:  # the grace is over: the rest cannot finish without the failed one
                for p in running.values():
                    p.terminate()
                terminated = True
            for sentinel in ready:
                finished = running.pop(sentinel)
                finished.join()  # its exit status is known once it is reaped
                if finished.exitcode not in (0, INTERRUPTED) and deadline is None:
                    deadline = time.monotonic() + grace
    finally:
        for p in processes:
            p.join()
    return [p.exitcode for p in processes]


def _worker(name, index, count, buffer, core, target, args):
    os.environ["NPROC"] = "1"  # jaxlib's intra-op pool size, read when this process's backend starts (after this)
    if core is not None:
        os.sched_setaffinity(0, {core})
    if sys.platform == "linux":  # SIGTERM when the parent dies, which a training run answers by saving and stopping
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    group = HostGroup(name, index, count, buffer)
    try:
        target(group, *args)
    except KeyboardInterrupt:
        group.fail()
        sys.exit(INTERRUPTED)
    except BaseException:
        group.fail()
        raise
