"""Global intensity look-up table: the simplest contrast-synthesis baseline.

Each normalised source intensity is mapped to the mean normalised target intensity that voxels with that
source intensity had in the training brains. Any method that uses spatial context (MIMECS, the CAE) has
to beat this to show that context helps.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LUT:
    """Conditional mean of target given source, sampled at the centres of equal-width source bins."""
    bin_centres: np.ndarray  # (bins,) source intensity at each bin centre, increasing
    values: np.ndarray  # (bins,) mean target intensity of the training voxels in that bin

    def save(self, path) -> None:
        np.savez(path, bin_centres=self.bin_centres, values=self.values)

    @classmethod
    def load(cls, path) -> "LUT":
        with np.load(path) as f:
            return cls(bin_centres=f["bin_centres"], values=f["values"])


def fit_lut(sources, targets, masks, bins: int = 256, max_value: float | None = None) -> LUT:
    """Per-bin mean of target over all training brain voxels; empty bins are linearly interpolated.

    Bins cover [0, max_value]; max_value defaults to the largest training source intensity, and voxels
    beyond it (or below 0) count in the end bins.
    """
    if bins < 1:
        raise ValueError("bins must be >= 1")
    if not (len(sources) == len(targets) == len(masks)) or not sources:
        raise ValueError("need the same, non-zero number of sources, targets and masks")
    source_voxels, target_voxels = [], []
    for source, target, mask in zip(sources, targets, masks):
        source, target, mask = np.asarray(source), np.asarray(target), np.asarray(mask, dtype=bool)
        if source.shape != target.shape or source.shape != mask.shape:
            raise ValueError(f"shapes differ: {source.shape}, {target.shape}, {mask.shape}")
        source_voxels.append(source[mask].astype(np.float64))
        target_voxels.append(target[mask].astype(np.float64))
    source_voxels, target_voxels = np.concatenate(source_voxels), np.concatenate(target_voxels)
    if source_voxels.size == 0:
        raise ValueError("masks are empty: no training voxels")
    if max_value is None:
        max_value = float(source_voxels.max())
    if max_value <= 0:
        raise ValueError("max_value must be positive")
    width = max_value / bins
    index = np.clip((source_voxels / width).astype(np.int64), 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    sums = np.bincount(index, weights=target_voxels, minlength=bins)
    centres = (np.arange(bins) + 0.5) * width
    filled = counts > 0
    values = np.interp(centres, centres[filled], sums[filled] / counts[filled])
    return LUT(bin_centres=centres.astype(np.float32), values=values.astype(np.float32))


def apply_lut(lut: LUT, source, mask) -> np.ndarray:
    """Predicted target (float32), zero outside the mask.

    Interpolates linearly between bin centres (constant beyond the end bins), so the prediction does not
    step at bin edges.
    """
    source, mask = np.asarray(source), np.asarray(mask, dtype=bool)
    if source.shape != mask.shape:
        raise ValueError(f"shapes differ: source {source.shape}, mask {mask.shape}")
    prediction = np.zeros(source.shape, dtype=np.float32)
    prediction[mask] = np.interp(source[mask], lut.bin_centres, lut.values)
    return prediction
