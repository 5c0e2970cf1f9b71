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
