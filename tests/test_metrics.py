import math

import numpy as np
import pytest

from mrijax import metrics


def _volume(seed=0, shape=(12, 13, 11)):
    """A smooth-ish random volume in [0, 1] with a box-shaped brain mask."""
    rng = np.random.default_rng(seed)
    target = rng.uniform(0.2, 0.8, size=shape)
    mask = np.zeros(shape, dtype=bool)
    mask[2:-2, 2:-3, 1:-2] = True
    return target, mask


def test_constant_error_matches_definitions():
    target, mask = _volume()
    error = 0.05
    pred = target + error
    n = mask.sum()
    assert metrics.mae(pred, target, mask) == pytest.approx(error)
    assert metrics.mse(pred, target, mask) == pytest.approx(error ** 2)
    expected_snr = 10 * math.log10((target[mask].sum() / n) ** 2 / error ** 2)
    assert metrics.snr(pred, target, mask) == pytest.approx(expected_snr)
    assert metrics.psnr(pred, target, mask) == pytest.approx(10 * math.log10(1.0 / error ** 2))
    assert metrics.psnr(pred, target, mask, data_range=2.0) == pytest.approx(10 * math.log10(4.0 / error ** 2))


def test_hand_computed_values_on_tiny_array():
    target = np.array([[[1.0, 2.0, 3.0, 100.0]]])
    pred = np.array([[[1.5, 1.0, 3.0, -50.0]]])
    mask = np.array([[[True, True, True, False]]])
    # errors 0.5, -1, 0 on the three brain voxels
    assert metrics.mae(pred, target, mask) == pytest.approx(1.5 / 3)
    assert metrics.mse(pred, target, mask) == pytest.approx(1.25 / 3)
    assert metrics.snr(pred, target, mask) == pytest.approx(10 * math.log10(2.0 ** 2 / (1.25 / 3)))


def test_perfect_prediction():
    target, mask = _volume()
    assert metrics.mse(target, target, mask) == 0.0
    assert metrics.snr(target, target, mask) == math.inf
    assert metrics.ssim(target, target, mask) == pytest.approx(1.0)


def test_ssim_decreases_with_noise():
    target, mask = _volume(seed=1)
    rng = np.random.default_rng(2)
    noise = rng.normal(size=target.shape)
    scores = [metrics.ssim(target + sigma * noise, target, mask) for sigma in (0.0, 0.02, 0.1, 0.3)]
    assert all(a > b for a, b in zip(scores, scores[1:]))
    assert scores[0] == pytest.approx(1.0)


def test_values_outside_mask_never_matter():
    target, mask = _volume(seed=3)
    rng = np.random.default_rng(4)
    pred = target + 0.1 * rng.normal(size=target.shape)
    garbage_pred = np.where(mask, pred, rng.uniform(-100, 100, size=target.shape))
    garbage_target = np.where(mask, target, rng.uniform(-100, 100, size=target.shape))
    clean = metrics.evaluate(pred, target, mask)
    dirty = metrics.evaluate(garbage_pred, garbage_target, mask)
    assert clean.keys() == set(metrics.METRIC_NAMES)
    for name in metrics.METRIC_NAMES:
        assert dirty[name] == pytest.approx(clean[name], rel=1e-12), name


@pytest.mark.parametrize("fn", [metrics.mae, metrics.mse, metrics.snr, metrics.psnr, metrics.ssim, metrics.evaluate])
def test_bad_inputs_raise(fn):
    target, mask = _volume()
    with pytest.raises(ValueError):
        fn(target[:-1], target, mask)
    with pytest.raises(ValueError):
        fn(target, target, mask[:, :-1])
    with pytest.raises(ValueError):
        fn(target, target, np.zeros_like(mask))


def test_summarise_and_table():
    results = [{"mse": 1.0, "snr": 10.0}, {"mse": 3.0, "snr": 14.0}]
    summary = metrics.summarise(results)
    assert summary["mse"] == pytest.approx((2.0, 1.0))
    assert summary["snr"] == pytest.approx((12.0, 2.0))
    with pytest.raises(ValueError):
        metrics.summarise([])
    with pytest.raises(ValueError):
        metrics.summarise([{"mse": 1.0}, {"snr": 1.0}])
    table = metrics.format_table({"lut": {**summary, "seconds": 1.5}, "cae": summary})
    lines = table.strip().splitlines()
    assert lines[0].split("|")[1:-1] == [" method ", " mse ", " snr ", " seconds "]
    assert len(lines) == 4
    assert lines[2].startswith("| lut | 2 ± 1 | 12 ± 2 | 1.5 |")
    assert lines[3].endswith("|  |")


def test_brats_normalise_clips_to_own_percentiles_with_lower_bound_zero():
    mask = np.ones((1, 1, 201), bool)
    mask[0, 0, :1] = False  # background voxel: zero whatever its value
    image = np.linspace(-100.0, 100.0, 201)[None, None, :]
    lo, hi = 0.0, np.percentile(image[mask], 99.5)  # the 0.5th percentile is negative: the bound becomes 0
    scaled = metrics.brats_normalise(image, mask)
    assert scaled[0, 0, 0] == 0.0 and scaled.min() == 0.0 and scaled.max() == 1.0
    inside = image[mask]
    np.testing.assert_allclose(scaled[mask], (np.clip(inside, lo, hi) - lo) / (hi - lo))
    assert np.all(scaled[mask][inside <= 0] == 0) and np.all(scaled[mask][inside >= hi] == 1)
    with pytest.raises(ValueError, match="no range"):
        metrics.brats_normalise(np.full((4, 4, 4), 2.0), np.ones((4, 4, 4), bool))


def test_brats_ssim_ignores_global_scale_and_outliers_unlike_the_paper_ssim():
    target, mask = _volume(seed=5)
    noisy = target + 0.05 * np.random.default_rng(6).normal(size=target.shape)
    brats = metrics.ssim_brats(noisy, target, mask)
    assert 0 < brats < 1 and metrics.ssim_brats(target, target, mask) == pytest.approx(1.0)
    # a prediction in other units (x 3) scores the same under BraTS' own-percentile scaling, worse in the paper's
    assert metrics.ssim_brats(3 * noisy, target, mask) == pytest.approx(brats, rel=1e-9)
    assert metrics.ssim(3 * noisy, target, mask) < metrics.ssim(noisy, target, mask) - 0.1
    # one hot voxel above the 99.5th percentile is clipped away
    spiked = noisy.copy()
    spiked[np.nonzero(mask)[0][0], np.nonzero(mask)[1][0], np.nonzero(mask)[2][0]] = 1e6
    assert metrics.ssim_brats(spiked, target, mask) == pytest.approx(brats, abs=0.02)
    scores = [metrics.ssim_brats(target + s * np.random.default_rng(7).normal(size=target.shape), target, mask)
              for s in (0.02, 0.1, 0.3)]
    assert scores[0] > scores[1] > scores[2]


def test_evaluate_selects_the_ssim_variant():
    target, mask = _volume(seed=8)
    pred = target + 0.05 * np.random.default_rng(9).normal(size=target.shape)
    paper, brats = metrics.evaluate(pred, target, mask), metrics.evaluate(pred, target, mask, "brats")
    assert paper["ssim"] == metrics.ssim(pred, target, mask) and brats["ssim"] == metrics.ssim_brats(pred, target, mask)
    assert {k: v for k, v in paper.items() if k != "ssim"} == {k: v for k, v in brats.items() if k != "ssim"}
    with pytest.raises(ValueError, match="brats"):
        metrics.evaluate(pred, target, mask, "nope")
