import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from mrijax.baselines import LUT, apply_lut, fit_lut
from mrijax.baselines import mimecs


def _subject(seed, shape=(16, 16, 16)):
    """Smooth random 'T1' in about [0, 1], a 'T2' that depends on it non-linearly, and a ball mask."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape) - (np.array(shape) - 1)[:, None, None, None] / 2
    mask = np.sum(grid ** 2, axis=0) <= (min(shape) / 2 - 1) ** 2
    source = gaussian_filter(rng.uniform(size=shape), 2.0)
    source = 0.1 + 0.8 * (source - source[mask].min()) / (source[mask].max() - source[mask].min())
    target = 1.0 - source ** 2 + 0.05 * np.sin(np.arange(shape[0]))[:, None, None]
    return source.astype(np.float32), target.astype(np.float32), mask


# ---------------------------------------------------------------- LUT

def test_lut_recovers_monotone_mapping():
    rng = np.random.default_rng(0)
    source = rng.uniform(0, 1, size=(40, 40, 40))
    mapping = lambda x: np.sqrt(x) * 0.8 + 0.1  # noqa: E731
    mask = np.ones(source.shape, bool)
    lut = fit_lut([source], [mapping(source)], [mask], bins=128, max_value=1.0)
    probe = np.linspace(0.05, 0.95, 1000).reshape(10, 10, 10)
    prediction = apply_lut(lut, probe, np.ones(probe.shape, bool))
    assert np.abs(prediction - mapping(probe)).max() < 2e-3
    assert np.all(np.diff(lut.values) > 0)


def test_lut_fills_empty_bins_by_interpolation():
    # 16 bins of width 1/16, 100 evenly spaced samples in each except the four bins covering [0.375, 0.625)
    source = (np.arange(1600) + 0.5) / 1600
    source = source[(source < 0.375) | (source >= 0.625)].reshape(12, 10, 10)
    target = 2 * source + 1  # linear, so interpolating across the gap is exact
    lut = fit_lut([source], [target], [np.ones(source.shape, bool)], bins=16, max_value=1.0)
    gap = (lut.bin_centres > 0.375) & (lut.bin_centres < 0.625)
    assert gap.sum() == 4
    np.testing.assert_allclose(lut.values[gap], 2 * lut.bin_centres[gap] + 1, atol=1e-3)


def test_lut_zero_outside_mask_and_roundtrip(tmp_path):
    source, target, mask = _subject(1)
    lut = fit_lut([source], [target], [mask])
    prediction = apply_lut(lut, source, mask)
    assert np.all(prediction[~mask] == 0)
    assert np.all(prediction[mask] != 0)
    # voxels outside the training mask must not influence the fit
    noisy_target = np.where(mask, target, 99.0)
    np.testing.assert_array_equal(fit_lut([source], [noisy_target], [mask]).values, lut.values)
    lut.save(tmp_path / "lut.npz")
    loaded = LUT.load(tmp_path / "lut.npz")
    np.testing.assert_array_equal(apply_lut(loaded, source, mask), prediction)


def test_lut_bad_inputs():
    source, target, mask = _subject(2)
    with pytest.raises(ValueError):
        fit_lut([source], [target[:-1]], [mask])
    with pytest.raises(ValueError):
        fit_lut([source], [target], [np.zeros_like(mask)])
    with pytest.raises(ValueError):
        fit_lut([], [], [])


# ---------------------------------------------------------------- MIMECS

def _projected_gradient_reference(atoms, signal, lam, iterations=20000):
    """Plain projected gradient in float64 for min 0.5||y - D a||^2 + lam sum(a), a >= 0."""
    d = atoms.T.astype(np.float64)  # (P, K)
    step = 1.0 / np.linalg.eigvalsh(d.T @ d).max()
    coef = np.zeros(d.shape[1])
    for _ in range(iterations):
        coef = np.maximum(coef - step * (d.T @ (d @ coef - signal) + lam), 0.0)
    return coef


def test_fista_matches_projected_gradient_reference():
    rng = np.random.default_rng(3)
    batch, k, p = 6, 8, 27
    centre = rng.uniform(0.2, 0.8, size=(batch, 1, p))
    atoms = (centre + 0.1 * rng.normal(size=(batch, k, p))).astype(np.float32)  # near-collinear, like K-NN
    signals = (centre[:, 0] + 0.1 * rng.normal(size=(batch, p))).astype(np.float32)
    for lam in (0.001, 0.05):
        coef = np.asarray(mimecs.nonnegative_lasso(atoms, signals, lam, iterations=3000))
        assert np.all(coef >= 0)
        for b in range(batch):
            reference = _projected_gradient_reference(atoms[b], signals[b].astype(np.float64), lam)
            np.testing.assert_allclose(coef[b], reference, atol=2e-3)
        assert np.any(coef == 0)  # the l1 penalty and the constraint make some coefficients exactly zero


def test_self_atlas_reproduces_target():
    source, target, mask = _subject(4)
    atlas = mimecs.build_atlas([source], [target], [mask], dict_size=int(mask.sum()), seed=0)
    assert len(atlas.source_patches) == mask.sum()
    for k in (1, 4):
        prediction = mimecs.mimecs_synthesize(atlas, source, mask, lam=1e-4, k=k, iterations=200)
        assert np.abs(prediction[mask] - target[mask]).max() < 0.02 * target[mask].max()
        assert np.all(prediction[~mask] == 0)


def test_synthesis_on_another_subject_is_nonnegative_and_masked():
    atlas_source, atlas_target, atlas_mask = _subject(5)
    atlas = mimecs.build_atlas([atlas_source], [atlas_target], [atlas_mask], dict_size=500, seed=1)
    assert len(atlas.source_patches) == 500
    source, target, mask = _subject(6)
    prediction = mimecs.mimecs_synthesize(atlas, source, mask, lam=0.01, k=8)
    assert np.all(prediction >= 0)
    assert np.all(prediction[~mask] == 0)
    assert np.all(prediction[mask] > 0)
    # learned from a different subject, yet much closer to the truth than predicting the mean
    error = np.mean((prediction[mask] - target[mask]) ** 2)
    assert error < 0.5 * np.var(target[mask])
    # values outside the mask are ignored, as for a skull-stripped image
    garbage = np.where(mask, source, 50.0)
    np.testing.assert_array_equal(mimecs.mimecs_synthesize(atlas, garbage, mask, lam=0.01, k=8), prediction)


def test_chunked_equals_unchunked():
    atlas_source, atlas_target, atlas_mask = _subject(7)
    atlas = mimecs.build_atlas([atlas_source], [atlas_target], [atlas_mask], dict_size=300, seed=2)
    source, _, mask = _subject(8)
    whole = mimecs.mimecs_synthesize(atlas, source, mask, k=4, chunk=int(mask.sum()))
    chunked = mimecs.mimecs_synthesize(atlas, source, mask, k=4, chunk=97)
    np.testing.assert_allclose(chunked, whole, atol=1e-5)


def test_build_atlas_is_seeded_and_mimecs_rejects_bad_inputs():
    source, target, mask = _subject(9)
    first = mimecs.build_atlas([source], [target], [mask], dict_size=100, seed=3)
    again = mimecs.build_atlas([source], [target], [mask], dict_size=100, seed=3)
    other = mimecs.build_atlas([source], [target], [mask], dict_size=100, seed=4)
    np.testing.assert_array_equal(first.source_patches, again.source_patches)
    assert not np.array_equal(first.source_patches, other.source_patches)
    with pytest.raises(ValueError):
        mimecs.mimecs_synthesize(first, source, mask, k=101)
    with pytest.raises(ValueError):
        mimecs.mimecs_synthesize(first, source[:-1], mask, k=4)
    with pytest.raises(ValueError):
        mimecs.build_atlas([source], [target], [mask[:-1]], dict_size=10)
    with pytest.raises(ValueError):
        mimecs.build_atlas([source], [target], [mask], dict_size=0)
