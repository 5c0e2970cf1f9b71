"""Patch grid, patch geometry, records and the grain pipeline; plus every real shared subject (if present)."""
from __future__ import annotations

import itertools
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from mrijax.data import (
    discover, extract_patch, load_subjects, num_batches, patch_centres, patch_counts, patch_dataset, patch_records,
)


def ellipsoid_mask(shape, seed=0):
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radii = rng.uniform(0.6, 0.9, size=3)[:, None, None, None]
    return ((grid / radii) ** 2).sum(axis=0) < 1.0


def fake_subject(index, shape, seed):
    """Only what patches need: id, mask, and source/target whose voxel values encode (subject, position); one source."""
    voxel_ids = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1
    return SimpleNamespace(id=f"sub-{index}", mask=ellipsoid_mask(shape, seed),
                           source=voxel_ids + 1e6 * index, target=-(voxel_ids + 1e6 * index), extra_sources=())


@pytest.fixture(scope="module")
def subjects():
    return [fake_subject(0, (40, 46, 36), 0), fake_subject(1, (33, 40, 48), 1), fake_subject(2, (36, 36, 36), 2)]


# ---------------------------------------------------------------------------------------------------------
# Grid and geometry


@pytest.mark.parametrize("step", [16, 8, 5])
def test_patch_centres_are_exactly_the_grid_points_in_the_mask(step):
    mask = ellipsoid_mask((40, 46, 36))
    centres = patch_centres(mask, step)
    assert centres.shape[1] == 3 and len(centres) > 0
    assert mask[tuple(centres.T)].all()
    assert ((centres - step // 2) % step == 0).all()
    expected = {c for c in itertools.product(*[range(step // 2, s, step) for s in mask.shape]) if mask[c]}
    assert {tuple(c) for c in centres.tolist()} == expected
    assert [tuple(c) for c in centres.tolist()] == sorted(expected)


def reference_patch(volume, centre, shape):
    """Independent geometry: pad the volume generously, then slice."""
    pad = max(shape) + 16  # enough for centres up to 16 voxels outside the volume
    padded = np.pad(volume, pad)
    starts = [c - s // 2 + pad for c, s in zip(centre, shape)]
    return padded[tuple(slice(a, a + s) for a, s in zip(starts, shape))]


@pytest.mark.parametrize("shape", [(38, 38, 38), (16, 16, 16), (86, 86, 86), (7, 10, 5), (64, 64, 64)])
def test_extract_patch_matches_slicing_with_zero_padding(shape):
    volume = np.random.default_rng(0).random((40, 46, 36)).astype(np.float32)
    for centre in [(20, 23, 18), (0, 0, 0), (39, 45, 35), (5, 40, 30), (-3, 10, 47)]:
        patch = extract_patch(volume, centre, shape)
        assert patch.shape == shape and patch.dtype == volume.dtype
        np.testing.assert_array_equal(patch, reference_patch(volume, centre, shape))
    far = (-(shape[0] // 2) - 41, 10, 10)  # ends before the volume starts
    assert extract_patch(volume, far, shape).shape == shape and not extract_patch(volume, far, shape).any()
    # interior: plain slicing [c - s//2, c - s//2 + s)
    inner = extract_patch(volume, (20, 23, 18), (16, 16, 16))
    np.testing.assert_array_equal(inner, volume[12:28, 15:31, 10:26])


def test_target_block_is_the_middle_of_the_source_patch():
    volume = np.random.default_rng(1).random((40, 46, 36)).astype(np.float32)
    for centre in [(20, 23, 18), (2, 44, 1)]:
        big = extract_patch(volume, centre, (38, 38, 38))
        np.testing.assert_array_equal(big[11:27, 11:27, 11:27], extract_patch(volume, centre, (16, 16, 16)))
        dense = extract_patch(volume, centre, (86, 86, 86))
        np.testing.assert_array_equal(dense[11:75, 11:75, 11:75], extract_patch(volume, centre, (64, 64, 64)))


def test_records_and_counts(subjects):
    records = patch_records(subjects, step=8)
    counts = patch_counts(subjects, step=8)
    assert records.dtype == np.int32 and records.shape == (sum(counts.values()), 4)
    for index, subject in enumerate(subjects):
        mine = records[records[:, 0] == index, 1:]
        np.testing.assert_array_equal(mine, patch_centres(subject.mask, 8))
        assert counts[subject.id] == len(mine) > 0
    assert sum(patch_counts(subjects, 16).values()) < len(records)


# ---------------------------------------------------------------------------------------------------------
# grain pipeline


def every_patch_id(subjects, step):
    return sorted(int(v) for s in subjects for v in s.source[tuple(patch_centres(s.mask, step).T)])


def batch_ids(dataset):
    """Each patch's identity: the encoded voxel value at its centre (index 19 of 38)."""
    return [tuple(b["source"][:, 19, 19, 19, 0].astype(np.int64).tolist()) for b in dataset]


def test_batches_hold_the_right_patches(subjects):
    records = patch_records(subjects, step=8)
    dataset = patch_dataset(subjects, records, (38, 38, 38), (16, 16, 16), batch_size=4, seed=0, epoch=0,
                            shuffle=False)
    assert len(dataset) == num_batches(len(records), 4) == len(records) // 4
    batch = dataset[1]
    assert batch["source"].shape == (4, 38, 38, 38, 1) and batch["source"].dtype == np.float32
    assert batch["target"].shape == (4, 16, 16, 16, 1) and batch["target"].dtype == np.float32
    for row, (index, *centre) in enumerate(records[4:8]):
        np.testing.assert_array_equal(batch["source"][row, ..., 0],
                                      extract_patch(subjects[index].source, centre, (38, 38, 38)))
        np.testing.assert_array_equal(batch["target"][row, ..., 0],
                                      extract_patch(subjects[index].target, centre, (16, 16, 16)))


def test_order_reproducible_per_seed_and_epoch_and_different_across_epochs(subjects):
    records = patch_records(subjects, step=8)

    def order(seed, epoch):
        return batch_ids(patch_dataset(subjects, records, (38,) * 3, (16,) * 3, batch_size=8, seed=seed,
                                       epoch=epoch))

    first = order(seed=3, epoch=0)
    assert first == order(seed=3, epoch=0)
    assert first != order(seed=3, epoch=1)
    assert first != order(seed=4, epoch=0)
    unshuffled = batch_ids(patch_dataset(subjects, records, (38,) * 3, (16,) * 3, batch_size=8, seed=3, epoch=0,
                                         shuffle=False))
    assert first != unshuffled
    ids = list(itertools.chain(*first))
    assert len(ids) == len(set(ids)) == len(records) // 8 * 8
    assert set(ids) <= set(every_patch_id(subjects, 8))


@pytest.mark.parametrize("shard_count,batch_size,n_records", [(2, 5, None), (3, 4, 22)])
def test_shards_are_disjoint_and_cover_the_epoch(subjects, shard_count, batch_size, n_records):
    records = patch_records(subjects, step=8)[:n_records]  # 22 = 8 + 7 + 7: uneven unless truncated
    every_patch = sorted(int(subjects[i].source[c0, c1, c2]) for i, c0, c1, c2 in records)
    kwargs = dict(batch_size=batch_size, seed=7, epoch=2, shard_count=shard_count)

    kept = [patch_dataset(subjects, records, (38,) * 3, (16,) * 3, shard_index=i, drop_remainder=False, **kwargs)
            for i in range(shard_count)]
    seen = [list(itertools.chain(*batch_ids(d))) for d in kept]
    assert sorted(itertools.chain(*seen)) == every_patch  # disjoint (no duplicates) and covering
    assert len(kept[0]) == num_batches(len(records), batch_size, shard_count, drop_remainder=False)

    dropped = [patch_dataset(subjects, records, (38,) * 3, (16,) * 3, shard_index=i, **kwargs)
               for i in range(shard_count)]
    expected_batches = num_batches(len(records), batch_size, shard_count)
    assert [len(d) for d in dropped] == [expected_batches] * shard_count  # equal steps per process
    ids = list(itertools.chain(*[itertools.chain(*batch_ids(d)) for d in dropped]))
    assert len(ids) == len(set(ids)) == expected_batches * batch_size * shard_count


def test_threaded_pipeline_gives_the_same_batches(subjects):
    records = patch_records(subjects, step=16)
    kwargs = dict(batch_size=3, seed=1, epoch=0)
    plain = batch_ids(patch_dataset(subjects, records, (38,) * 3, (16,) * 3, **kwargs))
    threaded = batch_ids(patch_dataset(subjects, records, (38,) * 3, (16,) * 3, num_threads=2, **kwargs))
    assert plain == threaded


@pytest.mark.parametrize("n,b,k,drop,expected", [(100, 8, 1, True, 12), (100, 8, 1, False, 13), (100, 8, 3, True, 4),
                                                  (100, 8, 3, False, 5), (7, 8, 1, True, 0)])
def test_num_batches(n, b, k, drop, expected):
    assert num_batches(n, b, k, drop) == expected


# ---------------------------------------------------------------------------------------------------------
# Real shared data


@pytest.fixture(scope="module")
def real_subjects(shared_data_dir):
    return load_subjects(shared_data_dir, "T1w", "T2w")


def test_every_real_subject_loads_with_a_brain_mask(real_subjects, shared_data_dir):
    assert [s.id for s in real_subjects] == [e["id"] for e in discover(shared_data_dir)]
    counts = patch_counts(real_subjects, step=16)
    for subject in real_subjects:
        assert subject.mask.any()
        assert subject.source.shape == subject.target.shape == subject.mask.shape
        assert subject.source[subject.mask].mean() == pytest.approx(1 / 3, rel=1e-4)
        assert subject.target[subject.mask].mean() == pytest.approx(1 / 3, rel=1e-4)
        assert counts[subject.id] > 0
        print(f"{subject.id}: grid {subject.mask.shape}, {int(subject.mask.sum())} brain voxels, "
              f"{counts[subject.id]} patches at step 16")


# ---------------------------------------------------------------------------------------------------------
# Augmentation


def test_jitter_records_shifts_every_centre_within_bounds_reproducibly(subjects):
    from mrijax.data import jitter_records

    records = patch_records(subjects, step=8)
    shifted = jitter_records(records, 4, seed=7)
    np.testing.assert_array_equal(shifted[:, 0], records[:, 0])  # subject index untouched
    delta = shifted[:, 1:] - records[:, 1:]
    assert np.abs(delta).max() <= 4 and delta.min() == -4 and delta.max() == 4  # whole range used
    assert len(np.unique(delta, axis=0)) > len(delta) // 2  # per-record, not one global shift
    np.testing.assert_array_equal(jitter_records(records, 4, seed=7), shifted)
    assert not np.array_equal(jitter_records(records, 4, seed=8), shifted)
    np.testing.assert_array_equal(jitter_records(records, 0, seed=7), records)
    # a shifted record still cuts its blocks around one centre: the target stays the source's middle
    index, *centre = shifted[0]
    volume = subjects[index].source
    np.testing.assert_array_equal(extract_patch(volume, centre, (38,) * 3)[11:27, 11:27, 11:27],
                                  extract_patch(volume, centre, (16,) * 3))


def test_mirrored_subject_is_the_left_right_flip_of_every_array(synthetic_dataset):
    from mrijax.data import mirrored

    subject = load_subjects(synthetic_dataset)[0]
    flipped = mirrored(subject)
    assert flipped.id == f"{subject.id}~flip0"
    for name in ("source", "target", "mask"):
        original, mirror = getattr(subject, name), getattr(flipped, name)
        np.testing.assert_array_equal(mirror, original[::-1])
        assert mirror.flags.c_contiguous
    np.testing.assert_array_equal(mirrored(flipped).source, subject.source)  # an involution; original untouched


def test_grain_imports_without_its_worker_profiling_warning():
    """grain logs one warning at import under older jaxlibs (the pinned jax 0.6.2 among them); the patch pipeline
    imports it without that line and with every other logging untouched."""
    def stderr_of(code):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stderr

    if "worker profiling" not in stderr_of("import grain"):
        pytest.skip("this grain does not warn at import")
    quiet = stderr_of("import logging\nfrom mrijax.data import patches\npatches._import_grain()\n"
                      "logging.getLogger('absl').warning('still logged')")
    assert "worker profiling" not in quiet and "still logged" in quiet
