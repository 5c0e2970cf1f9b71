"""experiments/hemispheres.py: left/right half masks for own-subject upper bounds."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from mrijax import data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hemispheres():
    spec = importlib.util.spec_from_file_location("hemispheres_cli", REPO / "experiments" / "hemispheres.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_halves_partition_the_brain_left_and_right_in_every_orientation(hemispheres, synthetic_dataset, tmp_path):
    out = tmp_path / "halves"
    # sub-01 RAS, sub-02 LAS with a mask file, sub-03 LPS (kept whole)
    assert hemispheres.main(["--data", str(synthetic_dataset), "--subjects", "01,sub-02", "--keep", "03",
                             "--out", str(out)]) == 0
    loaded = {s.id: s for s in data.load_subjects(out)}
    assert sorted(loaded) == ["sub-01L", "sub-01R", "sub-02L", "sub-02R", "sub-03"]
    originals = {s.id: s for s in data.load_subjects(synthetic_dataset)}
    for sid in ("sub-01", "sub-02"):
        left, right, whole = loaded[f"{sid}L"], loaded[f"{sid}R"], originals[sid]
        assert not (left.mask & right.mask).any()
        np.testing.assert_array_equal(left.mask | right.mask, whole.mask)
        # canonical RAS+: every left voxel lies left of (smaller x than) every right voxel
        assert np.nonzero(left.mask)[0].max() < np.nonzero(right.mask)[0].min()
        assert abs(int(left.mask.sum()) - int(right.mask.sum())) < 0.2 * whole.mask.sum()
        # the images are the originals, normalised over their own half
        np.testing.assert_allclose(left.source[left.mask] * 3 * left.source_volume.data[left.mask].mean(),
                                   whole.source_volume.data[left.mask], rtol=1e-4)
    np.testing.assert_array_equal(loaded["sub-03"].mask, originals["sub-03"].mask)


def test_an_unknown_subject_is_a_one_line_error(hemispheres, synthetic_dataset, tmp_path):
    with pytest.raises(data.DataError, match="unknown subject id.s. 07; available: sub-01"):
        hemispheres.main(["--data", str(synthetic_dataset), "--subjects", "07", "--keep", "01", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
