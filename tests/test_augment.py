"""Source-contrast augmentation: determinism, invariants (background, range, shape), and each transform alone."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from mrijax.config import TrainConfig
from mrijax.data.augment import AugmentConfig, augment_config, augment_source, thick_slices

BRAIN_MEAN = 1 / 3  # of a normalised volume (preprocessing.normalise): the pivot of the intensity curves

PROBABILITIES = ("gamma_prob", "curve_prob", "contrast_prob", "bias_prob", "noise_prob", "blur_prob",
                 "thick_slice_prob")
OFF = AugmentConfig(**{name: 0.0 for name in PROBABILITIES})


def only(*names, **overrides) -> AugmentConfig:
    """All transforms off except `names` (probability 1)."""
    return dataclasses.replace(OFF, **{name: 1.0 for name in names}, **overrides)


ALL_WITH_BLUR = only("gamma_prob", "curve_prob", "contrast_prob", "bias_prob", "noise_prob", "blur_prob")
ALL_WITH_THICK = only("gamma_prob", "curve_prob", "contrast_prob", "bias_prob", "noise_prob", "thick_slice_prob")


def brain_patch(shape=(20, 22, 18), seed=0, negatives=False) -> np.ndarray:
    """A normalised-looking patch: an off-centre ellipsoid 'brain' (mean ~1/3) in an exactly-zero background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt((((grid - np.array([0.3, -0.2, 0.1])[:, None, None, None]) / 0.9) ** 2).sum(axis=0))
    brain = radius < 1.0
    values = np.clip(0.45 - 0.25 * radius + 0.05 * rng.standard_normal(shape), 0.01, None)
    if negatives:  # a given mask can leave small negative values at the brain edge
        values[brain & (radius > 0.9)] = -0.004
    return np.where(brain, values, 0.0).astype(np.float32)


def all_brain(shape, seed, low=0.1, high=0.9) -> np.ndarray:
    """A patch that is brain everywhere, with random values in [low, high]."""
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Determinism, invariants, API


@pytest.mark.parametrize("config", [AugmentConfig(), ALL_WITH_BLUR, ALL_WITH_THICK])
def test_same_seed_gives_bitwise_the_same_output(config):
    patch = brain_patch()
    first = augment_source(patch, np.random.default_rng(7), config)
    np.random.seed(123)  # the global numpy state plays no part
    second = augment_source(patch, np.random.default_rng(7), config)
    assert first.tobytes() == second.tobytes()


def test_different_seeds_give_different_outputs():
    patch = brain_patch()
    for config in (ALL_WITH_BLUR, ALL_WITH_THICK):
        outputs = [augment_source(patch, np.random.default_rng(seed), config) for seed in range(4)]
        for a, b in itertools.combinations(outputs, 2):
            assert not np.array_equal(a, b)
    defaults = [augment_source(patch, np.random.default_rng(seed)) for seed in range(8)]
    assert len({out.tobytes() for out in defaults}) == 8


@pytest.mark.parametrize("config", [AugmentConfig(), ALL_WITH_BLUR, ALL_WITH_THICK,
                                    only("contrast_prob", contrast_range=(0.85, 0.85), brightness_range=(-0.2, -0.2)),
                                    only("noise_prob", noise_range=(0.05, 0.05))])
def test_background_stays_zero_and_brain_stays_finite_and_non_negative(config):
    for seed in range(12):
        patch = brain_patch(seed=seed, negatives=seed % 2 == 1)
        out = augment_source(patch, np.random.default_rng(seed), config)
        brain = patch != 0
        assert np.all(out[~brain] == 0) and not np.signbit(out[~brain]).any()
        assert np.all(np.isfinite(out))
        if config != AugmentConfig():  # (the defaults may draw no transform and leave a patch as it is)
            assert not np.array_equal(out, patch)
        assert out.min() >= 0 or np.array_equal(out, patch)


@pytest.mark.parametrize("name", ["gamma_prob", "curve_prob", "contrast_prob", "bias_prob", "noise_prob", "blur_prob",
                                  "thick_slice_prob"])
def test_any_single_transform_sets_negative_brain_values_to_zero_or_above(name):
    patch = brain_patch(seed=2, negatives=True)
    assert patch.min() < 0
    out = augment_source(patch, np.random.default_rng(0), only(name, noise_range=(0.0, 0.001)))
    assert out.min() >= 0 and np.all(out[patch == 0] == 0)


def test_input_is_not_modified_and_not_shared():
    patch = brain_patch(negatives=True)[..., None]
    before = patch.copy()
    out = augment_source(patch, np.random.default_rng(0), ALL_WITH_THICK)
    assert np.array_equal(patch, before)
    assert not np.shares_memory(out, patch)
    untouched = augment_source(patch, np.random.default_rng(0), OFF)
    assert not np.shares_memory(untouched, patch)


@pytest.mark.parametrize("config", [AugmentConfig(), ALL_WITH_BLUR, ALL_WITH_THICK])
def test_shape_and_dtype_are_kept_and_the_channel_axis_changes_nothing_else(config):
    patch = brain_patch((15, 17, 16), seed=3)
    plain = augment_source(patch, np.random.default_rng(5), config)
    channel = augment_source(patch[..., None], np.random.default_rng(5), config)
    assert plain.shape == patch.shape and plain.dtype == np.float32
    assert channel.shape == patch.shape + (1,) and channel.dtype == np.float32
    assert np.array_equal(channel[..., 0], plain)


def test_float64_input_comes_back_float32():
    patch = brain_patch().astype(np.float64)
    out = augment_source(patch, np.random.default_rng(0), ALL_WITH_BLUR)
    assert out.dtype == np.float32 and out.shape == patch.shape


def test_all_probabilities_zero_returns_the_input():
    for negatives in (False, True):
        patch = brain_patch(negatives=negatives)
        assert np.array_equal(augment_source(patch, np.random.default_rng(0), OFF), patch)
        assert np.array_equal(augment_source(patch[..., None], np.random.default_rng(0), OFF), patch[..., None])


def test_an_empty_patch_stays_empty():
    out = augment_source(np.zeros((8, 9, 10, 1), np.float32), np.random.default_rng(0), ALL_WITH_THICK)
    assert out.shape == (8, 9, 10, 1) and not out.any()


@pytest.mark.parametrize("shape", [(10, 10), (10, 10, 10, 2), (2, 10, 10, 10, 1)])
def test_wrong_patch_shape_is_a_value_error(shape):
    with pytest.raises(ValueError, match="patch"):
        augment_source(np.ones(shape, np.float32), np.random.default_rng(0))


@pytest.mark.parametrize("changes", [
    {"gamma_prob": -0.1}, {"noise_prob": 1.5}, {"blur_prob": float("nan")}, {"bias_prob": "0.5"},
    {"blur_prob": 0.6, "thick_slice_prob": 0.5},
    {"gamma_range": (1.5, 0.8)}, {"gamma_range": (0.0, 1.5)}, {"curve_slope_range": (-1.0, 2.0)},
    {"curve_points": 0}, {"curve_points": 2.5},
    {"contrast_range": (1.15, 0.85)}, {"contrast_range": (0.0, 1.0)}, {"brightness_range": (0.05, -0.05)},
    {"brightness_range": (0.0, float("inf"))}, {"brightness_range": (0.0,)},
    {"bias_range": (-0.1, 0.2)}, {"bias_range": (0.3, 0.2)}, {"bias_extent": 0.0},
    {"noise_range": (-0.01, 0.03)}, {"noise_range": (0.03, 0.0)}, {"blur_range": (1.0, 0.5)},
    {"thick_slice_factors": ()}, {"thick_slice_factors": (2, 0)}, {"thick_slice_factors": (2.0, 3.0)},
])
def test_invalid_config_is_a_one_line_value_error(changes):
    with pytest.raises(ValueError) as error:
        AugmentConfig(**changes)
    message = str(error.value)
    assert "AugmentConfig." in message and "\n" not in message


def test_the_default_config_is_valid_and_on():
    config = AugmentConfig()
    assert all(0 < getattr(config, name) < 1 for name in PROBABILITIES)
    assert config.blur_prob + config.thick_slice_prob <= 1


# ---------------------------------------------------------------------------------------------------------
# Each transform alone


def ramp_patch(shape=(20, 20, 20), seed=0) -> np.ndarray:
    """Distinct brain values spread over (0, 1.2], shuffled, with a zero background slab; includes exactly 1/3."""
    n = int(np.prod(shape))
    values = np.linspace(1e-3, 1.2, n).astype(np.float32)
    values[n // 2] = np.float32(BRAIN_MEAN)
    patch = np.random.default_rng(seed).permutation(values).reshape(shape)
    patch[:3] = 0
    return patch


@pytest.mark.parametrize("names", [("gamma_prob",), ("curve_prob",), ("gamma_prob", "curve_prob")])
def test_intensity_curves_are_monotone_keep_the_brain_mean_and_change_the_contrast(names):
    patch = ramp_patch()
    brain = patch != 0
    order = np.argsort(patch[brain], kind="stable")
    pivot = np.flatnonzero(patch[brain] == np.float32(BRAIN_MEAN))
    changed = 0
    for seed in range(10):
        out = augment_source(patch, np.random.default_rng(seed), only(*names))
        curve = out[brain][order]
        assert np.all(np.diff(curve) >= 0), "the intensity curve must keep the order of brain values"
        assert curve[0] > 0
        np.testing.assert_allclose(out[brain][pivot], BRAIN_MEAN, rtol=1e-5)
        changed += not np.allclose(out, patch, atol=1e-3)
    assert changed >= 8


def test_gamma_is_exactly_a_power_around_the_brain_mean():
    patch = ramp_patch()
    brain = patch != 0
    x = patch[brain].astype(np.float64)
    exponents = []
    for seed in range(10):
        y = augment_source(patch, np.random.default_rng(seed), only("gamma_prob"))[brain].astype(np.float64)
        far = np.argmax(x)  # the brightest voxel, far from the pivot, fixes g
        g = np.log(y[far] / BRAIN_MEAN) / np.log(x[far] / BRAIN_MEAN)
        np.testing.assert_allclose(y, BRAIN_MEAN * (x / BRAIN_MEAN) ** g, rtol=2e-5, atol=1e-7)
        assert 1 / 1.5 - 1e-6 <= g <= 1.5 + 1e-6
        exponents.append(g)
    assert min(exponents) < 0.95 and max(exponents) > 1.05  # both darker and brighter mid-tones occur


def test_piecewise_curve_slopes_stay_within_the_slope_range_ratio():
    patch = ramp_patch()
    brain = patch != 0
    order = np.argsort(patch[brain])
    x = patch[brain][order].astype(np.float64)
    for seed in range(10):
        y = augment_source(patch, np.random.default_rng(seed), only("curve_prob"))[brain][order].astype(np.float64)
        step = slice(None, None, 50)  # spacing well above float32 resolution
        slopes = np.diff(y[step]) / np.diff(x[step])
        assert slopes.min() > 0
        assert slopes.max() / slopes.min() <= 1.5 / (1 / 1.5) * 1.01
        assert slopes.max() / slopes.min() > 1.05  # not a straight line


def test_contrast_and_brightness_are_affine_within_the_ranges_and_clip_at_zero():
    patch = brain_patch()
    patch[patch != 0] = np.random.default_rng(1).uniform(0.2, 1.0, int((patch != 0).sum()))
    brain = patch != 0
    for seed in range(10):
        out = augment_source(patch, np.random.default_rng(seed), only("contrast_prob"))
        a, b = np.polyfit(patch[brain].astype(np.float64), out[brain].astype(np.float64), 1)
        np.testing.assert_allclose(out[brain], a * patch[brain] + b, atol=2e-6)
        assert 0.85 <= a <= 1.15 and -0.05 <= b <= 0.05
    dim = np.where(brain, np.float32(0.01), np.float32(0.0))
    out = augment_source(dim, np.random.default_rng(0), only("contrast_prob", brightness_range=(-0.05, -0.05)))
    assert np.all(out == 0)


def test_bias_field_is_smooth_quadratic_and_within_twenty_percent_over_70_voxels():
    shape = (70, 70, 70)
    patch = np.full(shape, 0.4, np.float32)
    u = [(np.arange(n) - (n - 1) / 2) / 35 for n in shape]
    u0, u1, u2 = np.meshgrid(*u, indexing="ij")
    design = np.stack([np.ones_like(u0), u0, u1, u2, u0 ** 2, u1 ** 2, u2 ** 2, u0 * u1, u0 * u2, u1 * u2],
                      axis=-1).reshape(-1, 10)
    spreads = []
    for seed in range(4):
        field = augment_source(patch, np.random.default_rng(seed), only("bias_prob")) / patch
        log_field = np.log(field.astype(np.float64)).ravel()
        coefficients, *_ = np.linalg.lstsq(design, log_field, rcond=None)
        assert np.abs(design @ coefficients - log_field).max() < 1e-5  # exactly exp(quadratic polynomial)
        assert field.min() >= 1 / 1.2 - 1e-6 and field.max() <= 1.2 + 1e-6
        spreads.append(field.max() / field.min())
    assert max(spreads) > 1.1  # a real field, not ~1


def test_bias_strength_scales_with_the_range():
    patch = np.full((30, 30, 30), 0.4, np.float32)
    weak = augment_source(patch, np.random.default_rng(0), only("bias_prob", bias_range=(0.0, 0.0)))
    assert np.allclose(weak, patch, rtol=1e-6)


def test_noise_is_zero_mean_gaussian_within_the_sigma_range_and_clipped_at_zero():
    patch = brain_patch((30, 30, 30))
    patch[patch != 0] = 0.5
    brain = patch != 0
    sigmas = []
    for seed in range(10):
        residual = (augment_source(patch, np.random.default_rng(seed), only("noise_prob")) - patch)[brain]
        sigma = residual.std()
        assert sigma <= 0.03 * 1.05
        assert abs(residual.mean()) < 5 * max(sigma, 1e-9) / np.sqrt(residual.size)
        sigmas.append(sigma)
    assert min(sigmas) < 0.015 < max(sigmas)  # the level varies across patches
    dim = np.where(brain, np.float32(0.001), np.float32(0.0))
    out = augment_source(dim, np.random.default_rng(0), only("noise_prob", noise_range=(0.03, 0.03)))
    assert out.min() == 0 and (out[brain] == 0).any() and (out[brain] > 0.001).any()


def test_blur_smooths_isotropically_and_keeps_a_uniform_brain():
    constant = np.full((16, 16, 16), 0.3, np.float32)
    for seed in range(3):
        np.testing.assert_allclose(augment_source(constant, np.random.default_rng(seed), only("blur_prob")), 0.3,
                                   rtol=1e-5)
    patch = all_brain((24, 24, 24), seed=0)
    config = only("blur_prob", blur_range=(0.8, 1.0))
    for seed in range(3):
        out = augment_source(patch, np.random.default_rng(seed), config)
        roughness = [np.abs(np.diff(out, axis=axis)).mean() / np.abs(np.diff(patch, axis=axis)).mean()
                     for axis in range(3)]
        assert max(roughness) < 0.5
        assert max(roughness) / min(roughness) < 1.1  # the same along every axis, unlike thick slices


# ---------------------------------------------------------------------------------------------------------
# Thick slices


def reference_thick_slices(volume, axis, factor, offset):
    """Loop version: blocks of equal (i + offset) // factor, means at block centres, np.interp along each line."""
    lines = np.moveaxis(volume.astype(np.float64), axis, -1)
    n = lines.shape[-1]
    labels = (np.arange(n) + offset) // factor
    blocks = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    centres = [block.mean() for block in blocks]
    out = np.empty_like(lines)
    for index in np.ndindex(lines.shape[:-1]):
        means = [lines[index][block].mean() for block in blocks]
        out[index] = np.interp(np.arange(n), centres, means)
    return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize("axis,factor,offset", [(0, 2, 0), (1, 3, 1), (2, 4, 3), (0, 4, 2), (2, 3, 0), (1, 1, 0),
                                                (1, 5, 4)])
def test_thick_slices_match_the_loop_reference(axis, factor, offset):
    volume = all_brain((13, 11, 10), seed=factor + offset)
    np.testing.assert_allclose(thick_slices(volume, axis, factor, offset),
                               reference_thick_slices(volume, axis, factor, offset), rtol=1e-5, atol=1e-6)


def test_thick_slices_with_factor_one_and_a_single_block():
    volume = all_brain((7, 8, 9), seed=0)
    np.testing.assert_allclose(thick_slices(volume, 1, 1), volume, rtol=1e-6)
    whole = thick_slices(volume, 0, 8)  # one block covers the axis: every line becomes its mean
    np.testing.assert_allclose(whole, np.broadcast_to(volume.mean(axis=0, keepdims=True), volume.shape), rtol=1e-5)


@pytest.mark.parametrize("factor,offset", [(2, 1), (3, 2), (4, 0), (4, 3)])
def test_thick_slices_keep_a_ramp_and_remove_detail_finer_than_a_slice(factor, offset):
    n = 24
    base = all_brain((1, 9, 8), seed=1)
    ramp = base + 0.02 * np.arange(n, dtype=np.float32)[:, None, None]
    out = thick_slices(ramp, 0, factor, offset)
    first_centre = (factor - offset - 1) / 2  # of the first block, [0, factor - offset)
    inner = slice(int(np.ceil(first_centre)), n - factor)
    np.testing.assert_allclose(out[inner], ramp[inner], rtol=1e-5)
    # a zero-mean pattern repeating every slice (aligned with the blocks) vanishes: constant within and across blocks
    pattern = np.random.default_rng(factor).standard_normal(factor).astype(np.float32)
    pattern -= pattern.mean()
    detail = base + 0.1 * pattern[(np.arange(n) + offset) % factor][:, None, None]
    out = thick_slices(detail, 0, factor, offset)
    start, end = (factor - offset) % factor, n - (n + offset) % factor  # the complete blocks: [start, end)
    low = start + (factor - 1) / 2 if start > 0 else 0  # a partial block's mean pulls beyond the outer centres
    high = end - 1 - (factor - 1) / 2 if end < n else n - 1
    complete = slice(int(np.ceil(low)), int(np.floor(high)) + 1)
    assert complete.stop - complete.start >= n - 2 * factor
    np.testing.assert_allclose(out[complete], np.broadcast_to(base, out[complete].shape), rtol=1e-5, atol=1e-6)


def test_thick_slices_reject_bad_factor_or_offset():
    volume = np.ones((4, 4, 4), np.float32)
    for factor, offset in ((0, 0), (3, 3), (2, -1)):
        with pytest.raises(ValueError):
            thick_slices(volume, 0, factor, offset)


def test_augment_source_thick_slices_along_exactly_one_random_axis():
    brain = brain_patch((14, 13, 12), seed=4) != 0
    patch = np.where(brain, all_brain(brain.shape, seed=4), 0).astype(np.float32)  # detail at the voxel scale
    seen_axes, seen_factors = set(), set()
    for seed in range(30):
        out = augment_source(patch, np.random.default_rng(seed), only("thick_slice_prob"))
        matches = [(axis, factor, offset) for axis in range(3) for factor in (2, 3, 4) for offset in range(factor)
                   if np.allclose(out, np.where(brain, thick_slices(patch, axis, factor, offset), 0), atol=1e-6)]
        assert len(matches) == 1, matches
        axis, factor, _ = matches[0]
        seen_axes.add(axis)
        seen_factors.add(factor)
        # other axes keep their detail; the chosen one loses it
        inside = [np.moveaxis(np.moveaxis(brain, a, 0)[1:] & np.moveaxis(brain, a, 0)[:-1], 0, a) for a in range(3)]
        roughness = [np.abs(np.diff(out, axis=a)[inside[a]]).mean() for a in range(3)]
        assert np.argmin(roughness) == axis
    assert seen_axes == {0, 1, 2} and seen_factors == {2, 3, 4}


def test_resolution_augmentation_changes_resolution_only():
    """`--augment resolution` keeps intensities: a uniform brain interior stays uniform (blur and thick slices
    average it), while `all` changes it on some patch; both draw resolution changes."""
    shape = (24, 24, 24)
    uniform = np.zeros(shape, np.float32)
    uniform[2:-2, 2:-2, 2:-2] = 0.3
    interior = np.s_[8:-8, 8:-8, 8:-8]
    resolution, everything = augment_config("resolution"), augment_config("all")
    assert augment_config("none") is None and everything == AugmentConfig()
    assert (resolution.blur_prob, resolution.thick_slice_prob) == (everything.blur_prob, everything.thick_slice_prob)
    patch = all_brain(shape, seed=1)
    changed = 0
    for seed in range(12):
        np.testing.assert_allclose(augment_source(uniform, np.random.default_rng(seed), resolution)[interior], 0.3,
                                   rtol=1e-5)
        changed += not np.array_equal(augment_source(patch, np.random.default_rng(seed), resolution), patch)
    assert changed >= 3  # blur or thick slices drawn on about half the patches
    assert any(np.abs(augment_source(uniform, np.random.default_rng(seed), everything)[interior] - 0.3).max() > 1e-3
               for seed in range(12))


def test_augment_names_a_family_and_older_cards_booleans_still_read():
    assert TrainConfig(augment=True).augment == "all" and TrainConfig(augment=False).augment == "none"
    assert TrainConfig(augment="resolution").augment == "resolution"
    with pytest.raises(ValueError, match="augment 'some'"):
        TrainConfig(augment="some")
    from mrijax.trainer import check_resume, run_defining

    stored = {"config": {**TrainConfig().to_dict(), "augment": False}}  # a checkpoint of before
    assert run_defining(stored["config"]) == run_defining(TrainConfig().to_dict())
    check_resume(stored, {"config": TrainConfig().to_dict()}, "run")
    with pytest.raises(ValueError, match="augment none -> resolution"):
        check_resume(stored, {"config": TrainConfig(augment="resolution").to_dict()}, "run")


# ---------------------------------------------------------------------------------------------------------
# Skull-strip variation: the brain mask drawn tighter, in source, target and mask alike


def stripped_sample(in_size=20, out_size=8, channels=2, seed=0) -> dict:
    """A sample as the pipeline cuts it: a skull-stripped ellipsoid brain in the source block, the output block
    (target, mask) its centre."""
    brain = brain_patch((in_size,) * 3, seed=seed) != 0
    rng = np.random.default_rng(seed)
    source = np.where(brain[..., None], rng.uniform(0.1, 0.9, (in_size,) * 3 + (channels,)), 0).astype(np.float32)
    inner = np.s_[(in_size - out_size) // 2:(in_size - out_size) // 2 + out_size]
    centre = brain[inner, inner, inner][..., None]
    target = np.where(centre, rng.uniform(0.1, 0.9, centre.shape), 0).astype(np.float32)
    return {"source": source, "target": target, "mask": centre.astype(np.float32)}


def eroded_reference(brain: np.ndarray, radius: int) -> np.ndarray:
    """Voxels whose every neighbour within city-block distance `radius` is brain, beyond the block counting as
    brain: `radius` erosions with the 6-neighbourhood, written as a loop over offsets."""
    padded = np.pad(brain, radius, constant_values=True)
    kept = np.ones_like(brain)
    n = brain.shape
    for offset in itertools.product(range(-radius, radius + 1), repeat=3):
        if sum(map(abs, offset)) <= radius:
            kept &= padded[tuple(slice(radius + o, radius + o + s) for o, s in zip(offset, n))]
    return kept


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_strip_edge_erodes_source_target_and_mask_alike(radius):
    from mrijax.data.augment import strip_edge

    sample = stripped_sample()
    original = {k: v.copy() for k, v in sample.items()}
    out = strip_edge(sample, radius)
    kept = eroded_reference(np.any(sample["source"] != 0, axis=-1), radius)
    inner = kept[6:14, 6:14, 6:14][..., None]
    np.testing.assert_array_equal(out["source"], np.where(kept[..., None], sample["source"], 0))
    np.testing.assert_array_equal(out["target"], np.where(inner, sample["target"], 0))
    np.testing.assert_array_equal(out["mask"], np.where(inner, sample["mask"], 0))
    assert 0 < out["mask"].sum() < sample["mask"].sum()  # this brain reaches the output block's edge: some eroded
    assert all(out[k].dtype == np.float32 for k in out)
    for k in sample:  # the input is not modified
        np.testing.assert_array_equal(sample[k], original[k])


def test_strip_edge_keeps_a_block_that_is_brain_to_its_faces():
    from mrijax.data.augment import strip_edge

    full = {"source": all_brain((12, 12, 12, 1), seed=2), "target": all_brain((4, 4, 4, 1), seed=3),
            "mask": np.ones((4, 4, 4, 1), np.float32)}
    out = strip_edge(full, 3)
    for k in full:
        np.testing.assert_array_equal(out[k], full[k])


def test_strip_family_strips_half_the_samples_keeps_the_contrast_and_is_deterministic():
    from mrijax.data.patches import _AugmentSample

    config = augment_config("strip")
    assert config.strip_prob == 0.5 and AugmentConfig().strip_prob == 0.0
    assert TrainConfig(augment="strip").augment == "strip"
    sample = stripped_sample(channels=1)
    stripped = 0
    for seed in range(16):
        out = _AugmentSample(config)(sample, np.random.default_rng(seed))
        again = _AugmentSample(config)(sample, np.random.default_rng(seed))
        for k in sample:
            np.testing.assert_array_equal(out[k], again[k])
            kept = out[k] != 0
            np.testing.assert_array_equal(out[k][kept], sample[k][kept])  # values kept where not eroded
        stripped += not np.array_equal(out["mask"], sample["mask"])
    assert 3 <= stripped <= 13


def test_the_contrast_families_draw_nothing_for_the_mask():
    """With strip_prob 0 the sample's generator is used exactly as by `augment_source` alone, so runs with
    `--augment all` draw the same augmentation as before the skull-strip variation existed."""
    from mrijax.data.patches import _AugmentSample

    sample = stripped_sample(channels=1)
    first, second = np.random.default_rng(7), np.random.default_rng(7)
    out = _AugmentSample(AugmentConfig())(sample, first)
    np.testing.assert_array_equal(out["source"], augment_source(sample["source"], second))
    np.testing.assert_array_equal(out["mask"], sample["mask"])
    assert first.uniform() == second.uniform()


@pytest.mark.parametrize("strip_range", [(0, 2), (3, 2), (1.5, 2), (1,)])
def test_invalid_strip_range_is_a_value_error(strip_range):
    with pytest.raises(ValueError, match="strip_range"):
        AugmentConfig(strip_range=strip_range)
