"""Shared command-line plumbing: one-line errors with a non-zero exit, the allocator restart, devices and
distributed start-up. The commands themselves are thin modules beside this one (`mrijax.cli.main` lists
them); their shared flags live in `mrijax.cli.flags`.
"""
from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

# glibc >= 2.35: back large blocks with transparent huge pages, and keep freed memory in the heap for reuse
# (no mmap per large block, no trimming, one arena), so most steps allocate without any page fault.
HUGE_PAGES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295:glibc.malloc.arena_max=1"
# jemalloc, when installed: huge pages, and freed memory never handed back to the OS (reused by the next step).
JEMALLOC_CONF = "thp:always,dirty_decay_ms:-1,muzzy_decay_ms:-1"
CPU_FLAGS = re.compile(r"^(amx\w*|avx512_bf16|avx512f|avx2)$")  # what decides bf16 / f32 product speed
BF16_UNITS = ("avx512_bf16", "amx_bf16")  # without either, XLA converts bf16 in software: slower than f32


def cpu_info(cpuinfo: str | None = None) -> dict:
    """CPU model and the flags that decide product speed (AMX tiles, AVX-512 bf16), from /proc/cpuinfo text
    (read from this machine when None). x86 "cpu family" / "model" numbers tell apart CPUs that share a model
    name (cloud machines report "AMD EPYC" for Zen 2, 3 and 5 alike): "family/model", or None."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields = {}  # "key : value" lines; the first processor's block comes first
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    family, model = fields.get("cpu family"), fields.get("model")
    return {"cpu": fields.get("model name") or platform.processor(),
            "cpu_family_model": f"{family}/{model}" if family and model else None,
            "cpu_flags": sorted(f for f in set(fields.get("flags", "").split()) if CPU_FLAGS.match(f))}


def slow_bf16_note(dtype: str, cpu: dict | None = None) -> str | None:
    """A note when `--dtype bfloat16` was asked for on an x86 CPU without bf16 units (RESULTS.md: slower than
    float32 there); None otherwise, and on CPUs whose flags /proc/cpuinfo does not list."""
    cpu = cpu_info() if cpu is None else cpu
    if dtype != "bfloat16" or not cpu["cpu_flags"] or set(BF16_UNITS) & set(cpu["cpu_flags"]):
        return None
    return (f"note: this CPU ({cpu['cpu']}) has no bf16 units ({' or '.join(BF16_UNITS)}), so --dtype bfloat16 "
            "runs slower than the default float32 here")


def find_jemalloc() -> str | None:
    """The jemalloc shared library to preload: $MRIJAX_JEMALLOC if it names a file ("0": none), else the
    system's (e.g. Debian/Ubuntu `apt install libjemalloc2`), else None."""
    chosen = os.environ.get("MRIJAX_JEMALLOC")
    if chosen is not None:
        if chosen != "0" and not os.path.isfile(chosen):
            print(f"note: MRIJAX_JEMALLOC={chosen} is not a file; using glibc malloc settings", file=sys.stderr)
        return chosen if chosen != "0" and os.path.isfile(chosen) else None
    import ctypes.util

    return ctypes.util.find_library("jemalloc")


def restarted() -> bool:
    """Whether this process is the one `tune_malloc` re-started (its mark: `HUGE_PAGES` in GLIBC_TUNABLES), so it
    has parsed its flags once before."""
    return HUGE_PAGES in os.environ.get("GLIBC_TUNABLES", "")


def tune_malloc() -> None:
    """Re-start this script once with a memory allocator suited to XLA (off with MRIJAX_HUGEPAGES=0).

    XLA:CPU allocates one large buffer per step and frees it at the end; wherever that memory is fresh, its
    pages fault on first touch, which makes a step take several times as long. With glibc's defaults every step
    is fresh memory (a new mmap). glibc tuned by `HUGE_PAGES` reuses its heap, but the heap fragments, so some
    steps still take fresh pages and the peak memory grows. jemalloc (`JEMALLOC_CONF`), preloaded when installed,
    reuses its memory after the first steps at a lower peak (figures in RESULTS.md). Allocator settings are read
    when the process starts, hence the re-exec; results are bit-identical. The user's own GLIBC_TUNABLES /
    MALLOC_CONF settings come last and so win.
    """
    if not sys.platform.startswith("linux") or os.environ.get("MRIJAX_HUGEPAGES", "1") == "0":
        return
    if restarted() or "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        return  # already restarted (or the user preloads jemalloc)
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    env = dict(os.environ)
    jemalloc = find_jemalloc()
    if jemalloc:
        env["LD_PRELOAD"] = ":".join(t for t in (jemalloc, os.environ.get("LD_PRELOAD", "")) if t)
        env["MALLOC_CONF"] = ",".join(t for t in (JEMALLOC_CONF, os.environ.get("MALLOC_CONF", "")) if t)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (HUGE_PAGES, tunables) if t)  # marks the restart as done
    # sys.orig_argv keeps how Python was started (a script, `-m mrijax.cli`, the `mrijax` console script).
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def one_line(error: BaseException, paths=()) -> str:
    """The error's first line; when `paths` are given and the message names none of them, prefixed by the first
    (library messages usually start with the file already)."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if paths and not any(str(path) in message for path in paths):
        message = f"{paths[0]}: {message}"
    return message


# What bad input raises (a wrong flag or value, a missing or unreadable file): one 'error:' line, exit status 2.
BAD_INPUT = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


def run(main) -> None:
    """Call main(); bad input (`BAD_INPUT`) becomes one 'error:' line and exit status 2."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BAD_INPUT as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


def run_workers(count: int, target, *args) -> int:
    """Run target(*args, group=group) in `count` worker processes (`--workers`, `mrijax.collectives`) and wait.
    Bad input in a worker gives one 'error:' line (worker 0's) and exit status 2; Ctrl-C, KeyboardInterrupt here."""
    from mrijax import collectives

    codes = collectives.spawn(count, _worker, target, *args)
    if any(code == 2 for code in codes):
        return 2
    if all(code in (0, collectives.INTERRUPTED) for code in codes) and collectives.INTERRUPTED in codes:
        raise KeyboardInterrupt
    if any(codes):
        raise RuntimeError(f"training workers failed (exit codes {codes})")
    return 0


def _worker(group, target, *args) -> None:
    if group.index:  # worker 0 speaks for the group: the others' output would repeat it (errors still reach stderr)
        sys.stdout = open(os.devnull, "w")
    try:
        target(*args, group=group)
    except BAD_INPUT as e:
        if group.index == 0:
            print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


def output_root() -> Path:
    """Where default outputs go: the repository when running from a checkout (ckpt/runs, results/), else the
    current folder (an installed package must not write into site-packages)."""
    repo = Path(__file__).resolve().parents[2]
    return repo if (repo / "pyproject.toml").is_file() and (repo / "mrijax").is_dir() else Path.cwd()


def use_cpu_devices(n: int, distributed: bool = False) -> None:
    """Split the CPU into n JAX devices (before the backend starts), so a pmapped step runs one per core: XLA:CPU
    runs a step's elementwise work on one thread, and each device then runs its own share. Several devices or a
    multi-process run (`distributed`) need collectives, which XLA:CPU's classic runtime (requested by `mrijax.ops`
    under jax < 0.7) lacks, so that request is withdrawn: a pmapped step would abort."""
    if n < 1:
        raise ValueError(f"--devices must be >= 1, got {n}")
    if n != 1 or distributed:
        from mrijax import ops

        ops.use_classic_cpu_runtime(False)
    if n != 1:
        import jax

        jax.config.update("jax_num_cpu_devices", n)


def init_distributed(args) -> None:
    """Set the CPU device count, and join a multi-process run when --coordinator is given (CPU collectives over
    gloo)."""
    use_cpu_devices(args.devices, distributed=bool(args.coordinator))
    if not args.coordinator:
        return
    import jax

    if not 0 <= args.process_id < args.num_processes:
        raise ValueError(f"--process-id {args.process_id} must be in [0, {args.num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only; GPUs use NCCL
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
