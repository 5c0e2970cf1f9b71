"""Image-quality metrics for synthesised contrasts, computed on brain voxels only.

Everything is measured in normalised units: each volume is skull-stripped and divided by three times its
brain mean (`mrijax.data.preprocessing.normalise`), so brain intensities lie roughly in [0, 1]. That is
why `psnr` and `ssim` default to ``data_range=1.0``. Background voxels are excluded because they are zero
in both volumes after skull stripping and would otherwise inflate every score.
"""
from __future__ import annotations

import math

import numpy as np
from skimage.metrics import structural_similarity

DATA_RANGE = 1.0  # normalised units: brain intensities / (3 * brain mean) lie roughly in [0, 1]
METRIC_NAMES = ("mae", "mse", "snr", "psnr", "ssim")


def _validated(pred, target, mask):
    """Arrays as float64 / bool with equal shapes and a non-empty mask; bad inputs fail loudly, not as NaN."""
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    mask = np.asarray(mask)
    if pred.shape != target.shape or pred.shape != mask.shape:
        raise ValueError(f"shapes differ: pred {pred.shape}, target {target.shape}, mask {mask.shape}")
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("mask is empty: there are no brain voxels to evaluate")
    return pred, target, mask


def mae(pred, target, mask) -> float:
    """Mean absolute error over brain voxels."""
    pred, target, mask = _validated(pred, target, mask)
    return float(np.mean(np.abs(pred[mask] - target[mask])))


def mse(pred, target, mask) -> float:
    """Mean squared error over brain voxels (the quantity the CAE is trained to minimise)."""
    pred, target, mask = _validated(pred, target, mask)
    return float(np.mean((pred[mask] - target[mask]) ** 2))


def _decibels(signal_power: float, error_power: float) -> float:
    """10 log10(signal / error); a perfect prediction is +inf dB rather than a division error."""
    if error_power == 0.0:
        return math.inf
    return float(10.0 * np.log10(signal_power / error_power))


def snr(pred, target, mask) -> float:
    """SNR in dB as in the paper (eq. 10): 10 log10(mean(target[brain])^2 / MSE)."""
    pred, target, mask = _validated(pred, target, mask)
    return _decibels(float(np.mean(target[mask])) ** 2, mse(pred, target, mask))


def psnr(pred, target, mask, data_range: float = DATA_RANGE) -> float:
    """Peak SNR in dB, 10 log10(data_range^2 / MSE); data_range 1.0 = the normalised intensity range."""
    pred, target, mask = _validated(pred, target, mask)
    return _decibels(float(data_range) ** 2, mse(pred, target, mask))


def _bounding_box(mask, margin: int):
    """Slices of the mask's bounding box grown by `margin` (clipped), so SSIM windows at the edge see context."""
    coords = np.nonzero(mask)
    return tuple(slice(max(int(c.min()) - margin, 0), min(int(c.max()) + margin + 1, size))
                 for c, size in zip(coords, mask.shape))


def ssim(pred, target, mask, data_range: float = DATA_RANGE, win_size: int = 7) -> float:
    """3D SSIM (scikit-image) averaged over brain voxels, on normalised units (the paper's setting).

    Both volumes are zeroed outside the mask first, so values there never matter (they are background
    after skull stripping anyway); the SSIM map is computed on the mask's bounding box (plus half a window)
    for speed and averaged over the mask voxels only. The window shrinks to the largest odd size that fits
    tiny volumes.
    """
    pred, target, mask = _validated(pred, target, mask)
    box = _bounding_box(mask, win_size // 2)
    pred_box, target_box, mask_box = np.where(mask, pred, 0.0)[box], np.where(mask, target, 0.0)[box], mask[box]
    fit = min(win_size, *mask_box.shape)
    fit -= 1 - fit % 2  # largest odd window that fits
    if fit < 3:
        raise ValueError(f"mask bounding box {mask_box.shape} is too thin for a 3D SSIM window")
    _, ssim_map = structural_similarity(target_box, pred_box, win_size=fit, data_range=float(data_range),
                                        full=True)
    return float(np.mean(ssim_map[mask_box]))


def brats_normalise(image, mask, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """The BraTS missing-MRI challenge's scaling: clip to the image's own `low`-`high` percentiles over the brain
    (the lower bound no less than 0), map that range to [0, 1]; zero outside the mask."""
    image, _, mask = _validated(image, image, mask)
    lo, hi = np.percentile(image[mask], [low, high])
    lo = max(float(lo), 0.0)
    if not hi > lo:
        raise ValueError(f"brain intensities span no range between the {low} and {high} percentiles ({lo:.4g})")
    return np.where(mask, (np.clip(image, lo, hi) - lo) / (hi - lo), 0.0)


def ssim_brats(pred, target, mask, win_size: int = 7) -> float:
    """SSIM as the BraTS missing-MRI challenge scores it: each image scaled by `brats_normalise` (so a global
    intensity scale or offset of the prediction does not count, unlike `ssim`), then 3D SSIM with data range 1
    averaged over the whole volume, background included (zero in both, as in skull-stripped challenge data)."""
    pred, target, mask = _validated(pred, target, mask)
    fit = min(win_size, *mask.shape)
    fit -= 1 - fit % 2
    if fit < 3:
        raise ValueError(f"volume {mask.shape} is too thin for a 3D SSIM window")
    return float(structural_similarity(brats_normalise(target, mask), brats_normalise(pred, mask), win_size=fit,
                                       data_range=1.0))


SSIM_VARIANTS = {"paper": ssim, "brats": ssim_brats}
SSIM_NOTES = {  # what a table's SSIM column is, for the reports
    "paper": "SSIM: the paper's, 3D over brain voxels in normalised units (data range 1)",
    "brats": "SSIM: the BraTS missing-MRI challenge's, each image scaled by its own 0.5-99.5 brain percentiles "
             "(lower bound 0) to [0, 1], 3D over the whole volume",
}


def evaluate(pred, target, mask, ssim_variant: str = "paper") -> dict[str, float]:
    """All five metrics for one subject, keyed by the names in METRIC_NAMES; "ssim" is `SSIM_VARIANTS[ssim_variant]`."""
    if ssim_variant not in SSIM_VARIANTS:
        raise ValueError(f"unknown SSIM variant {ssim_variant!r}; choose one of {', '.join(SSIM_VARIANTS)}")
    return {"mae": mae(pred, target, mask), "mse": mse(pred, target, mask), "snr": snr(pred, target, mask),
            "psnr": psnr(pred, target, mask), "ssim": SSIM_VARIANTS[ssim_variant](pred, target, mask)}


def summarise(results: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """Per-metric (mean, population std) across subjects; every dict must have the same keys."""
    if not results:
        raise ValueError("no results to summarise")
    names = list(results[0])
    if any(set(r) != set(names) for r in results):
        raise ValueError("results have different metric names")
    return {name: (float(np.mean([r[name] for r in results])), float(np.std([r[name] for r in results])))
            for name in names}


def _cell(value) -> str:
    if isinstance(value, tuple):
        mean, std = value
        return f"{mean:.4g} ± {std:.2g}"
    return f"{value:.4g}"


def format_table(rows: dict[str, dict]) -> str:
    """Markdown table, one row per method: metric columns as 'mean ± std', plus 'seconds' if present."""
    if not rows:
        raise ValueError("no rows to format")
    columns = [name for name in METRIC_NAMES if any(name in r for r in rows.values())]
    columns += sorted({name for r in rows.values() for name in r} - set(columns) - {"seconds"})
    if any("seconds" in r for r in rows.values()):
        columns.append("seconds")
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, row in rows.items():
        lines.append(f"| {method} | " + " | ".join(_cell(row[c]) if c in row else "" for c in columns) + " |")
    return "\n".join(lines) + "\n"
