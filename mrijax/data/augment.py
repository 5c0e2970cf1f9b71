"""Random, realistic changes of the SOURCE contrast of a training patch (SynthSR-style domain randomisation).

Why: the same T1-weighted protocol looks different on every scanner. The intensity response differs (a
different tissue contrast even after the brain-mean normalisation), the receive coils leave a smooth
multiplicative bias field, the noise level depends on field strength and acquisition time, and clinical
scans are often acquired with 3-5 mm slices instead of 1 mm. A model trained on one site's images learns
these particulars as if they were anatomy. Changing them at random in the source patch, while the target
patch stays untouched, asks the network for a mapping to the same T2w image whatever the intensity curve,
bias field, noise and resolution of the T1w input, so one model carries over to other scanners.

`augment_source` works on one normalised source patch (brain mean about 1/3, background exactly 0; the
brain is where the patch is non-zero) and applies, each with its own probability and in acquisition order:

1. intensity curve: a gamma x -> c (x / c)^g around the brain mean c = 1/3, and/or a random increasing
   piecewise-linear curve through a few control points on [0, brain max] that also keeps c fixed; both are
   monotone increasing, so the order of tissue intensities is kept and only the contrast between them moves;
2. contrast and brightness: x -> a x + b, clipped at 0;
3. bias field: exp of a random polynomial (linear and quadratic terms) of the voxel coordinates, scaled so
   the field stays within [1 / (1 + r), 1 + r] over a cube of `bias_extent` voxels around the patch centre;
4. resolution: either an isotropic gaussian blur or a thick-slice simulation along one random axis
   (`thick_slices`: average over blocks of k voxels, then linear interpolation back to the grid);
5. gaussian noise.

Beside the source contrast, `strip_edge` varies the skull stripping: brain masks from different tools and sites
differ by a few voxels at the brain edge (one includes a rim of CSF, another cuts into the cortex), so where the
mask ends says nothing reliable about the T2w intensity just inside it. With probability `strip_prob` a training
sample's brain is eroded by a few voxels, in source, target and mask alike (as if its mask had been drawn
tighter), so the network cannot learn one site's mask edge as anatomy.

Each transform works on the brain values clipped at 0 and brain voxels come out finite and >= 0; the
background is set back to exactly 0 at the end. A patch that draws no transform comes back unchanged. All
randomness comes from the `rng` passed in, so a generator seeded from (seed, epoch, record) reproduces it.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

BRAIN_MEAN = 1.0 / 3.0  # normalised brain mean (`preprocessing.normalise`): the fixed point of the intensity curves


def _check_probability(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"AugmentConfig.{name} must be a probability in [0, 1], got {value!r}")


def _check_range(name: str, value, minimum: float | None = None, exclusive: bool = False,
                 maximum: float | None = None) -> None:
    ok = (isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
          and all(math.isfinite(v) for v in value))
    if not ok:
        raise ValueError(f"AugmentConfig.{name} must be a (low, high) pair of finite numbers, got {value!r}")
    low, high = value
    if low > high:
        raise ValueError(f"AugmentConfig.{name} must be ordered (low <= high), got {value!r}")
    if minimum is not None and (low <= minimum if exclusive else low < minimum):
        bound = ">" if exclusive else ">="
        raise ValueError(f"AugmentConfig.{name} must be {bound} {minimum}, got {value!r}")
    if maximum is not None and high >= maximum:
        raise ValueError(f"AugmentConfig.{name} must be < {maximum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and parameter ranges of `augment_source`; ranges are (low, high), drawn uniformly.

    The defaults are a moderate "on" setting: each family is applied to about half of the patches.
    """

    gamma_prob: float = 0.5
    gamma_range: tuple[float, float] = (1 / 1.5, 1.5)  # g, drawn log-uniformly: x -> c (x / c)^g
    curve_prob: float = 0.25
    curve_points: int = 4  # interior control points of the piecewise-linear curve
    curve_slope_range: tuple[float, float] = (1 / 1.5, 1.5)  # relative segment slopes, drawn log-uniformly
    contrast_prob: float = 0.5
    contrast_range: tuple[float, float] = (0.85, 1.15)  # a in x -> a x + b
    brightness_range: tuple[float, float] = (-0.05, 0.05)  # b in x -> a x + b
    bias_prob: float = 0.5
    bias_range: tuple[float, float] = (0.0, 0.2)  # r: the field stays in [1 / (1 + r), 1 + r] ...
    bias_extent: float = 70.0  # ... over a cube of this many voxels around the patch centre
    noise_prob: float = 0.5
    noise_range: tuple[float, float] = (0.0, 0.03)  # gaussian noise s.d., normalised units
    blur_prob: float = 0.25  # blur and thick slices exclude each other: blur_prob + thick_slice_prob <= 1
    blur_range: tuple[float, float] = (0.0, 1.0)  # gaussian s.d. in voxels
    thick_slice_prob: float = 0.25
    thick_slice_factors: tuple[int, ...] = (2, 3, 4)  # voxels per simulated slice, one drawn uniformly
    strip_prob: float = 0.0  # skull-strip variation (`strip_edge`), on the whole sample: off in "all"
    strip_range: tuple[int, int] = (1, 3)  # voxels of erosion, an integer drawn uniformly (both ends included)

    def __post_init__(self):
        for field in ("gamma_prob", "curve_prob", "contrast_prob", "bias_prob", "noise_prob", "blur_prob",
                      "thick_slice_prob", "strip_prob"):
            _check_probability(field, getattr(self, field))
        if self.blur_prob + self.thick_slice_prob > 1.0:
            raise ValueError(f"AugmentConfig.blur_prob + thick_slice_prob must be <= 1 (one resolution change per "
                             f"patch), got {self.blur_prob} + {self.thick_slice_prob}")
        _check_range("gamma_range", self.gamma_range, minimum=0.0, exclusive=True)
        _check_range("curve_slope_range", self.curve_slope_range, minimum=0.0, exclusive=True)
        if not (isinstance(self.curve_points, int) and self.curve_points >= 1):
            raise ValueError(f"AugmentConfig.curve_points must be an integer >= 1, got {self.curve_points!r}")
        _check_range("contrast_range", self.contrast_range, minimum=0.0, exclusive=True)
        _check_range("brightness_range", self.brightness_range)
        _check_range("bias_range", self.bias_range, minimum=0.0)
        if not (isinstance(self.bias_extent, (int, float)) and math.isfinite(self.bias_extent)
                and self.bias_extent > 0):
            raise ValueError(f"AugmentConfig.bias_extent must be a positive number of voxels, got {self.bias_extent!r}")
        _check_range("noise_range", self.noise_range, minimum=0.0)
        _check_range("blur_range", self.blur_range, minimum=0.0)
        factors = self.thick_slice_factors
        if not (isinstance(factors, tuple) and factors and all(isinstance(k, int) and k >= 1 for k in factors)):
            raise ValueError(f"AugmentConfig.thick_slice_factors must be a non-empty tuple of integers >= 1, "
                             f"got {factors!r}")
        _check_range("strip_range", self.strip_range, minimum=1)
        if not all(isinstance(v, int) for v in self.strip_range):
            raise ValueError(f"AugmentConfig.strip_range must hold integers (voxels), got {self.strip_range!r}")


def augment_config(name: str) -> AugmentConfig | None:
    """The augmentation a training config names (`TrainConfig.augment`): none; all source-contrast families; only
    the changes of resolution (blur or thick slices, with the same probabilities as in "all"), which imitate
    clinical 2D scans without changing the intensity relation the network learns; or only the skull-strip
    variation (`strip_edge` on half of the samples), the source contrast untouched."""
    if name == "none":
        return None
    if name == "all":
        return AugmentConfig()
    no_contrast = dict(gamma_prob=0.0, curve_prob=0.0, contrast_prob=0.0, bias_prob=0.0, noise_prob=0.0)
    if name == "resolution":
        return AugmentConfig(**no_contrast)
    if name == "strip":
        return AugmentConfig(**no_contrast, blur_prob=0.0, thick_slice_prob=0.0, strip_prob=0.5)
    raise ValueError(f"augment {name!r}: choose none, all, resolution or strip")


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float], size=None):
    low, high = bounds
    return np.exp(rng.uniform(math.log(low), math.log(high), size))


def _gamma(x: np.ndarray, g: float) -> np.ndarray:
    """c (x / c)^g for x >= 0: monotone increasing, 0 -> 0 and c -> c."""
    c = np.float32(BRAIN_MEAN)
    return c * np.power(x / c, np.float32(g))


def _piecewise_curve(x: np.ndarray, brain: np.ndarray, rng: np.random.Generator, points: int,
                     slope_range: tuple[float, float]) -> np.ndarray:
    """Random increasing piecewise-linear curve through 0, with `points` interior knots on [0, brain max]."""
    top = float(x[brain].max())
    slopes = _log_uniform(rng, slope_range, points + 1)
    if not top > 0:
        return x
    knots = np.linspace(0.0, top, points + 2)
    values = np.concatenate([[0.0], np.cumsum(slopes * (knots[1] - knots[0]))])
    pivot = min(BRAIN_MEAN, top)  # keep the brain mean where it is (or the top, in a dark patch)
    values *= pivot / np.interp(pivot, knots, values)
    return np.interp(x, knots, values).astype(np.float32)


def _bias_field(shape: tuple[int, ...], rng: np.random.Generator, strength: float, extent: float) -> np.ndarray:
    """exp(p) with p a random linear + quadratic polynomial of coordinates u = (i - centre) / (extent / 2).

    The coefficients' absolute values sum to `strength`, so |p| <= strength wherever all |u| <= 1.
    """
    coefficients = rng.uniform(-1.0, 1.0, 9)
    total = np.abs(coefficients).sum()
    coefficients = coefficients * (strength / total) if total > 0 else coefficients * 0.0
    u = [((np.arange(n, dtype=np.float32) - (n - 1) / 2) / np.float32(extent / 2)).reshape(
        [-1 if axis == a else 1 for a in range(3)]) for axis, n in enumerate(shape)]
    linear, square, cross = coefficients[:3], coefficients[3:6], coefficients[6:]
    log_field = np.zeros(shape, np.float32)
    for axis in range(3):
        log_field += np.float32(linear[axis]) * u[axis] + np.float32(square[axis]) * u[axis] ** 2
    for (a, b), c in zip(((0, 1), (0, 2), (1, 2)), cross):
        log_field += np.float32(c) * (u[a] * u[b])
    return np.exp(log_field, out=log_field)


def thick_slices(volume: np.ndarray, axis: int, factor: int, offset: int = 0) -> np.ndarray:
    """Simulate slices `factor` voxels thick along `axis`: block averages, linearly interpolated back.

    Blocks are the runs of voxels i with equal (i + offset) // factor, so with 0 < offset < factor the
    first block is a partial one (as is the last, when the length does not divide). Each block mean sits at
    its block's centre; voxels between two centres interpolate linearly, voxels beyond the outer centres take
    the outer block's mean. A linear ramp along `axis` thus comes back unchanged between the outer centres.
    """
    if not (isinstance(factor, (int, np.integer)) and factor >= 1 and 0 <= offset < factor):
        raise ValueError(f"thick_slices needs factor >= 1 and 0 <= offset < factor, got {factor}, {offset}")
    data = np.moveaxis(np.asarray(volume), axis, 0)
    n = data.shape[0]
    starts = np.arange(0, n + offset, factor) - offset
    starts[0] = 0
    starts = starts[starts < n]
    ends = np.append(starts[1:], n)
    dtype = data.dtype if np.issubdtype(data.dtype, np.floating) else np.float32
    counts = (ends - starts).astype(dtype).reshape((-1,) + (1,) * (data.ndim - 1))
    means = np.add.reduceat(data, starts, axis=0, dtype=dtype) / counts
    centres = (starts + ends - 1) / 2.0
    position = np.arange(n, dtype=np.float64)
    upper = np.clip(np.searchsorted(centres, position, side="right"), 1, len(centres) - 1) if len(centres) > 1 \
        else np.zeros(n, dtype=np.intp)
    lower = np.maximum(upper - 1, 0)
    span = centres[upper] - centres[lower]
    weight = np.clip(np.divide(position - centres[lower], span, out=np.zeros(n), where=span > 0), 0.0, 1.0)
    weight = weight.astype(dtype).reshape((-1,) + (1,) * (data.ndim - 1))
    result = means[lower] * (1 - weight) + means[upper] * weight
    return np.moveaxis(result, 0, axis)


def augment_source(patch: np.ndarray, rng: np.random.Generator, config: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """A randomly changed copy of a normalised source patch (D, H, W) or (D, H, W, 1); float32, same shape.

    The brain is where `patch` is non-zero; every transform is applied with its own probability (see the
    module docstring) and the background stays exactly 0. Once a transform is drawn, brain values are finite
    and >= 0 (negative ones, which a given mask can leave at the brain edge, become 0); when none is drawn
    (always, with all probabilities 0) the result equals the input. The input is not modified, and the
    same `rng` state gives the same output.
    """
    patch = np.asarray(patch)
    channel = patch.ndim == 4
    if not (patch.ndim == 3 or (channel and patch.shape[-1] == 1)):
        raise ValueError(f"augment_source expects a (D, H, W) or (D, H, W, 1) patch, got shape {patch.shape}")
    x = np.array(patch[..., 0] if channel else patch, dtype=np.float32)  # always a copy
    brain = x != 0
    if brain.any():
        x = _augment(x, brain, rng, config)
    x = np.where(brain, x, np.float32(0.0))  # background exactly +0.0
    return x[..., None] if channel else x


def _augment(x: np.ndarray, brain: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """The transforms in acquisition order, each on max(x, 0) inside the brain; x itself when none is drawn."""
    zero = np.float32(0.0)
    original = x

    def clean(values: np.ndarray) -> np.ndarray:  # negative brain values (edge of a given mask) and background -> 0
        return np.where(brain, np.maximum(values, zero), zero)

    if rng.uniform() < config.gamma_prob:
        x = _gamma(clean(x), float(_log_uniform(rng, config.gamma_range)))
    if rng.uniform() < config.curve_prob:
        x = _piecewise_curve(clean(x), brain, rng, config.curve_points, config.curve_slope_range)
    if rng.uniform() < config.contrast_prob:
        a, b = rng.uniform(*config.contrast_range), rng.uniform(*config.brightness_range)
        x = np.float32(a) * clean(x) + np.float32(b)
    if rng.uniform() < config.bias_prob:
        strength = math.log1p(rng.uniform(*config.bias_range))
        x = clean(x) * _bias_field(x.shape, rng, strength, config.bias_extent)
    resolution = rng.uniform()
    if resolution < config.thick_slice_prob:
        factor = int(rng.choice(config.thick_slice_factors))
        axis, offset = int(rng.integers(3)), int(rng.integers(factor))
        x = thick_slices(clean(x), axis, factor, offset)
    elif resolution < config.thick_slice_prob + config.blur_prob:
        x = ndimage.gaussian_filter(clean(x), rng.uniform(*config.blur_range))
    if rng.uniform() < config.noise_prob:
        sigma = np.float32(rng.uniform(*config.noise_range))
        x = clean(x) + sigma * rng.standard_normal(x.shape, dtype=np.float32)
    return x if x is original else clean(x)


def strip_edge(sample: dict, radius: int) -> dict:
    """The training sample as if its brain mask had been drawn `radius` voxels tighter.

    `sample` holds "source" (D, H, W, C), and "target" and "mask" (d, h, w, 1), the output block centred in
    the input block (as `patches.extract_patch` cuts them). The brain of the source block (voxels where any
    source is non-zero) is eroded `radius` times with the 6-neighbourhood; voxels on the block's faces count
    as having brain beyond them (a block edge is not a brain edge). Source, target and mask are set to 0
    where the eroded brain is not; everything else is kept bit for bit. Returns a new dict.
    """
    source, target, mask = sample["source"], sample["target"], sample["mask"]
    brain = np.any(source != 0, axis=-1)
    kept = ndimage.binary_erosion(brain, ndimage.generate_binary_structure(3, 1), iterations=int(radius),
                                  border_value=1)
    start = [(n - m) // 2 for n, m in zip(source.shape[:3], target.shape[:3])]
    inner = kept[tuple(slice(a, a + m) for a, m in zip(start, target.shape[:3]))][..., None]
    zero = np.float32(0.0)
    return {**sample, "source": np.where(kept[..., None], source, zero).astype(source.dtype),
            "target": np.where(inner, target, zero).astype(target.dtype),
            "mask": np.where(inner, mask, zero).astype(mask.dtype)}
