#!/usr/bin/env python3
"""Speed of mrijax on this machine, one JSON object per measurement, optionally beside PyTorch eager.

    python experiments/bench.py --mode train --variant base --batch 8 [--dtype bf16] [--impl matmul] --compare
    python experiments/bench.py --mode train --variant base --batch 1 --output 48   # one dense 48^3 crop
    python experiments/bench.py --mode infer --variant base --shape 96 96 96 --compare
    python experiments/bench.py --mode synthesize --shape 96 112 96
    python experiments/bench.py --mode train --variant base --batch 8 --hugepages --compare   # both: tuned malloc

Train: median step time after warm-up of `mrijax.training.train_step` (Adam, MSE) on the paper's patch
geometry (16^3 output), the same work as `torch_cae.py`. Infer: one eval-mode forward on an input of the given
shape (VALID output). `--compare` runs the reference `torch_cae.py` with the same flags in a subprocess of the
same python right after (f32 and bf16 autocast by default, see --torch-dtypes), and prints the ratios
mrijax / pytorch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import mrijax
from mrijax import cli, inference, models, ops, training

TORCH_REFERENCE = os.environ.get("MRIJAX_TORCH_CAE", os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                                  "bench", "torch_cae.py"))
DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"jax": jax.__version__, "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
            "cpu": cpu, "cores": os.cpu_count(), "loadavg_1min": os.getloadavg()[0],
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "ld_preload": os.environ.get("LD_PRELOAD", ""),
            "malloc_conf": os.environ.get("MALLOC_CONF", "")}


def timed(fn, *args):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def bench_train(args) -> dict:
    edge = models.input_shape(args.variant, args.output)
    rng = np.random.default_rng(0)
    batch = {"source": jnp.asarray(rng.random((args.batch, *edge, 1), np.float32)),
             "target": jnp.asarray(rng.random((args.batch, *(args.output,) * 3, 1), np.float32))}
    pmapped = args.devices > 1  # the trainer's step: the batch split over the devices, gradients and BN synced
    state = training.create_train_state(args.variant, impl=args.impl, compute_dtype=DTYPES[args.dtype],
                                        bn_axis_name=training.AXIS if pmapped else None)
    if pmapped:
        state, step, batch = training.replicate(state), training.parallel_steps()[0], training.shard_batch(batch)
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
            "devices": jax.local_device_count(), "warmup": args.warmup, "steps": args.steps,
            "median_step_seconds": median, "page_faults_per_step": int(np.median(faults)),
            "step_seconds": [round(t, 3) for t in times], "step_page_faults": faults,
            "train_patches_per_s": args.batch * (args.output / 16) ** 3 / median}


def bench_infer(args) -> dict:
    variables = models.init_variables(args.variant)
    model = models.build_model(args.variant, impl=args.impl, compute_dtype=DTYPES[args.dtype])
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    x = jnp.asarray(np.random.default_rng(0).random((1, *args.shape, 1), np.float32))
    timed(forward, variables, x)  # compile and warm up
    seconds = min(timed(forward, variables, x) for _ in range(args.repeats))
    out = models.output_shape(args.variant, args.shape)
    return {"mode": "infer", "input_shape": list(args.shape), "output_shape": list(out), "seconds": seconds,
            "output_voxels_per_s": float(np.prod(out)) / seconds}


def bench_synthesize(args) -> dict:
    variables = models.init_variables(args.variant)
    volume = np.random.default_rng(0).random(tuple(args.shape), np.float32) + 0.5
    kwargs = {"impl": args.impl, "compute_dtype": DTYPES[args.dtype], "tile": args.tile}
    start = time.perf_counter()
    mrijax.synthesize(variables, volume, **kwargs)
    first = time.perf_counter() - start
    start = time.perf_counter()
    mrijax.synthesize(variables, volume, **kwargs)
    second = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": "synthesize", "shape": list(args.shape), "tile": args.tile, "first_call_seconds": first,
            "seconds": second, "voxels_per_s": float(np.prod(args.shape)) / second, "peak_rss_mib": peak_mib}


def run_torch(args, dtype: str) -> dict:
    cmd = [sys.executable, TORCH_REFERENCE, "--variant", args.variant, "--dtype", dtype]
    if args.mode == "infer":
        cmd += ["--infer", *map(str, args.shape)]
    else:
        cmd += ["--batch", str(args.batch), "--steps", str(args.steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="train", choices=["train", "infer", "synthesize"])
    p.add_argument("--variant", default="base", choices=models.VARIANTS)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--output", type=int, default=16, help="train: output edge (16: the paper's patches; "
                                                          "48/64: one dense crop, counted in 16^3 patches)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--devices", type=int, default=1,
                   help="train: CPU devices (jax_num_cpu_devices), one pmapped step over all of them; one per "
                        "core lets each core run its own half of the batch's non-product work")
    p.add_argument("--warmup", type=int, default=5,
                   help="train: untimed steps after the compiling one: the allocator takes a few steps to settle "
                        "(see mrijax.cli.tune_malloc), and until then some steps take fresh pages")
    p.add_argument("--repeats", type=int, default=2, help="infer: timed forwards (the best is reported)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--impl", default=ops.best_impl(), choices=sorted(ops.IMPLEMENTATIONS))
    p.add_argument("--shape", type=int, nargs=3, default=(96, 96, 96), metavar=("D", "H", "W"))
    p.add_argument("--tile", type=int, default=inference.DEFAULT_TILE,
                   help="synthesize: output tile edge (0: one pass)")
    p.add_argument("--compare", action="store_true", help="also run torch_cae.py and print the ratios")
    p.add_argument("--torch-dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES),
                   help="--compare: PyTorch runs, one per dtype, right after the mrijax run")
    p.add_argument("--hugepages", action="store_true",
                   help="re-run this benchmark (and the PyTorch reference, which inherits the environment) with "
                        "the allocator the CLIs use (mrijax.cli.tune_malloc: jemalloc when installed, else glibc "
                        "tunables; huge pages, freed memory kept for reuse): XLA allocates one large buffer per "
                        "step, and fresh pages cost a step ~2.5x here")
    args = p.parse_args()
    if args.hugepages:
        cli.tune_malloc()
    if args.compare and (args.mode == "synthesize" or args.output != 16):
        p.error("--compare is for train (16^3 patches) and infer")
    if args.devices != 1 and (args.mode != "train" or args.devices < 1 or args.batch % args.devices):
        p.error(f"--devices {args.devices}: only for --mode train, with --batch a multiple of it")
    cli.use_cpu_devices(args.devices)

    run = {"train": bench_train, "infer": bench_infer, "synthesize": bench_synthesize}[args.mode]
    rec = {"impl": f"mrijax-{args.impl}", "variant": args.variant, "dtype": args.dtype, **machine_info()}
    rec.update(run(args))
    print(json.dumps(rec), flush=True)
    if args.compare:
        key = "train_patches_per_s" if args.mode == "train" else "output_voxels_per_s"
        ratios = {}
        for dtype in args.torch_dtypes:
            ref = run_torch(args, dtype)
            ref["loadavg_1min"] = os.getloadavg()[0]
            print(json.dumps(ref), flush=True)
            ratios[f"pytorch_{dtype}"] = ref[key]
            ratios[f"ratio_over_pytorch_{dtype}"] = rec[key] / ref[key]
        print(json.dumps({"mode": args.mode, "variant": args.variant, "mrijax": f"{args.impl}/{args.dtype}",
                          "metric": key, "mrijax_value": rec[key], **ratios}), flush=True)


if __name__ == "__main__":
    main()
