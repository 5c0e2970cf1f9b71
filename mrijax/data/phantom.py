"""Embedded default dataset: simulated brain MRI built offline from the MNI152 tissue maps nilearn ships.

THIS IS A SIMULATION, for demos, smoke tests and CI on a machine with no data. It lets the training and
synthesis commands run end to end out of the box; it says nothing about performance on real scans. Real
results come from real data.

Each simulated subject is the MNI152 (ICBM 2009a symmetric) anatomy, resampled by nilearn to `resolution`
mm, with
- a random smooth deformation (cubic-upsampled coarse noise displacement, a few mm) and a global scale;
- tissue fractions grey matter (GM) and white matter (WM) from the templates, CSF = brain - GM - WM;
- proton density, T1 and T2 per tissue at 3 T with subject-level jitter (see `TISSUES`);
- optional spherical lesions with long T1 and long T2 (MS-like: dark on T1w, bright on T2w and FLAIR);
- per contrast a smooth multiplicative bias field and Rician noise; skull-stripped (zero outside the brain).
Partial volumes mix tissue *signals* (not relaxation times), as in a real voxel.
With `random_contrasts` (synthetic pretraining data, beyond the paper) each subject gets its own protocol and
tissue: sequence parameters drawn over what scanners use (`random_sequences`; the T1w a spoiled gradient echo or
an inversion-prepared, MPRAGE-like sequence), relaxation times and densities jittered more widely, and bias and
noise levels drawn per subject, so pairs span many scanners' contrasts.

Sequences (steady-state signal equations, e.g. Bernstein, King & Zhou, "Handbook of MRI Pulse Sequences",
2004; Haacke et al., "Magnetic Resonance Imaging: Physical Principles and Sequence Design", 1999):
- T1w: spoiled gradient echo (FLASH), TR 20 ms, TE 4 ms, flip 25 deg:
  S = PD sin(a) (1 - E1) / (1 - cos(a) E1) exp(-TE/T2), E1 = exp(-TR/T1)  (T2* approximated by T2);
- T2w: spin echo, TR 5000 ms, TE 100 ms: S = PD (1 - exp(-TR/T1)) exp(-TE/T2);
- FLAIR: inversion recovery, TR 9000 ms, TI 2400 ms (nulls CSF), TE 120 ms:
  S = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

PHANTOM_VERSION = "phantom-v1"  # bump when the simulation changes, so caches regenerate


@dataclasses.dataclass(frozen=True)
class Tissue:
    proton_density: float  # relative to water
    t1_ms: float
    t2_ms: float


# 3 T values. GM/WM: Stanisz et al., "T1, T2 relaxation and magnetization transfer in tissue at 3T",
# MRM 54:507 (2005); CSF T1: Lu et al., JMRI 22:13 (2005) (~4.3 s), CSF T2 ~2 s (long-TE literature range);
# proton densities: typical water contents (WM ~0.69, GM ~0.8). Lesion: MS-like, T1 ~1.4x and T2 ~2.4x WM.
TISSUES: dict[str, Tissue] = {
    "csf": Tissue(1.00, 4300.0, 2000.0),
    "gm": Tissue(0.80, 1820.0, 99.0),
    "wm": Tissue(0.69, 1084.0, 69.0),
    "lesion": Tissue(0.80, 1500.0, 165.0),
}


@dataclasses.dataclass(frozen=True)
class Sequence:
    kind: str  # "spoiled_gre", "spin_echo" or "inversion_recovery"
    tr_ms: float
    te_ms: float
    flip_deg: float = 90.0
    ti_ms: float = 0.0


SEQUENCES: dict[str, Sequence] = {
    "T1w": Sequence("spoiled_gre", tr_ms=20.0, te_ms=4.0, flip_deg=25.0),
    "T2w": Sequence("spin_echo", tr_ms=5000.0, te_ms=100.0),
    "FLAIR": Sequence("inversion_recovery", tr_ms=9000.0, te_ms=120.0, ti_ms=2400.0),
}

RELAXATION_JITTER = 0.05  # subject-level relative s.d. of T1 and T2
DENSITY_JITTER = 0.03  # subject-level relative s.d. of proton density
DEFORMATION_MM = 3.0  # s.d. of the smooth displacement field
SCALE_JITTER = 0.04  # s.d. of the global (isotropic) head-size scale
BIAS_STRENGTH = 0.10  # s.d. of the log bias field
NOISE_FRACTION = 0.02  # Rician noise sigma relative to the mean brain signal
SCANNER_GAIN = 1000.0  # arbitrary intensity units, jittered per subject and contrast
# random_contrasts: wider tissue jitter and per-subject bias / noise levels (uniform ranges)
RANDOM_RELAXATION_JITTER = 0.12
RANDOM_DENSITY_JITTER = 0.06
RANDOM_BIAS_STRENGTH = (0.05, 0.3)
RANDOM_NOISE_FRACTION = (0.01, 0.05)


def signal(tissue: Tissue, sequence: Sequence) -> float:
    """Steady-state magnitude signal of one tissue for one sequence (module docstring equations)."""
    e1 = np.exp(-sequence.tr_ms / tissue.t1_ms)
    e2 = np.exp(-sequence.te_ms / tissue.t2_ms)
    if sequence.kind == "spoiled_gre":
        a = np.deg2rad(sequence.flip_deg)
        return float(tissue.proton_density * np.sin(a) * (1 - e1) / (1 - np.cos(a) * e1) * e2)
    if sequence.kind == "spin_echo":
        return float(tissue.proton_density * (1 - e1) * e2)
    if sequence.kind == "inversion_recovery":
        return float(tissue.proton_density * abs(1 - 2 * np.exp(-sequence.ti_ms / tissue.t1_ms) + e1) * e2)
    raise ValueError(f"unknown sequence kind {sequence.kind!r}")


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Average non-overlapping factor^3 blocks (zero-padding odd edges): exact, fast downsampling."""
    padded = np.pad(volume, [(0, -size % factor) for size in volume.shape])
    blocks = padded.reshape([n for size in padded.shape for n in (size // factor, factor)])
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32)


@functools.lru_cache(maxsize=2)
def mni152_anatomy(resolution: int = 2) -> dict[str, np.ndarray]:
    """GM and WM probability maps, brain fraction and affine of nilearn's bundled MNI152 (no network needed).

    Loaded at nilearn's native 1 mm and block-averaged to `resolution` mm (an integer), which is exact and
    much faster than resampling.
    """
    from nilearn import datasets  # slow import, only needed here

    factor = int(resolution)
    if factor != resolution or factor < 1:
        raise ValueError(f"resolution must be a positive integer number of mm, got {resolution}")
    brain = datasets.load_mni152_brain_mask(resolution=1)
    centre_offset = (factor - 1) / 2  # new voxel i is the centre of old voxels factor*i ... factor*i + factor-1
    block_affine = np.diag([factor, factor, factor, 1.0])
    block_affine[:3, 3] = centre_offset
    maps = {
        "gm": datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32),
        "wm": datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32),
        "brain": brain.get_fdata(dtype=np.float32),
    }
    anatomy = {name: _block_mean(volume, factor) for name, volume in maps.items()}
    anatomy["affine"] = brain.affine @ block_affine
    return anatomy


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: int) -> np.ndarray:
    """Unit-s.d. random field, smooth on the scale shape/coarse: coarse^3 Gaussian bumps with random weights.

    Separable (one small matrix product per axis), so it costs little more than writing the output.
    """
    field = rng.standard_normal((coarse,) * len(shape))
    for axis, size in enumerate(shape):
        knots = np.linspace(0.0, size - 1.0, coarse)
        width = (size - 1.0) / (coarse - 1.0)
        weights = np.exp(-0.5 * ((np.arange(size)[:, None] - knots[None, :]) / width) ** 2)
        field = np.moveaxis(np.tensordot(weights, field, axes=([1], [axis])), 0, axis)
    return (field / max(field.std(), 1e-6)).astype(np.float32)


def _deform(anatomy: dict, rng: np.random.Generator, resolution: float) -> dict[str, np.ndarray]:
    """Warp the template maps with a random global scale plus smooth displacement (linear interpolation)."""
    shape = anatomy["brain"].shape
    grid = np.indices(shape, dtype=np.float32)
    centre = np.array([np.mean(ix) for ix in np.nonzero(anatomy["brain"] > 0.5)], np.float32)
    scale = 1.0 + SCALE_JITTER * rng.standard_normal()
    coords = centre[:, None, None, None] + (grid - centre[:, None, None, None]) / scale
    for axis in range(3):
        coords[axis] += (DEFORMATION_MM / resolution) * _smooth_field(rng, shape, coarse=6)
    return {name: ndimage.map_coordinates(anatomy[name], coords, order=1, mode="constant", cval=0.0)
            for name in ("gm", "wm", "brain")}


def _lesion_map(wm: np.ndarray, rng: np.random.Generator, resolution: float) -> np.ndarray:
    """Fraction of each voxel inside 1-4 soft-edged spheres (radius 2-5 mm) centred in white matter."""
    lesion = np.zeros(wm.shape, np.float32)
    candidates = np.argwhere(wm > 0.9)
    if not len(candidates):
        return lesion
    for _ in range(rng.integers(1, 5)):
        centre = candidates[rng.integers(len(candidates))]
        radius = rng.uniform(2.0, 5.0) / resolution
        reach = int(np.ceil(radius)) + 1
        lo = np.maximum(centre - reach, 0)
        hi = np.minimum(centre + reach + 1, wm.shape)
        box = np.indices(hi - lo, dtype=np.float32) + (lo - centre)[:, None, None, None]
        inside = np.clip(radius + 0.5 - np.sqrt((box ** 2).sum(axis=0)), 0.0, 1.0)
        region = tuple(slice(a, b) for a, b in zip(lo, hi))
        lesion[region] = np.maximum(lesion[region], inside)
    return lesion


def _jitter(tissue: Tissue, rng: np.random.Generator, density: float = DENSITY_JITTER,
            relaxation: float = RELAXATION_JITTER) -> Tissue:
    return Tissue(tissue.proton_density * (1 + density * rng.standard_normal()),
                  tissue.t1_ms * (1 + relaxation * rng.standard_normal()),
                  tissue.t2_ms * (1 + relaxation * rng.standard_normal()))


def random_sequences(rng: np.random.Generator) -> dict[str, Sequence]:
    """One subject's protocol, drawn over common clinical and research settings (T1w half the time MPRAGE-like:
    inversion-prepared, TI 950-1150 ms, where white matter > grey matter > CSF)."""
    if rng.random() < 0.5:
        t1w = Sequence("spoiled_gre", tr_ms=rng.uniform(8.0, 30.0), te_ms=rng.uniform(2.0, 6.0),
                       flip_deg=rng.uniform(8.0, 40.0))
    else:
        t1w = Sequence("inversion_recovery", tr_ms=rng.uniform(2000.0, 2300.0), te_ms=rng.uniform(2.0, 5.0),
                       ti_ms=rng.uniform(950.0, 1150.0))
    return {"T1w": t1w,
            "T2w": Sequence("spin_echo", tr_ms=rng.uniform(2500.0, 8000.0), te_ms=rng.uniform(70.0, 140.0)),
            "FLAIR": Sequence("inversion_recovery", tr_ms=rng.uniform(8000.0, 11000.0),
                              te_ms=rng.uniform(80.0, 140.0), ti_ms=rng.uniform(2200.0, 2800.0))}


def simulate_subject(seed: int = 0, index: int = 0, resolution: int = 2, lesions: bool = True,
                     random_contrasts: bool = False) -> dict:
    """One simulated subject: images {"T1w", "T2w", "FLAIR"}, bool "mask", tissue "fractions", "affine",
    "sequences".

    Deterministic in (seed, index). Arrays are RAS+ on the MNI152 grid at `resolution` mm (an integer; 1 or 2 for
    training, 3-4 for fast tests). `random_contrasts` draws the subject's protocol, tissue and bias / noise levels widely (module docstring).
    """
    rng = np.random.default_rng([seed, index])
    # A stream of its own, so the fixed-protocol subjects stay what they were.
    protocol_rng = np.random.default_rng([seed, index, 1]) if random_contrasts else None
    anatomy = mni152_anatomy(resolution)
    warped = _deform(anatomy, rng, resolution)
    mask = warped["brain"] > 0.5
    gm = np.clip(warped["gm"], 0, 1) * mask
    wm = np.clip(warped["wm"], 0, 1) * mask
    overfull = np.maximum(gm + wm, 1.0)  # templates may sum slightly above 1
    gm, wm = gm / overfull, wm / overfull
    csf = np.clip(1.0 - gm - wm, 0, 1) * mask
    lesion = _lesion_map(wm, rng, resolution) * mask if lesions else np.zeros_like(gm)
    fractions = {"csf": csf * (1 - lesion), "gm": gm * (1 - lesion), "wm": wm * (1 - lesion), "lesion": lesion}
    if protocol_rng is None:
        sequences, bias_strength, noise_fraction = SEQUENCES, BIAS_STRENGTH, NOISE_FRACTION
        tissues = {name: _jitter(tissue, rng) for name, tissue in TISSUES.items()}
    else:
        sequences = random_sequences(protocol_rng)
        bias_strength = protocol_rng.uniform(*RANDOM_BIAS_STRENGTH)
        noise_fraction = protocol_rng.uniform(*RANDOM_NOISE_FRACTION)
        tissues = {name: _jitter(tissue, protocol_rng, RANDOM_DENSITY_JITTER, RANDOM_RELAXATION_JITTER)
                   for name, tissue in TISSUES.items()}

    images = {}
    for contrast, sequence in sequences.items():
        clean = sum(fractions[name] * signal(tissues[name], sequence) for name in fractions)
        biased = clean * np.exp(bias_strength * _smooth_field(rng, mask.shape, coarse=4))
        sigma = noise_fraction * float(biased[mask].mean())
        noisy = np.hypot(biased + sigma * rng.standard_normal(mask.shape, np.float32),
                         sigma * rng.standard_normal(mask.shape, np.float32))  # Rician magnitude
        gain = SCANNER_GAIN * (1 + 0.2 * rng.standard_normal()) / float(clean[mask].mean())
        images[contrast] = (noisy * mask * abs(gain)).astype(np.float32)
    return {"images": images, "mask": mask, "fractions": fractions, "affine": anatomy["affine"],
            "sequences": sequences}


def _write(data: np.ndarray, affine: np.ndarray, path: Path, flip_x: bool) -> None:
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=2)
    image.set_sform(affine, code=2)
    if flip_x:  # store as LAS, like many real scans, so readers must reorient
        image = image.as_reoriented(np.array([[0, -1], [1, 1], [2, 1]]))
    image.header["descrip"] = b"mrijax phantom: SIMULATED data, not a real scan"
    nib.save(image, path)


def make_phantom_dataset(root: str | Path, n_subjects: int = 6, seed: int = 0, resolution: int = 2,
                         lesions: bool = True, random_contrasts: bool = False) -> Path:
    """Write a simulated BIDS-like dataset: `root/sub-phantomNN/anat/sub-phantomNN_{T1w,T2w,FLAIR,mask}.nii.gz`.

    A SIMULATION for demos and tests (see the module docstring); real results come from real data.
    Odd-numbered subjects are stored in LAS orientation, the others in RAS. Deterministic per `seed`.
    """
    root = Path(root)
    for index in range(n_subjects):
        subject = simulate_subject(seed, index, resolution, lesions, random_contrasts)
        subject_id = f"sub-phantom{index + 1:02d}"
        anat = root / subject_id / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        flip_x = index % 2 == 0  # sub-phantom01, 03, ...
        for contrast, image in subject["images"].items():
            _write(image, subject["affine"], anat / f"{subject_id}_{contrast}.nii.gz", flip_x)
        _write(subject["mask"].astype(np.uint8), subject["affine"], anat / f"{subject_id}_mask.nii.gz", flip_x)
    (root / "README.md").write_text(
        "# mrijax phantom dataset (SIMULATED)\n\n"
        f"{n_subjects} simulated subjects (seed {seed}, {resolution} mm, lesions={lesions}, "
        f"random_contrasts={random_contrasts}) generated by "
        "`mrijax.data.phantom.make_phantom_dataset` from nilearn's MNI152 tissue maps with signal equations, "
        "random deformations, bias fields and Rician noise. For demos and tests only: results on this data say "
        "nothing about real scans.\n")
    return root


def default_phantom_dir() -> Path:
    """Cache folder of the default phantom: $MRIJAX_DATA_HOME (else ~/.cache/mrijax) / phantom-v1."""
    home = os.environ.get("MRIJAX_DATA_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "mrijax"
    return base / PHANTOM_VERSION


def ensure_phantom_dataset(root: str | Path | None = None, **options) -> Path:
    """Path of the phantom dataset, generating it once (in a temp folder renamed into place, never half-written).

    `options` go to `make_phantom_dataset`; an existing `root` is reused as is.
    """
    root = Path(root) if root is not None else default_phantom_dir()
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    staging.chmod(0o755)
    try:
        make_phantom_dataset(staging, **options)
        try:
            staging.rename(root)  # atomic; fails if another process finished first
        except OSError:
            if not root.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
