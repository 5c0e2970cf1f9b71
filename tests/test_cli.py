"""The command lines as users run them: outputs on the input's grid, per-file failures, one-line errors, flags
generated from TrainConfig, the `mrijax` console script and its experiments/*.py wrappers."""
import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import mrijax
from mrijax import checkpoint, cli
from mrijax.cli import bench, flags, infer, main as cli_main, train
from mrijax.config import PRESETS, TrainConfig

from conftest import expected_auto_form, ras_affine, synthetic_brain, write_canonical, write_synthetic_subject

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An exported (untrained) shallow model (the fewest layers, the least to compile): the file path of the CLI
    does not depend on training."""
    return checkpoint.export_model(tmp_path_factory.mktemp("model") / "shallow",
                                   mrijax.init_variables("shallow", seed=4), {"source": "T1w", "target": "T2w"})


def test_infer_writes_an_image_on_the_input_grid(tmp_path, tiny_model):
    paths = write_synthetic_subject(tmp_path / "in", "sub-01", axcodes="LPS", shape=(26, 30, 22))
    out = tmp_path / "out.nii.gz"
    assert infer.main(["-i", str(paths["T1w"]), "-o", str(out), "--checkpoint", str(tiny_model)]) == 0
    src, res = nib.load(paths["T1w"]), nib.load(out)
    assert res.shape == src.shape and np.allclose(res.affine, src.affine)
    assert nib.aff2axcodes(res.affine) == ("L", "P", "S")
    assert res.get_data_dtype() == np.float32
    assert b"T2w" in res.header["descrip"].tobytes()
    values, t1 = res.get_fdata(), src.get_fdata()
    assert np.all(values[t1 <= 0] == 0) and np.all(values[t1 > 0] > 0)


def _infer_with(tmp_path, model, flag, values):
    """infer.py on one synthetic T1w image once per value of `flag`; the output images, in that order."""
    paths = write_synthetic_subject(tmp_path / "in", "sub-01", shape=(26, 30, 22))
    images = []
    for value in values:
        out = tmp_path / f"{flag.strip('-')}-{value}.nii.gz"
        assert infer.main(["-i", str(paths["T1w"]), "-o", str(out), "--checkpoint", str(model), flag, value]) == 0
        images.append(nib.load(out).get_fdata())
    return images


def test_infer_bfloat16_is_close_to_float32_but_not_identical(tmp_path, tiny_model):
    """--dtype bfloat16 really runs in bf16 (the output differs) and stays within bf16 accuracy of f32."""
    f32, bf16 = _infer_with(tmp_path, tiny_model, "--dtype", ("float32", "bfloat16"))
    assert not np.array_equal(f32, bf16)
    assert np.max(np.abs(f32 - bf16)) < 2e-2 * np.max(np.abs(f32))


def test_infer_tile_flag_changes_memory_not_results(tmp_path, tiny_model):
    """--tile reaches the whole-volume pass: small tiles and one pass give the same image (to f32 rounding)."""
    tiled, whole = _infer_with(tmp_path, tiny_model, "--tile", ("8", "0"))
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-6)
    assert np.any(whole > 0)


def test_infer_averages_the_mirror_image_by_default_for_a_single_model(tmp_path, tiny_model):
    """infer's default for one model is flip averaging: the library's flip=True on the canonical array; --no-tta one
    pass. An ensemble's default is one pass per member."""
    paths = write_synthetic_subject(tmp_path / "in", "sub-01", axcodes="RAS", shape=(26, 30, 22))
    outputs = {}
    for extra in ([], ["--no-tta"]):
        out = tmp_path / f"out{len(extra)}.nii.gz"
        assert infer.main(["-i", str(paths["T1w"]), "-o", str(out), "--checkpoint", str(tiny_model), *extra]) == 0
        outputs[tuple(extra)] = nib.load(out).get_fdata()
    variables, _ = checkpoint.load_model(tiny_model)
    t1 = nib.load(paths["T1w"]).get_fdata()  # stored RAS: the canonical array itself
    np.testing.assert_allclose(outputs[()], mrijax.synthesize(variables, t1, flip=True), atol=1e-6)
    np.testing.assert_allclose(outputs[("--no-tta",)], mrijax.synthesize(variables, t1), atol=1e-6)
    assert np.abs(outputs[()] - outputs[("--no-tta",)]).max() > 1e-4
    # an ensemble (here the model twice, so its mean is the model's output) makes one pass unless --tta is given
    pair = checkpoint.export_ensemble(tmp_path / "pair", [tiny_model, tiny_model])
    for extra, flip in (([], False), (["--tta"], True)):
        out = tmp_path / f"pair{len(extra)}.nii.gz"
        assert infer.main(["-i", str(paths["T1w"]), "-o", str(out), "--checkpoint", str(pair), *extra]) == 0
        np.testing.assert_allclose(nib.load(out).get_fdata(), outputs[() if flip else ("--no-tta",)], atol=1e-6)


def test_infer_on_a_folder_reports_a_corrupt_file_and_writes_the_others(tmp_path, tiny_model, capsys):
    for i in (1, 2):
        write_synthetic_subject(tmp_path / "in", f"sub-0{i}", seed=i)
    bad = tmp_path / "in" / "sub-03" / "anat" / "sub-03_T1w.nii.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a nifti file")
    code = infer.main(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--checkpoint", str(tiny_model)])
    assert code == 1
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["sub-01_T1w_synth-T2w.nii.gz", "sub-02_T1w_synth-T2w.nii.gz"]
    err = capsys.readouterr().err
    assert "sub-03_T1w.nii.gz" in err and "1 of 3" in err


def test_infer_lut_method_from_an_atlas(tmp_path):
    for i in (1, 2):
        write_synthetic_subject(tmp_path / "atlas", f"sub-0{i}", seed=i)
    target = write_synthetic_subject(tmp_path / "in", "sub-09", seed=9)["T1w"]
    out = tmp_path / "lut.nii.gz"
    assert infer.main(["-i", str(target), "-o", str(out), "--method", "lut", "--atlas", str(tmp_path / "atlas")]) == 0
    assert nib.load(out).shape == nib.load(target).shape


def _cli(script, *args):
    # Without the allocator restart, which would import JAX a second time per run; the restart has its own tests
    # (test_console_script_and_wrapper_take_the_same_flags_through_the_allocator_restart and the malloc tests).
    return subprocess.run([sys.executable, str(REPO / "experiments" / script), *args], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env={**os.environ, "MRIJAX_HUGEPAGES": "0"})


@pytest.mark.parametrize("script,args,needle", [
    ("train.py", ["--variant", "huge"], "invalid choice"),
    ("train.py", ["--impl", "fast"], "invalid choice: 'fast'"),
    ("train.py", ["--epochs", "0"], "--epochs must be >= 1"),
    ("train.py", ["--devices", "0"], "--devices must be >= 1"),
    ("train.py", ["--data", "/nonexistent/folder"], "/nonexistent/folder"),
    ("infer.py", ["-i", "/nonexistent.nii.gz"], "/nonexistent.nii.gz"),
    ("infer.py", ["-i", "x.nii.gz", "--method", "mimecs"], "--atlas"),
    ("infer.py", ["--dtype", "float16"], "invalid choice"),
    ("infer.py", ["--tile", "-2"], "--tile"),
    ("phantom.py", ["--out", "new-folder", "--subjects", "0"], "--subjects must be >= 1"),
    ("ensemble.py", ["/nonexistent-model", "t1w-t2w-base", "-o", "never-written"], "no model at /nonexistent-model"),
])
def test_bad_flags_and_paths_give_one_line_errors(script, args, needle):
    result = _cli(script, *args)
    assert result.returncode != 0
    lines = [l for l in result.stderr.splitlines() if l.strip() and "WARNING" not in l]
    assert needle in lines[-1] and "Traceback" not in result.stderr


@pytest.mark.slow
def test_train_devices_flag_splits_the_batch_over_cpu_devices(tmp_path, phantom_dataset):
    result = _cli("train.py", "--variant", "shallow", "--preset", "smoke", "--data", str(phantom_dataset),
                  "--epochs", "1", "--devices", "2", "--workdir", str(tmp_path / "run"), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "| 2 devices" in result.stdout
    assert (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_train_on_mismatched_grids_names_the_file(tmp_path):
    write_synthetic_subject(tmp_path, "sub-01", seed=1)
    paths = write_synthetic_subject(tmp_path, "sub-02", seed=2)
    other = write_synthetic_subject(tmp_path / "x", "sub-02", shape=(24, 28, 22), seed=2)["T2w"]
    paths["T2w"].write_bytes(other.read_bytes())
    result = _cli("train.py", "--data", str(tmp_path), "--preset", "smoke")
    assert result.returncode == 2
    assert "sub-02_T2w.nii.gz" in result.stderr.strip().splitlines()[-1]
    assert "different grids" in result.stderr


# mrijax.cli loaded by its path, without the package (and so JAX): tune_malloc needs neither, and importing JAX
# before and after every restart would be most of these tests' time.
LOAD_CLI = ("import importlib.util\n"
            f"spec = importlib.util.spec_from_file_location('cli', {str(REPO / 'mrijax' / 'cli' / '__init__.py')!r})\n"
            "cli = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(cli)\n")


def test_malloc_restart_sets_the_allocator_once_and_can_be_turned_off(tmp_path):
    script = tmp_path / "show.py"
    script.write_text(LOAD_CLI + "import os, json\n"
                      "cli.tune_malloc()\n"
                      "maps = open('/proc/self/maps').read() if os.path.exists('/proc/self/maps') else ''\n"
                      "print(json.dumps({k: os.environ.get(k, '') for k in ('GLIBC_TUNABLES', 'MALLOC_CONF')}\n"
                      "                 | {'jemalloc_loaded': 'libjemalloc' in maps}))\n")
    keys = ("GLIBC_TUNABLES", "MRIJAX_HUGEPAGES", "MRIJAX_JEMALLOC", "MALLOC_CONF", "LD_PRELOAD")
    env = {k: v for k, v in __import__("os").environ.items() if k not in keys}
    run = lambda extra: json.loads(subprocess.run([sys.executable, str(script)], env={**env, **extra},
                                                  capture_output=True, text=True, timeout=60).stdout)
    off = run({"MRIJAX_HUGEPAGES": "0"})
    assert off == {"GLIBC_TUNABLES": "", "MALLOC_CONF": "", "jemalloc_loaded": False}
    if not sys.platform.startswith("linux"):
        return
    glibc = run({"MRIJAX_JEMALLOC": "0"})  # glibc tuned, no jemalloc
    assert glibc == {"GLIBC_TUNABLES": cli.HUGE_PAGES, "MALLOC_CONF": "", "jemalloc_loaded": False}
    # the user's own tunables come last, so they override ours
    assert run({"MRIJAX_JEMALLOC": "0", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == (
        cli.HUGE_PAGES + ":glibc.malloc.arena_max=2")
    missing = {**env, "MRIJAX_JEMALLOC": str(tmp_path / "missing.so")}
    shown = subprocess.run([sys.executable, str(script)], env=missing, capture_output=True, text=True, timeout=60)
    assert json.loads(shown.stdout)["jemalloc_loaded"] is False and "missing.so is not a file" in shown.stderr
    jemalloc = cli.find_jemalloc()
    if jemalloc:  # installed (.ci/run installs it): preloaded, with our settings first and the user's last
        shown = run({"MALLOC_CONF": "narenas:2"})
        assert shown["jemalloc_loaded"] is True
        assert shown["MALLOC_CONF"] == cli.JEMALLOC_CONF + ",narenas:2"


@pytest.mark.slow
def test_sigterm_saves_the_training_state_like_ctrl_c(tmp_path, phantom_dataset):
    """A killed run (scheduler, `kill`) saves where it stopped, so --resume can continue it."""
    import os
    import signal
    import time

    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "experiments" / "train.py"), "--variant", "shallow",
                             "--preset", "smoke", "--data", str(phantom_dataset), "--epochs", "500",
                             "--workdir", str(workdir), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "MRIJAX_HUGEPAGES": "0"})  # see _cli
    deadline = time.time() + 300
    while not (workdir / "metrics.jsonl").exists() or not (workdir / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: saved step" in out
    saved = int(out.split("interrupted: saved step")[1].split()[0])
    assert saved >= 3 and (workdir / "checkpoints" / str(saved)).is_dir()


MRIJAX = Path(sys.executable).parent / "mrijax"  # the console script of this environment


def test_console_script_lists_every_command_and_rejects_others():
    shown = subprocess.run([MRIJAX, "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0
    assert all(f"    {name} " in shown.stdout or f"    {name}\n" in shown.stdout for name in cli_main.COMMANDS)
    wrong = subprocess.run([MRIJAX, "trian"], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "invalid choice: 'trian'" in wrong.stderr


def test_commands_parse_their_flags_before_jax_loads():
    """The package and every command module import without JAX, so `--help` and bad flags answer at once and the
    allocator restart comes before the heavy imports; the library's names still load on first use."""
    code = ("import importlib, sys, mrijax\nfrom mrijax.cli import main, train\n"
            "for command in main.COMMANDS.values(): importlib.import_module(command.module)\n"
            "try: train.parse_args(['--variant', 'fast'])\nexcept SystemExit as e: print(e.code)\n"
            "print('jax' in sys.modules)\nmrijax.synthesize\nprint('jax' in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["2", "False", "True"], run.stderr


def test_console_script_and_wrapper_take_the_same_flags_through_the_allocator_restart():
    """Both re-exec themselves (tune_malloc) and must still see their flags: the same one-line error."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MRIJAX_HUGEPAGES", "LD_PRELOAD")}
    runs = [subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd="/") for cmd in (
        [MRIJAX, "train", "--dropout", "1.5"],
        [sys.executable, str(REPO / "experiments" / "train.py"), "--dropout", "1.5"])]
    for run in runs:
        assert run.returncode == 2
        assert run.stderr.strip().splitlines()[-1] == "error: --dropout must be in [0, 1), got 1.5"


def test_malloc_restart_keeps_a_module_command_line(tmp_path):
    """`python -m ...` (and console scripts) restart with the same command line: tune_malloc uses sys.orig_argv."""
    (tmp_path / "show_argv.py").write_text(LOAD_CLI + "import json, os, sys\ncli.tune_malloc()\n"
                                           "print(json.dumps([sys.argv[1:], os.environ.get('GLIBC_TUNABLES', '')]))\n")
    env = {**{k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "MRIJAX_HUGEPAGES")},
           "PYTHONPATH": str(tmp_path), "MRIJAX_JEMALLOC": "0"}
    shown = subprocess.run([sys.executable, "-m", "show_argv", "a", "--b=1"], capture_output=True, text=True,
                           timeout=60, env=env)
    argv, tunables = json.loads(shown.stdout)
    assert argv == ["a", "--b=1"]
    if sys.platform.startswith("linux"):
        assert tunables == cli.HUGE_PAGES


def test_every_train_config_field_is_a_flag_and_only_given_flags_override_the_preset():
    args = train.parse_args(["--preset", "smoke", "--lr", "0.5", "--no-flip", "--patch-step", "8", "--dtype",
                             "bfloat16"])
    assert all(getattr(args, name) is None for name in flags.config_fields()
               if name not in ("lr", "flip", "patch_step", "compute_dtype"))
    overrides = flags.config_overrides(args)
    assert overrides == {"lr": 0.5, "flip": False, "patch_step": 8, "compute_dtype": "bfloat16"}
    config = PRESETS[args.preset].replace(**overrides)
    assert config == dataclasses.replace(PRESETS["smoke"], lr=0.5, patch_step=8, compute_dtype="bfloat16")
    assert set(flags.config_fields()) == {f.name for f in dataclasses.fields(TrainConfig)
                                          if f.metadata.get("cli", True)}
    with pytest.raises(SystemExit):
        train.parse_args(["--dtype", "bf16"])
    with pytest.raises(ValueError, match="--epochs must be >= 1, got 0"):
        flags.config_overrides(train.parse_args(["--epochs", "0"]))


def test_flag_types_follow_the_field_types():
    @dataclasses.dataclass
    class Example:
        names: tuple[str, ...] = dataclasses.field(default=(), metadata={"help": "some names"})
        cap: int | None = None
        tag: str | None = dataclasses.field(default=None, metadata={"flag": "--label", "choices": ("a", "b")})
        on: bool = False

    import argparse
    import typing

    parser = argparse.ArgumentParser()
    hints = typing.get_type_hints(Example)
    for field in dataclasses.fields(Example):
        flag, kwargs = flags._argument(field, hints[field.name])
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args(["--names", "T1w,T2w,", "--cap", "3", "--label", "b", "--on"])
    assert (args.names, args.cap, args.tag, args.on) == (("T1w", "T2w"), 3, "b", True)
    assert parser.parse_args([]).on is None and parser.parse_args(["--no-on"]).on is False
    assert "some names" in parser.format_help() and "--cap CAP" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--label", "c"])


@pytest.mark.parametrize("module", ["train", "infer", "study", "bench"])
def test_dtype_takes_the_same_values_in_every_command(module):
    import importlib

    parse = importlib.import_module(f"mrijax.cli.{module}").parse_args
    required = ["--study", "width"] if module == "study" else []
    assert parse([*required, "--dtype", "bfloat16"]).compute_dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parse([*required, "--dtype", "bf16"])


def _write_with_zooms(path, zooms, axcodes="RAS", shape=(26, 30, 22)):
    return write_canonical(path, synthetic_brain(shape)["T1w"], ras_affine(shape, zooms), axcodes)


def test_voxel_size_far_from_the_training_data_gets_one_warning_line(tmp_path, tiny_model, capsys):
    thick = _write_with_zooms(tmp_path / "thick.nii.gz", (0.5, 0.5, 6.0), axcodes="ASL")
    fine = _write_with_zooms(tmp_path / "fine.nii.gz", (1.0, 1.2, 0.9))
    assert infer.canonical_zooms(thick) == (0.5, 0.5, 6.0)  # stored A, S, L: reported in R, A, S order
    for path in (thick, fine):
        assert infer.main(["-i", str(path), "-o", str(tmp_path / f"out-{path.name}"), "--checkpoint",
                           str(tiny_model)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {thick}: voxel size 0.5 x 0.5 x 6 mm is far from the model's training data "
                        "(1 x 1 x 1 mm); resample to ~1 mm (e.g. FreeSurfer mri_convert -vs 1 1 1, or ANTs/FSL) "
                        "for a reliable result"]
    assert (tmp_path / "out-thick.nii.gz").exists()  # a warning, not a refusal
    assert infer.voxel_size_warning(fine, (2.0, 2.0, 2.0), trained=(2.0, 2.0, 2.0)) is None  # model card's size
    assert infer.voxel_size_warning(fine, (1.0, 1.0, 1.0), trained=(3.0, 3.0, 3.0)) is not None


def _malformed(kind, path):
    """Write one kind of bad input a user meets."""
    import nibabel as nib

    arrays = {"2d": np.ones((20, 20), np.float32), "4d": np.ones((20, 20, 20, 3), np.float32),
              "rgb": np.ones((20, 20, 20, 3), np.float32), "inf": np.full((20, 20, 20), np.inf, np.float32)}
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4)), path)
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "rgb":
        rgb = np.zeros((20, 20, 20), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        nib.save(nib.Nifti1Image(rgb, np.eye(4)), path)
    else:
        nib.save(nib.Nifti1Image(arrays[kind], np.eye(4)), path)
    return path


@pytest.mark.parametrize("kind", ["2d", "4d", "rgb", "empty", "truncated", "inf"])
def test_malformed_input_is_one_error_line_naming_the_file_once(tmp_path, tiny_model, capsys, kind):
    bad = _malformed(kind, tmp_path / f"{kind}.nii.gz")
    assert infer.main(["-i", str(bad), "-o", str(tmp_path / "out.nii.gz"), "--checkpoint", str(tiny_model)]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].count(bad.name) == 1, err
    assert "Traceback" not in err and not (tmp_path / "out.nii.gz").exists()


def test_bench_pure_parts():
    info = cli.cpu_info("model name\t: Some Xeon\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile sse\n")
    assert info == {"cpu": "Some Xeon", "cpu_family_model": None,
                    "cpu_flags": ["amx_bf16", "amx_tile", "avx2", "avx512_bf16", "avx512f"]}
    zen3 = "vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: avx2\n"
    assert cli.cpu_info(zen3) == {"cpu": "AMD EPYC", "cpu_family_model": "25/1", "cpu_flags": ["avx2"]}
    done = bench.summary({"mrijax": [2.0, 3.0, 9.0], "pytorch_float32": [4.0, 3.0, 3.0]}, "x_per_s")
    assert done["ratio_over_pytorch_float32"] == [0.5, 1.0, 3.0] and done["median_ratio_over_pytorch_float32"] == 1.0


def test_bf16_note_only_where_bf16_has_no_units():
    """bf16 is emulated (slower than f32) on x86 CPUs with neither AVX-512 bf16 nor AMX: the commands say so."""
    avx2 = cli.cpu_info("model name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma\n")
    note = cli.slow_bf16_note("bfloat16", avx2)
    assert note.startswith("note: this CPU (AMD EPYC) has no bf16 units") and "float32" in note
    assert cli.slow_bf16_note("float32", avx2) is None
    for flags in ("avx2 avx512f avx512_bf16", "avx2 amx_bf16 amx_tile"):
        assert cli.slow_bf16_note("bfloat16", cli.cpu_info(f"model name\t: X\nflags\t\t: {flags}\n")) is None
    assert cli.slow_bf16_note("bfloat16", cli.cpu_info("Features\t: fp asimd bf16\n")) is None  # no x86 flags


def test_every_dtype_flag_gives_the_bf16_note_where_it_applies(monkeypatch, capsys):
    """The note comes from the --dtype flag itself, so every command that has it says it, once, and only for bf16;
    not again in the process `tune_malloc` re-starts (bench --hugepages), which parses the same flags again."""
    monkeypatch.setattr(cli, "cpu_info", lambda cpuinfo=None: {"cpu": "Old x86", "cpu_family_model": None,
                                                               "cpu_flags": ["avx2"]})
    monkeypatch.setenv("GLIBC_TUNABLES", "")
    for parse in (train.parse_args, infer.parse_args):
        assert flags.config_value(parse(["--dtype", "bfloat16"]), "compute_dtype") == "bfloat16"
        assert capsys.readouterr().err.count("note: this CPU (Old x86) has no bf16 units") == 1
        parse(["--dtype", "float32"])
        parse([])
        assert capsys.readouterr().err == ""
    monkeypatch.setenv("GLIBC_TUNABLES", cli.HUGE_PAGES)  # as tune_malloc marks the process it re-starts
    assert cli.restarted()
    train.parse_args(["--dtype", "bfloat16"])
    assert capsys.readouterr().err == ""


def test_bench_rounds_alternate_mrijax_and_the_reference(tmp_path):
    """--rounds N --compare: mrijax, then each PyTorch dtype, N times; a summary with per-round values and the
    median ratios. A stand-in reference (fixed speeds per dtype) makes the ratios checkable."""
    fake = tmp_path / "torch_cae.py"
    fake.write_text("import json, sys\ndtype = sys.argv[sys.argv.index('--dtype') + 1]\n"
                    "speed = {'fp32': 1e3, 'bf16': 4e3}[dtype]\n"
                    "print(json.dumps({'impl': 'fake-' + dtype, 'output_voxels_per_s': speed}))\n")
    run = subprocess.run([MRIJAX, "bench", "--mode", "infer", "--variant", "shallow", "--shape", "30", "30", "30",
                          "--repeats", "1", "--rounds", "2", "--compare"], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "MRIJAX_TORCH_CAE": str(fake)})
    assert run.returncode == 0, run.stderr[-2000:]
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["impl"].split("-")[0] for r in records[:-1]] == ["mrijax", "fake", "fake"] * 2
    total = records[-1]
    mine = [r["output_voxels_per_s"] for r in records[:-1] if r["impl"].startswith("mrijax")]
    assert total["rounds"] == 2 and total["pytorch_bfloat16"] == [4e3, 4e3] and total["setting"] == "auto/float32"
    # the form "auto" ran as, on this backend, in every mrijax record and the summary
    assert {r["form"] for r in records if "form" in r} == {expected_auto_form()} and "form" in records[0]
    assert total["mrijax"] == [round(v, 4) for v in mine]
    assert total["median_ratio_over_pytorch_float32"] == pytest.approx(statistics.median(mine) / 1e3, rel=1e-3)
    assert {"cpu", "cpu_family_model", "cpu_flags", "allocator", "loadavg_1min"} <= set(total)
    assert len(total["loadavg_1min"]) == 2
    # by default the allocator the other commands restart with (jemalloc, or glibc tuned without it)
    assert total["allocator"] != "glibc default"


@pytest.mark.slow
def test_evaluate_names_the_ssim_variant_of_its_table(tmp_path, tiny_model):
    from mrijax.cli import evaluate

    for i in (1, 2, 3):
        write_synthetic_subject(tmp_path / "data", f"sub-0{i}", seed=i)
    reports = {}
    for variant in ("paper", "brats"):
        out = tmp_path / variant
        assert evaluate.main(["--data", str(tmp_path / "data"), "--models", str(tiny_model), "--test-subjects",
                              "sub-03", "--atlas-subjects", "sub-01,sub-02", "--ssim", variant, "--out", str(out)]) == 0
        reports[variant] = json.loads((out / "report.json").read_text())
        assert reports[variant]["ssim"] == variant
        assert [r["method"] for r in reports[variant]["rows"]] == ["CAE-shallow", "LUT"]
        assert (out / "report.csv").read_text().splitlines()[0] == "subject,method,MAE,MSE,SNR,PSNR,SSIM,seconds"
    assert "BraTS" in (tmp_path / "brats" / "report.md").read_text()
    assert "BraTS" not in (tmp_path / "paper" / "report.md").read_text()
    for paper, brats in zip(reports["paper"]["rows"], reports["brats"]["rows"]):
        assert paper["MSE"] == brats["MSE"] and paper["SSIM"] != brats["SSIM"]
