"""Shared fixtures: the real data folder (skipped when absent), tiny synthetic subjects and a small phantom."""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# Most of the suite's time is XLA compiling many small programs once each, so the tests (and the CLI processes
# they start, which inherit the environment) compile without LLVM's optimisation passes: the same programs and
# numbers up to rounding, compiled in about half the time, run more slowly. Speed is measured by
# experiments/bench.py, never here. Set before JAX is imported; a level the caller sets wins.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()


def shared_data_path() -> Path:
    """$MRIJAX_SHARED_DATA, else <repo>/../shared/data/mri."""
    return Path(os.environ.get("MRIJAX_SHARED_DATA") or REPO.parent / "shared" / "data" / "mri")


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    path = shared_data_path()
    if not path.is_dir():
        pytest.skip(f"real MRI data not found at {path} (set MRIJAX_SHARED_DATA)")
    return path


def expected_auto_form() -> str:
    """The form "auto" must stand for here, from the backend and the jax version alone (not from `ops.resolve`):
    XLA's convolution off CPUs; on CPUs oneDNN's where jax still has XLA:CPU's classic runtime (< 0.7, which
    importing mrijax requests), else the channel-major Winograd products."""
    import jax

    from mrijax import ops

    if jax.default_backend() != "cpu":
        return "xla"
    return "onednn" if ops.OLD_JAX else "winograd"


def ras_affine(shape, zooms=(1.0, 1.0, 1.0)) -> np.ndarray:
    """RAS+ affine with the volume centre at world (0, 0, 0) plus an off-grid shift, like a scanner's."""
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.asarray(zooms) + np.array([0.3, -1.2, 2.5])
    return affine


def write_canonical(path, data_ras, affine_ras, axcodes="RAS", dtype=np.float32, codes=(1, 1)) -> Path:
    """Store a RAS+ array in the voxel order `axcodes` (e.g. "LAS", "LPS"), as a real scanner file would be."""
    image = nib.Nifti1Image(np.asarray(data_ras).astype(dtype), affine_ras)
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                                nib.orientations.axcodes2ornt(tuple(axcodes)))
    image = image.as_reoriented(transform)
    image.set_qform(image.affine, code=codes[0])
    image.set_sform(image.affine, code=codes[1])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def central_slab(shape, slices: int = 16):
    """The central `slices` axial slices of a volume of this shape, the whole plane (brain and background): keeps
    whole-volume passes over real or phantom subjects short."""
    centre = shape[2] // 2
    return np.s_[:, :, centre - slices // 2:centre + slices // 2]


def synthetic_brain(shape=(24, 28, 20), seed=0) -> dict[str, np.ndarray]:
    """An ellipsoidal 'brain' (RAS+ arrays) with a bright core and darker rim; T2w inverts the T1w contrast.

    The edge carries small negative values, as resampled skull-stripped scans do.
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt((grid ** 2).sum(axis=0) / 0.8)
    brain = radius < 1.0
    core = np.clip(1.2 - radius, 0, 1)
    noise = 0.02 * rng.standard_normal(shape)
    t1w = np.where(brain, 400 + 600 * core + 20 * noise, 0.0)
    t2w = np.where(brain, 900 - 500 * core + 20 * noise, 0.0)
    flair = np.where(brain, 300 + 200 * core + 20 * noise, 0.0)
    rim = (radius >= 1.0) & (radius < 1.08)
    for image in (t1w, t2w, flair):
        image[rim] = -3.0
    return {"T1w": t1w, "T2w": t2w, "FLAIR": flair, "mask": brain.astype(np.float32)}


def write_synthetic_subject(root, subject_id="sub-01", modalities=("T1w", "T2w"), mask=False, axcodes="RAS",
                            shape=(24, 28, 20), seed=0, suffix=".nii.gz") -> dict[str, Path]:
    """Write a tiny BIDS-like subject `root/<id>/anat/<id>_<modality><suffix>`; returns {modality: path}."""
    images = synthetic_brain(shape, seed)
    affine = ras_affine(shape)
    names = list(modalities) + (["mask"] if mask else [])
    anat = Path(root) / subject_id / "anat"
    return {name: write_canonical(anat / f"{subject_id}_{name}{suffix}", images[name], affine, axcodes)
            for name in names}


@pytest.fixture
def synthetic_subject_writer():
    """The `write_synthetic_subject` function, for tests in other modules."""
    return write_synthetic_subject


@pytest.fixture
def synthetic_dataset(tmp_path) -> Path:
    """Three small subjects in RAS, LAS and LPS, with T1w, T2w and FLAIR; the second has a mask file."""
    for index, axcodes in enumerate(("RAS", "LAS", "LPS")):
        write_synthetic_subject(tmp_path, f"sub-{index + 1:02d}", ("T1w", "T2w", "FLAIR"), mask=index == 1,
                                axcodes=axcodes, seed=index)
    return tmp_path


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory) -> Path:
    """Two simulated phantom subjects (2 mm), generated once per test session."""
    from mrijax.data import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("phantom"), n_subjects=2, seed=0)
