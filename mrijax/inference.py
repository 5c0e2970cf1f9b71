"""Whole-volume synthesis: the trained CAE applied to a full 3D volume in one jitted function.

The network is VALID-padded, so the volume is zero-padded by the network's margin (and to an even size,
because of pooling) and the output cropped back to the input's shape. To bound memory the output is
computed in tiles; tile origins are multiples of the pooling factor, where the network commutes with
shifts, so the tiled result equals the one-pass result. Tiles that hold no brain voxel are skipped.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mrijax import models, ops
from mrijax.data.preprocessing import brain_mask, normalise_sources

# Output tile edge. A larger tile recomputes less of the context margin around each tile but needs more memory;
# 128 was the fastest on a whole 1 mm brain (RESULTS.md), and a smaller one (e.g. 64) trades speed for memory.
DEFAULT_TILE = 128


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def tile_plan(shape, mask, variant, tile: int | None = DEFAULT_TILE):
    """Padded output shape, tile output shape and the tile origins whose output block touches the brain."""
    k = models.shift_multiple(variant)
    out_shape = tuple(_round_up(max(s, 2 * k), k) for s in shape)
    if not tile:  # None or 0: one pass
        tile_shape = out_shape
    else:
        if tile % k or tile <= 0:
            raise ValueError(f"tile must be a positive multiple of {k}, got {tile}")
        # As few tiles per axis as `tile` allows, of equal (even) size, so little is computed past the edge.
        tile_shape = tuple(min(s, _round_up(-(-s // -(-s // tile)), k)) for s in out_shape)
    axes = []
    for s, t in zip(out_shape, tile_shape):
        starts = list(range(0, s - t, t)) + [s - t]  # the last tile is pulled back inside (origin stays even)
        axes.append(sorted(set(starts)))
    padded_mask = np.zeros(out_shape, bool)
    padded_mask[: shape[0], : shape[1], : shape[2]] = mask
    origins = [
        (a, b, c) for a in axes[0] for b in axes[1] for c in axes[2]
        if padded_mask[a:a + tile_shape[0], b:b + tile_shape[1], c:c + tile_shape[2]].any()
    ]
    return out_shape, tile_shape, np.asarray(origins, np.int32).reshape(-1, 3)


@functools.partial(jax.jit, static_argnames=("variant", "out_shape", "tile_shape", "impl", "compute_dtype"))
def _synthesize_padded(variables, padded, origins, *, variant, out_shape, tile_shape, impl, compute_dtype):
    """Run the network tile by tile over `padded` (already normalised and padded by the margin)."""
    model = models.build_model(variant, impl=impl, compute_dtype=compute_dtype)
    m = models.margin(variant)
    tile_in = tuple(t + 2 * m for t in tile_shape)

    def body(i, out):
        origin = origins[i]
        block = lax.dynamic_slice(padded, (*origin, 0), (*tile_in, padded.shape[-1]))
        y = model.apply(variables, block[None], train=False)[0, ..., 0]
        return lax.dynamic_update_slice(out, y, origin)

    return lax.fori_loop(0, origins.shape[0], body, jnp.zeros(out_shape, jnp.float32))


def _validate(volume, shape=None, name="volume"):
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"{name} must be 3D, got shape {volume.shape}; pass one 3D image (split 4D series first)")
    if not np.issubdtype(volume.dtype, np.number) or np.iscomplexobj(volume):
        raise ValueError(f"{name} must be a real numeric array, got dtype {volume.dtype}")
    if not np.all(np.isfinite(volume)):
        raise ValueError(f"{name} contains NaN or Inf values; clean or mask them before synthesis")
    if shape is not None and volume.shape != shape:
        raise ValueError(f"{name} shape {volume.shape} differs from the first source's {shape}; pass images on the "
                         "same grid")
    return volume.astype(np.float32)


def synthesize(variables, volume, mask=None, *, tile: int | None = DEFAULT_TILE, impl: str | None = None,
               compute_dtype=jnp.float32, flip: bool = False) -> np.ndarray:
    """Synthesize the target contrast for a whole 3D source volume.

    variables: the variables dict {"params", "batch_stats"} (+ "lut" for an anchored model) of a trained model (the
        architecture is recognised from its layer names and shapes); or a list of them, an ensemble, whose
        predictions are averaged (one pass per member).
    volume: raw 3D source array in any intensity scale; for a model with several source contrasts (e.g. trained
        with --source T1w,FLAIR), a list of them in the model's order. mask: brain mask (else the positive voxels
        of the first source).
    Returns an array of the volume's shape, in normalised target units (target / (3 x its brain mean)),
    zero outside the mask. `tile` bounds memory (None or 0: one pass); `compute_dtype=jnp.bfloat16` is faster.
    `flip`: test-time augmentation, the mean of the predictions for the volume and for its mirror image along
    axis 0 (left-right for canonical RAS arrays), mirrored back: twice the time.
    """
    volumes = list(volume) if isinstance(volume, (list, tuple)) else [volume]
    if not volumes:
        raise ValueError("no source volume given")
    first = _validate(volumes[0])
    volumes = [first] + [_validate(v, first.shape, f"source {i + 1}") for i, v in enumerate(volumes[1:], 1)]
    if mask is not None and np.shape(mask) != first.shape:
        raise ValueError(f"mask shape {np.shape(mask)} differs from volume shape {first.shape}; pass a mask on the "
                         "same grid")
    mask = brain_mask(first, mask=mask)
    return synthesize_normalised(variables, normalise_sources(volumes, mask), mask, tile=tile, impl=impl,
                                 compute_dtype=compute_dtype, flip=flip)


def synthesize_normalised(variables, source, mask, *, tile: int | None = DEFAULT_TILE, impl: str | None = None,
                          compute_dtype=jnp.float32, flip: bool = False) -> np.ndarray:
    """The network over a whole volume already normalised (`mrijax.data.normalise`) and masked, (D, H, W) or, with
    several source contrasts, (D, H, W, C) channels-last (`Subject.inputs`); see `synthesize`."""
    if isinstance(variables, (list, tuple)):  # an ensemble: the mean of its members' predictions
        if not variables:
            raise ValueError("an ensemble needs at least one model's variables, got an empty list")
        kwargs = dict(tile=tile, impl=impl, compute_dtype=compute_dtype, flip=flip)
        total = sum(synthesize_normalised(member, source, mask, **kwargs) for member in variables)
        return (total / len(variables)).astype(np.float32)
    # Recognised and placed on the device once, for both passes of `flip`.
    config = models.recognise_config(variables)
    source = np.asarray(source)
    channels = source.shape[3] if source.ndim == 4 else 1
    if channels != config.in_channels:
        raise ValueError(f"the model takes {config.in_channels} source contrast(s), got {channels}; pass one volume "
                         "per source contrast, in the order of the model card's \"source\"")
    kwargs = dict(variant=config, tile=tile, impl=impl, compute_dtype=compute_dtype)
    variables = jax.device_put(models.model_variables(variables))
    prediction = _network_pass(variables, source, mask, **kwargs)
    if flip:
        prediction = 0.5 * (prediction + _network_pass(variables, source[::-1], mask[::-1], **kwargs)[::-1])
    return prediction


def _network_pass(variables, source, mask, *, variant, tile, impl, compute_dtype) -> np.ndarray:
    source, mask = np.ascontiguousarray(source, np.float32), np.ascontiguousarray(mask, bool)
    if source.ndim == 3:
        source = source[..., None]
    shape = source.shape[:3]
    m = models.margin(variant)
    out_shape, tile_shape, origins = tile_plan(shape, mask, variant, tile)
    padded = np.zeros((*(s + 2 * m for s in out_shape), source.shape[3]), np.float32)
    padded[m:m + shape[0], m:m + shape[1], m:m + shape[2]] = source
    # Bucket the tile count to a power of two (repeating a tile is harmless) so compiled shapes are reused.
    bucket = 1 << max(0, math.ceil(math.log2(max(len(origins), 1))))
    origins = np.concatenate([origins, np.repeat(origins[:1], bucket - len(origins), axis=0)])
    out = _synthesize_padded(
        variables, jnp.asarray(padded), jnp.asarray(origins), variant=variant, out_shape=out_shape,
        tile_shape=tile_shape, impl=impl or ops.DEFAULT_IMPL, compute_dtype=compute_dtype,
    )
    out = np.asarray(out)[: shape[0], : shape[1], : shape[2]]
    return np.where(mask, out, 0.0).astype(np.float32)
