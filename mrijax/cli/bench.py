"""Speed of mrijax on this machine, one JSON object per measurement, optionally beside PyTorch eager.

    mrijax bench --mode train --variant base --batch 8 [--dtype bfloat16] --compare
    mrijax bench --mode train --variant base --batch 8 --workers 2 --compare   # as `mrijax train --workers 2` trains
    mrijax bench --mode train --variant base --batch 1 --output 48   # one dense 48^3 crop
    mrijax bench --mode infer --variant base --shape 96 96 96 --compare --rounds 3
    mrijax bench --mode synthesize --shape 96 112 96
    mrijax bench --mode train --batch 8 --compare --rounds 3 --no-hugepages   # both sides: the allocator as started

Train: median step time after warm-up of `mrijax.training.train_step` (Adam, MSE) on the paper's patch geometry
(16^3 output), the same work as `torch_cae.py`; with `--workers N`, the trainer's worker processes, each stepping on
its share of the batch, timed in worker 0 (the exchange makes every step wait for all). Infer: one eval-mode forward
on an input of the given shape (VALID output). `--compare` runs the reference `torch_cae.py` ($MRIJAX_TORCH_CAE,
default ../shared/bench/torch_cae.py; needs PyTorch, which mrijax does not) with the same flags in a subprocess of
the same python right after. `--rounds N` alternates the two N times, since a noisy machine moves single numbers by
tens of percent, and ends with one summary: per-round values, median ratios, the CPU model and its bf16/AMX flags,
the allocator and the load average. Both sides run with the allocator the training and synthesis commands restart
with (`mrijax.cli.tune_malloc`), unless `--no-hugepages` or MRIJAX_HUGEPAGES=0.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from mrijax import cli
from mrijax.cli import flags

TORCH_REFERENCE = os.environ.get("MRIJAX_TORCH_CAE", os.path.join(cli.output_root().parent, "shared", "bench",
                                                                  "torch_cae.py"))
TORCH_DTYPE = {"float32": "fp32", "bfloat16": "bf16"}  # torch_cae.py's names
METRIC = {"train": "train_patches_per_s", "infer": "output_voxels_per_s", "synthesize": "voxels_per_s"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mrijax bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="train", choices=["train", "infer", "synthesize"])
    flags.add_config_flags(p, ("variant", "compute_dtype", "impl", "workers"), title=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--output", type=int, default=16, help="train: output edge (16: the paper's patches; "
                                                          "48/64: one dense crop, counted in 16^3 patches)")
    p.add_argument("--steps", type=int, default=5)
    flags.add_devices(p)
    p.add_argument("--warmup", type=int, default=5,
                   help="train: untimed steps after the compiling one: the allocator takes a few steps to settle "
                        "(see mrijax.cli.tune_malloc), and until then some steps take fresh pages")
    p.add_argument("--repeats", type=int, default=2, help="infer: timed forwards (the best is reported)")
    p.add_argument("--shape", type=int, nargs=3, default=(96, 96, 96), metavar=("D", "H", "W"))
    p.add_argument("--tile", type=int, help="synthesize: output tile edge (default: mrijax.inference.DEFAULT_TILE; "
                                            "0: one pass)")
    p.add_argument("--compare", action="store_true", help="also run torch_cae.py and print the ratios")
    p.add_argument("--torch-dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(TORCH_DTYPE),
                   help="--compare: PyTorch runs, one per dtype, right after each mrijax run")
    p.add_argument("--rounds", type=int, default=1, help="alternate mrijax and PyTorch this many times, then "
                                                         "summarise (per-round values, median ratios)")
    p.add_argument("--hugepages", action=argparse.BooleanOptionalAction, default=True,
                   help="re-run this benchmark (and the PyTorch reference, which inherits the environment) with "
                        "the allocator the other commands use (mrijax.cli.tune_malloc: jemalloc when installed, "
                        "else glibc tunables); default on, as those commands run; --no-hugepages: as started")
    args = p.parse_args(argv)
    if args.compare and (args.mode == "synthesize" or args.output != 16):
        p.error("--compare is for train (16^3 patches) and infer")
    if args.devices != 1 and (args.mode != "train" or args.devices < 1 or args.batch % args.devices):
        p.error(f"--devices {args.devices}: only for --mode train, with --batch a multiple of it")
    workers = flags.config_value(args, "workers")
    if workers != 1 and (args.mode != "train" or workers < 1 or args.batch % workers or args.devices != 1):
        p.error(f"--workers {workers}: only for --mode train, with --batch a multiple of it and one device")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


def allocator() -> str:
    """Which allocator this process runs with (see mrijax.cli.tune_malloc)."""
    if "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        return f"jemalloc ({os.environ.get('MALLOC_CONF', '')})"
    return "glibc tuned" if cli.HUGE_PAGES in os.environ.get("GLIBC_TUNABLES", "") else "glibc default"


def machine_info() -> dict:
    import jax

    cpu = cli.cpu_info()
    return {"jax": jax.__version__, "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
            **cpu, "cores": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)), "allocator": allocator()}


def _settings(args) -> dict:
    import jax.numpy as jnp

    from mrijax import ops

    dtype = flags.config_value(args, "compute_dtype")
    impl = flags.config_value(args, "impl") or ops.DEFAULT_IMPL
    return {"variant": flags.config_value(args, "variant"), "impl": impl, "form": ops.resolve(impl), "dtype": dtype,
            "jnp_dtype": {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]}


def bench_train(args) -> dict:
    """The train step's speed: in this process, or with --workers in that many worker processes (the trainer's
    `--workers`), timed in worker 0."""
    workers = flags.config_value(args, "workers")
    if workers == 1:
        return _train_steps(args)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "worker0.json")
        if cli.run_workers(workers, _train_worker, args, path):
            raise SystemExit(2)  # bad input: worker 0 printed the error
        with open(path) as f:
            return json.load(f)


def _train_worker(args, path, group) -> None:
    record = _train_steps(args, group)
    if group.index == 0:
        with open(path, "w") as f:
            json.dump(record, f)


def _train_steps(args, group=None) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mrijax import models, training

    s = _settings(args)
    edge = models.input_shape(s["variant"], args.output)
    rng = np.random.default_rng(0)
    batch = {"source": jnp.asarray(rng.random((args.batch, *edge, 1), np.float32)),
             "target": jnp.asarray(rng.random((args.batch, *(args.output,) * 3, 1), np.float32))}
    if group:  # this worker's share of the batch
        share = args.batch // group.count
        batch = {k: v[group.index * share:(group.index + 1) * share] for k, v in batch.items()}
    # The trainer's step: the batch split over the devices, gradients and BN synced; a worker's as the trainer runs it
    pmapped = args.devices > 1 or group is not None
    state = training.create_train_state(s["variant"], impl=s["impl"], compute_dtype=s["jnp_dtype"],
                                        bn_axis_name=training.AXIS if pmapped else None)
    if pmapped:
        step = training.parallel_steps(group=group)[0]
        state, batch = training.replicate(state), training.shard_batch(batch)
    else:
        step = jax.jit(training.train_step, donate_argnums=0)
    times, faults = [], []
    for i in range(1 + args.warmup + args.steps):
        start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        if i > args.warmup:  # step 0 compiles
            times.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    median = float(np.median(times))
    return {"mode": "train", "input_shape": list(edge), "output": args.output, "batch": args.batch,
            "devices": jax.local_device_count(), "workers": group.count if group else 1, "warmup": args.warmup,
            "steps": args.steps,
            "median_step_seconds": median, "page_faults_per_step": int(np.median(faults)),
            "step_seconds": [round(t, 3) for t in times], "step_page_faults": faults,
            "train_patches_per_s": args.batch * (args.output / 16) ** 3 / median}


def _timed(fn, *args) -> float:
    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def bench_infer(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mrijax import models

    s = _settings(args)
    variables = models.init_variables(s["variant"])
    model = models.build_model(s["variant"], impl=s["impl"], compute_dtype=s["jnp_dtype"])
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    x = jnp.asarray(np.random.default_rng(0).random((1, *args.shape, 1), np.float32))
    _timed(forward, variables, x)  # compile and warm up
    seconds = min(_timed(forward, variables, x) for _ in range(args.repeats))
    out = models.output_shape(s["variant"], args.shape)
    return {"mode": "infer", "input_shape": list(args.shape), "output_shape": list(out), "seconds": seconds,
            "output_voxels_per_s": float(np.prod(out)) / seconds}


def bench_synthesize(args) -> dict:
    import numpy as np

    import mrijax
    from mrijax import inference, models

    s = _settings(args)
    variables = models.init_variables(s["variant"])
    volume = np.random.default_rng(0).random(tuple(args.shape), np.float32) + 0.5
    tile = inference.DEFAULT_TILE if args.tile is None else args.tile
    kwargs = {"impl": s["impl"], "compute_dtype": s["jnp_dtype"], "tile": tile}
    seconds = [_timed(lambda: mrijax.synthesize(variables, volume, **kwargs)) for _ in range(2)]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": "synthesize", "shape": list(args.shape), "tile": tile, "first_call_seconds": seconds[0],
            "seconds": seconds[1], "voxels_per_s": float(np.prod(args.shape)) / seconds[1], "peak_rss_mib": peak_mib}


def run_torch(args, dtype: str) -> dict:
    if not os.path.isfile(TORCH_REFERENCE):
        raise FileNotFoundError(f"{TORCH_REFERENCE}: PyTorch reference not found; set MRIJAX_TORCH_CAE to torch_cae.py")
    cmd = [sys.executable, TORCH_REFERENCE, "--variant", flags.config_value(args, "variant"),
           "--dtype", TORCH_DTYPE[dtype]]
    if args.mode == "infer":
        cmd += ["--infer", *map(str, args.shape)]
    else:
        cmd += ["--batch", str(args.batch), "--steps", str(args.steps)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"{TORCH_REFERENCE} failed ({tail}); is PyTorch installed (pip install torch)?")
    return json.loads(result.stdout.strip().splitlines()[-1])


def summary(values: dict[str, list[float]], metric: str) -> dict:
    """Per-round values of every side, each PyTorch side's per-round ratios mrijax / PyTorch and their median."""
    out = {"metric": metric, "rounds": len(values["mrijax"]),
           **{side: [round(v, 4) for v in vs] for side, vs in values.items()}}
    for side, theirs in values.items():
        if side != "mrijax":
            ratios = [m / t for m, t in zip(values["mrijax"], theirs)]
            out[f"ratio_over_{side}"] = [round(r, 3) for r in ratios]
            out[f"median_ratio_over_{side}"] = round(statistics.median(ratios), 3)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.hugepages:
        cli.tune_malloc()
    cli.use_cpu_devices(args.devices)
    run = {"train": bench_train, "infer": bench_infer, "synthesize": bench_synthesize}[args.mode]
    s = _settings(args)
    machine = machine_info()
    values, loads = {}, []
    for round_ in range(args.rounds):
        rec = {"round": round_ + 1, "impl": f"mrijax-{s['impl']}", "form": s["form"], "variant": s["variant"],
               "dtype": s["dtype"], **machine, **run(args), "loadavg_1min": os.getloadavg()[0]}
        print(json.dumps(rec), flush=True)
        loads.append(rec["loadavg_1min"])
        values.setdefault("mrijax", []).append(rec[METRIC[args.mode]])
        for dtype in args.torch_dtypes if args.compare else ():
            ref = {"round": round_ + 1, **run_torch(args, dtype), "loadavg_1min": os.getloadavg()[0]}
            print(json.dumps(ref), flush=True)
            values.setdefault(f"pytorch_{dtype}", []).append(ref[METRIC[args.mode]])
    if args.compare or args.rounds > 1:
        print(json.dumps({"mode": args.mode, "variant": s["variant"], "setting": f"{s['impl']}/{s['dtype']}",
                          "form": s["form"], **summary(values, METRIC[args.mode]),
                          **{key: machine[key] for key in ("cpu", "cpu_family_model", "cpu_flags", "allocator")},
                          "loadavg_1min": loads}), flush=True)
    return 0
