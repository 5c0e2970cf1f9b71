"""What `pip install .` gives a user: the wheel carries the shipped models (and no training runs), and the
installed `mrijax` command synthesizes from any folder with the default model."""
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import write_synthetic_subject

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installed_outside_the_checkout_synthesizes_with_the_shipped_model(tmp_path):
    # Build the wheel from a copy of the checkout (setuptools writes build/ into the source tree), with a training
    # run in ckpt/runs/ that must stay out; build isolation takes setuptools from the package index, no dependencies.
    source = tmp_path / "src"
    top_level = {".git", "build", "dist", "results", "data", ".venv", "mrijax.egg-info"}
    skip = lambda folder, names: [n for n in names if n == "__pycache__" or (  # noqa: E731
        Path(folder) == REPO and (n in top_level or n.startswith(".ci-venv"))) or (
        Path(folder) == REPO / "ckpt" and n == "runs")]
    shutil.copytree(REPO, source, ignore=skip)
    run_dir = source / "ckpt" / "runs" / "base-quick" / "best"
    shutil.copytree(REPO / "ckpt" / "t1w-t2w-base", run_dir)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("mrijax-*.whl"))
    packaged = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("mrijax/ckpt/")}
    shipped = {"mrijax/" + p.relative_to(REPO).as_posix() for p in (REPO / "ckpt").rglob("*")
               if p.is_file() and p.relative_to(REPO / "ckpt").parts[0] != "runs"}
    assert packaged == shipped and any(n.endswith("/model.json") for n in packaged)

    # A fresh venv with mrijax from the wheel only; its dependencies (jax...) come from this environment's
    # site-packages through a .pth file (added after the venv's own, and without this environment's editable hook).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    own = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                         capture_output=True, text=True).stdout.strip()
    Path(own, "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, text=True, timeout=600)
    work = tmp_path / "elsewhere"
    t1w = write_synthetic_subject(work, "sub-01", shape=(40, 44, 36))["T1w"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MRIJAX_MODELS")}
    where = subprocess.run([python, "-c", "import mrijax.checkpoint as c; print(c.REPO_CKPT_DIR)"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=300)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout + where.stderr  # not the checkout's ckpt/
    run = subprocess.run([venv / "bin" / "mrijax", "infer", "-i", str(t1w), "-o", "out.nii.gz"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result, source = nib.load(work / "out.nii.gz"), nib.load(t1w)
    assert result.shape == source.shape and np.allclose(result.affine, source.affine)
    values = result.get_fdata()
    assert np.all(values[source.get_fdata() <= 0] == 0) and values.max() > 0
