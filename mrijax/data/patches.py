"""Training patches, cut on the fly: the paper's 38^3 source patches with the centred 16^3 target block.

Patch centres lie on a regular grid of spacing `step` (16 in the paper, 8 for more data) starting at
`step // 2` on every axis, and are kept when the centre voxel is in the brain mask. A patch of shape `s`
around centre `c` covers voxels [c - s//2, c - s//2 + s) per axis, zero-padded outside the volume, so a
38^3 input and its 16^3 output share one centre and the output is the input's middle (11 voxels each side).
Only (subject, centre) records are stored; the voxels are copied when a batch is requested.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np

from mrijax.data.augment import augment_source, strip_edge
from mrijax.data.io import DataError


def patch_centres(mask: np.ndarray, step: int = 16) -> np.ndarray:
    """(N, 3) int array of grid points (origin step//2, spacing `step`) whose voxel is in `mask`, sorted."""
    if step < 1:
        raise ValueError(f"step must be positive, got {step}")
    axes = [np.arange(step // 2, size, step) for size in mask.shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, mask.ndim)
    return grid[np.asarray(mask, dtype=bool)[tuple(grid.T)]].astype(np.int64)


def extract_patch(volume: np.ndarray, centre: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Block of `shape` around `centre` (covering [c - s//2, c - s//2 + s) per axis), zero outside `volume`."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != volume.ndim or len(centre) != volume.ndim:
        raise ValueError(f"centre {tuple(centre)} and shape {shape} must have {volume.ndim} entries")
    patch = np.zeros(shape, dtype=volume.dtype)
    source_slices, patch_slices = [], []
    for c, s, size in zip(centre, shape, volume.shape):
        start = int(c) - s // 2
        lo, hi = max(start, 0), min(start + s, size)
        if hi <= lo:  # entirely outside: all padding
            return patch
        source_slices.append(slice(lo, hi))
        patch_slices.append(slice(lo - start, hi - start))
    patch[tuple(patch_slices)] = volume[tuple(source_slices)]
    return patch


def patch_records(subjects: Sequence, step: int = 16) -> np.ndarray:
    """(N, 4) int32 records (subject_index, c0, c1, c2) over all subjects' in-mask grid centres."""
    blocks = [np.concatenate([np.full((len(centres), 1), index), centres], axis=1)
              for index, centres in ((i, patch_centres(s.mask, step)) for i, s in enumerate(subjects))]
    return np.concatenate(blocks, axis=0).astype(np.int32) if blocks else np.zeros((0, 4), np.int32)


def jitter_records(records: np.ndarray, max_shift: int, seed: int) -> np.ndarray:
    """Records with every centre moved by a uniform integer shift in [-max_shift, max_shift] per axis.

    Training augmentation: drawn anew each epoch (seed from `epoch_seed`), so blocks are cut at new
    places and a small dataset yields more distinct samples; same seed -> same shifts (exact resume).
    """
    records = np.asarray(records, dtype=np.int32).reshape(-1, 4)
    if max_shift <= 0:
        return records
    shifts = np.random.default_rng(seed).integers(-max_shift, max_shift + 1, size=(len(records), 3), dtype=np.int32)
    return np.concatenate([records[:, :1], records[:, 1:] + shifts], axis=1)


def patch_counts(subjects: Sequence, step: int = 16) -> dict[str, int]:
    """Number of training patches per subject id at this grid step."""
    return {subject.id: len(patch_centres(subject.mask, step)) for subject in subjects}


def epoch_seed(seed: int, epoch: int) -> int:
    """Shuffle seed for one epoch: same (seed, epoch) -> same order, each epoch a different order."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


def records_per_shard(n_records: int, shard_count: int, drop_remainder: bool) -> int:
    """Records each shard sees. When dropping remainders, every shard gets the same count (equal step counts)."""
    return n_records // shard_count if drop_remainder else math.ceil(n_records / shard_count)


def num_batches(n_records: int, batch_size: int, shard_count: int = 1, drop_remainder: bool = True) -> int:
    """Batches per epoch in one shard (the largest shard when remainders are kept)."""
    per_shard = records_per_shard(n_records, shard_count, drop_remainder)
    return per_shard // batch_size if drop_remainder else math.ceil(per_shard / batch_size)


class _CutPatches:
    """Maps a record to its {"source", "target", "mask"} channels-last blocks (a class so it pickles).

    "source" has one channel per source contrast; "mask" is the brain mask of the output block (1.0 = brain), for
    losses that count brain voxels only.
    """

    def __init__(self, subjects: Sequence, in_shape: Sequence[int], out_shape: Sequence[int]):
        self.sources = [(s.source, *s.extra_sources) for s in subjects]
        self.targets = [s.target for s in subjects]
        self.masks = [s.mask for s in subjects]
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    def __call__(self, record: np.ndarray) -> dict[str, np.ndarray]:
        index, centre = int(record[0]), record[1:]
        return {
            "source": np.stack([extract_patch(v, centre, self.in_shape) for v in self.sources[index]], axis=-1),
            "target": extract_patch(self.targets[index], centre, self.out_shape)[..., None],
            "mask": extract_patch(self.masks[index], centre, self.out_shape)[..., None].astype(np.float32),
        }


class _AugmentSample:
    """Random source-contrast change of one sample, then (when the config asks) a tighter brain mask (grain's
    `random_map`: the generator is seeded by the dataset seed and the element's index, so an epoch's augmentation
    is a pure function of (seed, epoch)). Each source contrast gets its own draw: scanners change each sequence's
    contrast differently; the mask is one for all."""

    def __init__(self, config):
        self.config = config

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        source = sample["source"]
        channels = [augment_source(source[..., c:c + 1], rng, self.config) for c in range(source.shape[-1])]
        sample = {**sample, "source": np.concatenate(channels, axis=-1)}
        if self.config.strip_prob > 0 and rng.uniform() < self.config.strip_prob:  # no draw when off: "all" as before
            sample = strip_edge(sample, int(rng.integers(self.config.strip_range[0], self.config.strip_range[1] + 1)))
        return sample


def _import_grain():
    """grain, imported here rather than at module import (synthesis never needs it), without the one warning it logs
    under jax < 0.11 (the pinned jax 0.6.2 among them): that profiling its worker processes needs a newer jaxlib.
    mrijax reads patches in threads, not worker processes."""
    def not_the_profiling_warning(record):
        return "worker profiling requires jaxlib" not in record.getMessage()

    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(not_the_profiling_warning)
    try:
        import grain
    finally:
        absl_logger.removeFilter(not_the_profiling_warning)
    return grain


def patch_dataset(subjects: Sequence, records: np.ndarray, in_shape: Sequence[int], out_shape: Sequence[int], *,
                  batch_size: int, seed: int, epoch: int, shuffle: bool = True, shard_index: int = 0,
                  shard_count: int = 1, drop_remainder: bool = True, num_threads: int = 0, augment=None):
    """One epoch of batches {"source": (B, *in_shape, sources), "target", "mask": (B, *out_shape, 1)} float32.

    A `grain.MapDataset`: records -> shuffle (seed from (seed, epoch)) -> this process's shard -> cut patches
    -> augment the source and the mask edge (`augment`: a `mrijax.data.augment.AugmentConfig`, or None) -> batch.
    Shards are strided slices of the same shuffled order, so they are disjoint; with
    `drop_remainder` the order is first truncated to a multiple of `shard_count` so every shard yields the
    same number of batches (`num_batches`). `num_threads > 0` returns a prefetching `IterDataset` instead.
    """
    missing = [s.id for s in subjects if s.target is None]
    if missing:
        raise DataError(f"{', '.join(missing)}: no target image loaded; training patches need source and target")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
    grain = _import_grain()

    records = np.asarray(records, dtype=np.int32).reshape(-1, 4)
    dataset = grain.MapDataset.source(records)
    if shuffle:
        dataset = dataset.shuffle(seed=epoch_seed(seed, epoch))
    if drop_remainder:
        dataset = dataset[: records_per_shard(len(records), shard_count, True) * shard_count]
    dataset = dataset[shard_index::shard_count]
    dataset = dataset.map(_CutPatches(subjects, in_shape, out_shape))
    if augment is not None:
        dataset = dataset.random_map(_AugmentSample(augment),
                                     seed=epoch_seed(seed + 2, epoch * max(shard_count, 1) + shard_index) % 2**32)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    if num_threads > 0:
        return dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads))
    return dataset
