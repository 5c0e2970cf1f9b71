"""Whole-volume synthesis: shape, tiling equivalence, preprocessing, bad input."""
import jax
import numpy as np
import pytest

import mrijax
from mrijax import inference, models


def _trained_like(variant="base", seed=0):
    """Random variables with non-trivial BatchNorm statistics, as after training."""
    variables = mrijax.init_variables(variant, seed)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 7), 100))
    stats = jax.tree_util.tree_map(lambda v: np.asarray(jax.random.uniform(next(keys), v.shape, minval=0.2,
                                                                             maxval=1.5)), variables["batch_stats"])
    return {"params": variables["params"], "batch_stats": stats}


def _phantom(shape, seed=0):
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    brain = (zz ** 2 + yy ** 2 + xx ** 2) < 0.8
    volume = (700 + 300 * np.sin(4 * xx) * np.cos(3 * yy) + 50 * rng.standard_normal(shape)) * brain
    return volume.astype(np.float32), brain


def test_odd_sized_volume_keeps_its_shape_and_zero_background():
    volume, brain = _phantom((61, 73, 59))
    out = mrijax.synthesize(_trained_like("shallow"), volume)  # shallow: compiled below too, and 3x faster than narrow
    assert out.shape == volume.shape and out.dtype == np.float32
    assert np.all(out[~brain] == 0)
    assert np.all(out[brain] > 0) and np.all(np.isfinite(out))


@pytest.mark.parametrize("variant", ["base", "progressive"])
def test_tiled_equals_one_pass(variant):
    volume, brain = _phantom((45, 38, 41), seed=1)
    params = _trained_like(variant, seed=1)
    one_pass = mrijax.synthesize(params, volume, tile=None)
    tiled = mrijax.synthesize(params, volume, tile=16)
    assert len(inference.tile_plan(volume.shape, brain, variant, 16)[2]) > 8  # really tiled
    assert len(inference.tile_plan(volume.shape, brain, variant, 0)[2]) == 1  # 0, like None: one pass
    np.testing.assert_allclose(tiled, one_pass, rtol=1e-5, atol=1e-6)


def test_whole_volume_equals_the_network_on_the_padded_normalised_input():
    """synthesize == apply the model to the zero-padded normalised volume (the paper's preprocessing)."""
    volume, brain = _phantom((40, 36, 38), seed=2)
    params = _trained_like("shallow", seed=2)
    m = models.margin("shallow")
    normalised = np.where(brain, volume / (3 * volume[brain].mean()), 0)
    padded = np.pad(normalised, m)[None, ..., None]
    expected = np.asarray(mrijax.build_model("shallow").apply(params, padded))[0, ..., 0]
    np.testing.assert_allclose(mrijax.synthesize(params, volume), np.where(brain, expected, 0), atol=1e-5)


def test_intensity_scale_does_not_matter_and_mask_is_respected():
    volume, brain = _phantom((36, 36, 36), seed=3)
    params = _trained_like(seed=3)
    a = mrijax.synthesize(params, volume)
    b = mrijax.synthesize(params, volume * 7.5)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    half = brain.copy()
    half[:18] = False
    c = mrijax.synthesize(params, volume, mask=half)
    assert np.all(c[~half] == 0) and np.all(c[half] > 0)


@pytest.mark.parametrize("bad,kwargs,match", [
    (np.zeros((10, 10)), {}, "3D"),
    (np.zeros((4, 10, 10, 10)), {}, "3D"),
    (np.full((20, 20, 20), np.nan), {}, "NaN"),
    (np.zeros((20, 20, 20)), {}, "empty"),
    (np.ones((20, 20, 20)), {"mask": np.ones((20, 20, 21))}, "mask shape"),
    (np.ones((20, 20, 20)), {"mask": np.zeros((20, 20, 20))}, "empty"),
])
def test_bad_input_raises_a_clear_value_error(bad, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mrijax.synthesize(_trained_like(), bad, **kwargs)
