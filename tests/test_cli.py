"""The command lines as users run them: outputs on the input's grid, per-file failures, one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import mrijax
from mrijax import checkpoint, cli
from mrijax.cli import infer

from conftest import write_synthetic_subject

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An exported (untrained) narrow model: the file path of the CLI does not depend on training."""
    return checkpoint.export_model(tmp_path_factory.mktemp("model") / "narrow",
                                   mrijax.init_variables("narrow", seed=4), {"source": "T1w", "target": "T2w"})


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
    return subprocess.run([sys.executable, str(REPO / "experiments" / script), *args], capture_output=True,
                          text=True, timeout=300, cwd=REPO)


@pytest.mark.parametrize("script,args,needle", [
    ("train.py", ["--variant", "huge"], "invalid choice"),
    ("train.py", ["--epochs", "0"], "--epochs must be >= 1"),
    ("train.py", ["--devices", "0"], "--devices must be >= 1"),
    ("train.py", ["--data", "/nonexistent/folder"], "/nonexistent/folder"),
    ("infer.py", ["-i", "/nonexistent.nii.gz"], "/nonexistent.nii.gz"),
    ("infer.py", ["-i", "x.nii.gz", "--method", "mimecs"], "--atlas"),
    ("infer.py", ["--dtype", "float16"], "invalid choice"),
    ("infer.py", ["--tile", "-2"], "--tile"),
])
def test_bad_flags_and_paths_give_one_line_errors(script, args, needle):
    result = _cli(script, *args)
    assert result.returncode != 0
    lines = [l for l in result.stderr.splitlines() if l.strip() and "WARNING" not in l]
    assert needle in lines[-1] and "Traceback" not in result.stderr


def test_train_devices_flag_splits_the_batch_over_cpu_devices(tmp_path, phantom_dataset):
    result = _cli("train.py", "--preset", "smoke", "--data", str(phantom_dataset), "--epochs", "1", "--devices", "2",
                  "--workdir", str(tmp_path / "run"), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "| 2 devices" in result.stdout
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_train_on_mismatched_grids_names_the_file(tmp_path):
    write_synthetic_subject(tmp_path, "sub-01", seed=1)
    paths = write_synthetic_subject(tmp_path, "sub-02", seed=2)
    other = write_synthetic_subject(tmp_path / "x", "sub-02", shape=(24, 28, 22), seed=2)["T2w"]
    paths["T2w"].write_bytes(other.read_bytes())
    result = _cli("train.py", "--data", str(tmp_path), "--preset", "smoke")
    assert result.returncode == 2
    assert "sub-02_T2w.nii.gz" in result.stderr.strip().splitlines()[-1]
    assert "different grids" in result.stderr


def test_malloc_restart_sets_the_allocator_once_and_can_be_turned_off(tmp_path):
    script = tmp_path / "show.py"
    script.write_text("import os, json; from mrijax import cli\n"
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


def test_sigterm_saves_the_training_state_like_ctrl_c(tmp_path, phantom_dataset):
    """A killed run (scheduler, `kill`) saves where it stopped, so --resume can continue it."""
    import os
    import signal
    import time

    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "experiments" / "train.py"), "--variant", "narrow",
                             "--preset", "smoke", "--data", str(phantom_dataset), "--epochs", "500",
                             "--workdir", str(workdir), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
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
