"""Brain mask and intensity normalisation: the only preprocessing the paper uses.

Inputs are skull-stripped and co-registered already; training and synthesis both go through `normalise`,
so a model always sees intensities on the same scale (brain mean = 1/3).
"""
from __future__ import annotations

import numpy as np

from mrijax.data.io import DataError, Volume

MASK_THRESHOLD = 0.5  # a given (possibly soft or interpolated) mask counts as brain above this


def _array(image: Volume | np.ndarray) -> np.ndarray:
    return image.data if isinstance(image, Volume) else np.asarray(image)


def _name(image: Volume | np.ndarray | None) -> str:
    return str(image.path) if isinstance(image, Volume) else "the input image"


def brain_mask(source: Volume | np.ndarray, target: Volume | np.ndarray | None = None,
               mask: Volume | np.ndarray | None = None) -> np.ndarray:
    """Boolean brain mask: the given mask (> 0.5) if any, else where source (and target) are strictly > 0.

    Strictly positive, because resampled skull-stripped images have small negative values at the brain edge
    that are not brain. Requiring both contrasts keeps voxels where either one was cut away.
    """
    if mask is not None:
        brain = _array(mask) > MASK_THRESHOLD
        described = _name(mask)
    else:
        brain = _array(source) > 0
        if target is not None:
            brain &= _array(target) > 0
        described = _name(source) if target is None else f"{_name(source)} and {_name(target)}"
    if not brain.any():
        raise DataError(f"{described}: the brain mask is empty; provide a non-empty mask or a skull-stripped "
                        "image with positive brain intensities")
    return brain


def normalise(volume: Volume | np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Skull-strip (zero outside `mask`) and divide by 3x the brain mean (the paper's normalisation).

    Dividing by three times the mean puts most brain intensities in [0, 1], the range of the sigmoid output.
    """
    data = _array(volume).astype(np.float32)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != data.shape:
        raise DataError(f"{_name(volume)}: mask shape {mask.shape} differs from image shape {data.shape}; "
                        "use a mask on the image's grid")
    brain_mean = float(data[mask].mean(dtype=np.float64)) if mask.any() else 0.0
    if not brain_mean > 0:
        raise DataError(f"{_name(volume)}: mean intensity inside the brain mask is {brain_mean:.4g}, not positive; "
                        "check that the mask covers the brain of this image")
    return np.where(mask, data / np.float32(3.0 * brain_mean), np.float32(0.0)).astype(np.float32)


def normalise_sources(volumes, mask: np.ndarray) -> np.ndarray:
    """What a model reads from one or several source contrasts on one grid: each normalised by its own brain mean
    over `mask`; (D, H, W) for one, stacked channels-last (D, H, W, C) for several (`Subject.inputs`)."""
    sources = [normalise(volume, mask) for volume in volumes]
    return sources[0] if len(sources) == 1 else np.stack(sources, axis=-1)
