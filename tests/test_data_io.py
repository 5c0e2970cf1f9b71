"""NIfTI I/O, grids, mask, normalisation and subject discovery/loading (synthetic files in tmp_path)."""
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from conftest import ras_affine, synthetic_brain, write_canonical
from mrijax.data import (
    DataError, brain_mask, check_same_grid, discover, load_subject, load_subjects, load_volume, normalise, save_like,
)


def assert_one_line_naming(error: pytest.ExceptionInfo, *paths) -> None:
    message = str(error.value)
    assert "\n" not in message
    for path in paths:
        assert str(path) in message, message


# ---------------------------------------------------------------------------------------------------------
# Orientation round trips


@pytest.mark.parametrize("axcodes", ["RAS", "LAS", "LPS", "PIR"])
@pytest.mark.parametrize("codes", [(1, 0), (2, 1), (4, 4)])
def test_load_is_canonical_and_save_like_restores_original_file_layout(tmp_path, axcodes, codes):
    shape = (6, 7, 5)
    canonical = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    affine = ras_affine(shape, zooms=(1.0, 1.2, 2.0))
    path = write_canonical(tmp_path / "in.nii.gz", canonical, affine, axcodes, codes=codes)
    stored = nib.load(path)
    assert nib.aff2axcodes(stored.affine) == tuple(axcodes)

    volume = load_volume(path)
    assert volume.data.dtype == np.float32
    np.testing.assert_array_equal(volume.data, canonical)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")

    out = save_like(volume.data * 2 + 1, volume, tmp_path / "out" / "result.nii.gz", description="x" * 100)
    written = nib.load(out)
    assert written.shape == stored.shape
    assert written.get_data_dtype() == np.float32
    np.testing.assert_allclose(written.affine, stored.affine, atol=1e-6)
    np.testing.assert_array_equal(written.get_fdata(dtype=np.float32), stored.get_fdata(dtype=np.float32) * 2 + 1)
    for key in ("qform_code", "sform_code"):
        assert int(written.header[key]) == int(stored.header[key])
    np.testing.assert_allclose(written.get_qform(), stored.get_qform(), atol=1e-6)
    np.testing.assert_allclose(written.get_sform(), stored.get_sform(), atol=1e-6)
    assert written.header["descrip"].item().decode() == "x" * 79  # NIfTI keeps 80 bytes incl. terminator
    np.testing.assert_array_equal(load_volume(out).data, volume.data * 2 + 1)


def test_scaled_int16_input_is_read_as_float(tmp_path):
    image = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), np.eye(4))
    image.header.set_slope_inter(0.5, 10.0)
    nib.save(image, tmp_path / "scaled.nii")
    volume = load_volume(tmp_path / "scaled.nii")
    np.testing.assert_allclose(volume.data, np.arange(60).reshape(3, 4, 5) * 0.5 + 10.0)


def test_trailing_singleton_dimension_is_squeezed(tmp_path):
    data = np.random.default_rng(1).random((4, 5, 6, 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "t.nii.gz")
    volume = load_volume(tmp_path / "t.nii.gz")
    np.testing.assert_array_equal(volume.data, data[..., 0])
    save_like(volume.data, volume, tmp_path / "back.nii.gz")
    assert nib.load(tmp_path / "back.nii.gz").shape == (4, 5, 6)


# ---------------------------------------------------------------------------------------------------------
# Bad inputs


def _write_truncated_gzip(path):
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4)), path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


@pytest.mark.parametrize("make_bad", [
    pytest.param(lambda p: None, id="missing"),
    pytest.param(lambda p: p.write_bytes(gzip.compress(b"this is not a NIfTI file" * 20)), id="not-nifti"),
    pytest.param(lambda p: p.write_bytes(b"\x00garbage"), id="not-gzip"),
    pytest.param(_write_truncated_gzip, id="truncated"),
    pytest.param(lambda p: nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 2), np.float32), np.eye(4)), p), id="4D"),
    pytest.param(lambda p: nib.save(nib.Nifti1Image(np.ones((4, 4), np.float32), np.eye(4)), p), id="2D"),
    pytest.param(lambda p: nib.save(nib.Nifti1Image(np.full((3, 3, 3), np.nan, np.float32), np.eye(4)), p), id="NaN"),
    pytest.param(lambda p: nib.save(nib.Nifti1Image(
        np.where(np.eye(3)[None] > 0, np.inf, 1.0).astype(np.float32).repeat(3, 0), np.eye(4)), p), id="Inf"),
])
def test_bad_volume_raises_data_error_naming_the_file(tmp_path, make_bad):
    path = tmp_path / "bad_T1w.nii.gz"
    make_bad(path)
    with pytest.raises(DataError) as error:
        load_volume(path)
    assert_one_line_naming(error, path)


def test_check_same_grid(tmp_path):
    data = np.ones((6, 7, 5), np.float32)
    base = write_canonical(tmp_path / "a.nii.gz", data, ras_affine(data.shape))
    same = write_canonical(tmp_path / "b.nii.gz", data, ras_affine(data.shape) + 1e-5, "LPS")
    shifted_affine = ras_affine(data.shape)
    shifted_affine[0, 3] += 0.01
    shifted = write_canonical(tmp_path / "c.nii.gz", data, shifted_affine)
    other_shape = write_canonical(tmp_path / "d.nii.gz", np.ones((6, 7, 6)), ras_affine((6, 7, 6)))

    check_same_grid(load_volume(base), load_volume(same))  # same grid stored in another orientation
    for bad in (shifted, other_shape):
        with pytest.raises(DataError) as error:
            check_same_grid(load_volume(base), load_volume(bad))
        assert_one_line_naming(error, base, bad)


# ---------------------------------------------------------------------------------------------------------
# Mask and normalisation


def test_mask_rule_small_negatives_are_not_brain():
    source = np.array([[[0.0, -0.01, 5.0, 2.0]]])
    target = np.array([[[3.0, 4.0, -0.02, 1.0]]])
    assert brain_mask(source).tolist() == [[[False, False, True, True]]]
    assert brain_mask(source, target).tolist() == [[[False, False, False, True]]]
    given = np.array([[[0.2, 0.6, 1.0, 0.5]]])
    assert brain_mask(source, target, mask=given).tolist() == [[[False, True, True, False]]]
    with pytest.raises(DataError):
        brain_mask(-np.abs(source))


def test_normalise_brain_mean_is_one_third_and_outside_is_zero():
    images = synthetic_brain(seed=3)
    mask = brain_mask(images["T1w"])
    normalised = normalise(images["T1w"], mask)
    assert normalised.dtype == np.float32
    assert normalised[mask].mean() == pytest.approx(1 / 3, rel=1e-5)
    assert not normalised[~mask].any()
    np.testing.assert_allclose(normalise(images["T1w"] * 37.5, mask), normalised, rtol=1e-5)  # scale-free
    with pytest.raises(DataError):
        normalise(-images["T1w"], mask)


# ---------------------------------------------------------------------------------------------------------
# Discovery and loading


def test_discover_bids_sorted_with_nii_and_masks(tmp_path, synthetic_subject_writer):
    synthetic_subject_writer(tmp_path, "sub-b", mask=True)
    synthetic_subject_writer(tmp_path, "sub-a", suffix=".nii")
    synthetic_subject_writer(tmp_path, "sub-c", modalities=("T1w",))
    with pytest.raises(DataError) as error:
        discover(tmp_path)
    assert_one_line_naming(error, "subject sub-c", tmp_path / "sub-c" / "anat" / "sub-c_T2w.nii.gz")
    entries = discover(tmp_path, require=False)
    assert [e["id"] for e in entries] == ["sub-a", "sub-b"]
    assert entries[0]["T1w"].name == "sub-a_T1w.nii" and entries[0]["mask"] is None
    assert entries[1]["mask"].name == "sub-b_mask.nii.gz"
    assert [e["id"] for e in discover(tmp_path, modalities=("T1w",))] == ["sub-a", "sub-b", "sub-c"]


@pytest.mark.parametrize("delimiter,name", [(",", "list.csv"), ("\t", "manifest.tsv")])
def test_discover_manifest_with_relative_and_absolute_paths(tmp_path, synthetic_subject_writer, delimiter, name):
    one = synthetic_subject_writer(tmp_path / "data", "sub-01", mask=True)
    two = synthetic_subject_writer(tmp_path / "data", "sub-02", seed=1)
    rows = [["subject", "T1w", "T2w", "mask"],
            ["zeta", str(one["T1w"].relative_to(tmp_path)), str(one["T2w"].relative_to(tmp_path)),
             str(one["mask"].relative_to(tmp_path))],
            ["alpha", str(two["T1w"]), str(two["T2w"]), ""],
            ["beta", str(two["T1w"]), "", ""]]
    manifest = tmp_path / name
    manifest.write_text("\n".join(delimiter.join(row) for row in rows) + "\n")
    root = tmp_path if name.startswith("manifest") else manifest
    entries = discover(root, require=False)
    assert [e["id"] for e in entries] == ["alpha", "zeta"]
    assert entries[1]["T1w"] == one["T1w"] and entries[1]["mask"] == one["mask"]
    assert entries[0]["mask"] is None
    with pytest.raises(DataError) as error:
        discover(root)
    assert_one_line_naming(error, "subject beta", "column 'T2w'", manifest)
    with pytest.raises(DataError) as error:
        discover(root, modalities=("T1w", "FLAIR"))
    assert_one_line_naming(error, manifest.name)


def test_load_subject_any_contrast_pair(synthetic_dataset):
    entries = {e["id"]: e for e in discover(synthetic_dataset, ("T1w", "T2w", "FLAIR"))}
    images = synthetic_brain(seed=2)
    for source, target in [("T1w", "T2w"), ("T2w", "T1w"), ("T1w", "FLAIR")]:
        subject = load_subject(entries["sub-03"], source, target)  # stored as LPS
        expected_mask = (images[source] > 0) & (images[target] > 0)
        np.testing.assert_array_equal(subject.mask, expected_mask)
        np.testing.assert_allclose(subject.source, normalise(images[source], expected_mask), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(subject.target, normalise(images[target], expected_mask), rtol=1e-5, atol=1e-7)
    inference = load_subject(entries["sub-03"], "T1w", None)
    assert inference.target is None and inference.paths["target"] is None
    assert inference.source_volume.path == entries["sub-03"]["T1w"]

    with_mask = load_subject(entries["sub-02"])  # the mask file wins over the positivity rule
    np.testing.assert_array_equal(with_mask.mask, synthetic_brain(seed=1)["mask"] > 0.5)


def test_load_subject_rejects_grid_mismatch_and_empty_mask(tmp_path, synthetic_subject_writer):
    paths = synthetic_subject_writer(tmp_path, "sub-01", mask=True)
    write_canonical(paths["mask"], np.ones((10, 10, 10)), ras_affine((10, 10, 10)))  # mask on another grid
    with pytest.raises(DataError) as error:
        load_subject(discover(tmp_path)[0])
    assert_one_line_naming(error, paths["T1w"], paths["mask"])

    write_canonical(paths["mask"], np.zeros((24, 28, 20)), ras_affine((24, 28, 20)))
    with pytest.raises(DataError) as error:
        load_subject(discover(tmp_path)[0])
    assert_one_line_naming(error, paths["mask"])

    paths["mask"].unlink()
    shifted = ras_affine((24, 28, 20))
    shifted[1, 3] += 1.0
    write_canonical(paths["T2w"], synthetic_brain()["T2w"], shifted)
    with pytest.raises(DataError) as error:
        load_subject(discover(tmp_path)[0])
    assert_one_line_naming(error, paths["T1w"], paths["T2w"])


def test_load_subjects_selects_ids_and_skips_incomplete_with_warning(synthetic_dataset, synthetic_subject_writer):
    synthetic_subject_writer(synthetic_dataset, "sub-04", modalities=("T1w",))
    with pytest.warns(UserWarning, match="sub-04"):
        subjects = load_subjects(synthetic_dataset, "T1w", "FLAIR")
    assert [s.id for s in subjects] == ["sub-01", "sub-02", "sub-03"]
    chosen = load_subjects(synthetic_dataset, "T2w", "T1w", ids=["03", "sub-01"])
    assert [s.id for s in chosen] == ["sub-01", "sub-03"]
    with pytest.raises(DataError, match="sub-04"):
        load_subjects(synthetic_dataset, ids=["04"])
    with pytest.raises(DataError, match="nobody"):
        load_subjects(synthetic_dataset, ids=["nobody"])
    with pytest.raises(DataError):
        load_subjects(synthetic_dataset / "does-not-exist")
