"""The simulated phantom dataset: determinism, tissue contrast, files on disk, cached generation."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from mrijax.data import (
    default_phantom_dir, discover, ensure_phantom_dataset, load_subjects, patch_counts, simulate_subject,
)
from mrijax.data import phantom


@pytest.fixture(scope="module")
def simulated():
    return simulate_subject(seed=0, index=0)


def tissue_mean(subject, contrast, tissue):
    pure = subject["fractions"][tissue] > 0.9
    assert pure.sum() > 20, tissue
    return float(subject["images"][contrast][pure].mean())


def test_simulation_is_deterministic_per_seed(simulated):
    again = simulate_subject(seed=0, index=0)
    for contrast, image in simulated["images"].items():
        np.testing.assert_array_equal(again["images"][contrast], image)
    np.testing.assert_array_equal(again["mask"], simulated["mask"])
    other = simulate_subject(seed=1, index=0)
    assert not np.array_equal(other["images"]["T1w"], simulated["images"]["T1w"])
    assert not np.array_equal(other["mask"], simulated["mask"])  # a different deformation


def test_tissue_contrast_follows_the_signal_equations(simulated):
    means = {(c, t): tissue_mean(simulated, c, t) for c in ("T1w", "T2w", "FLAIR") for t in ("wm", "gm", "csf")}
    assert means["T1w", "wm"] > means["T1w", "gm"] > means["T1w", "csf"]
    assert means["T2w", "wm"] < means["T2w", "gm"] < means["T2w", "csf"]
    assert means["FLAIR", "csf"] < means["FLAIR", "wm"]  # inversion time nulls CSF
    lesion = simulated["fractions"]["lesion"] > 0.5
    assert lesion.any()
    assert simulated["images"]["T1w"][lesion].mean() < means["T1w", "wm"]  # long T1: dark on T1w
    assert simulated["images"]["T2w"][lesion].mean() > means["T2w", "wm"]  # long T2: bright on T2w
    assert not simulated["images"]["T1w"][~simulated["mask"]].any()  # skull-stripped


def test_signal_equations_match_closed_forms():
    tissue = phantom.Tissue(0.7, 1000.0, 80.0)
    spin_echo = phantom.Sequence("spin_echo", tr_ms=1000.0, te_ms=80.0)
    assert phantom.signal(tissue, spin_echo) == pytest.approx(0.7 * (1 - np.exp(-1)) * np.exp(-1))
    ernst = np.rad2deg(np.arccos(np.exp(-20.0 / 1000.0)))  # the spoiled-GRE signal peaks at the Ernst angle
    flips = [ernst - 3, ernst, ernst + 3]
    signals = [phantom.signal(tissue, phantom.Sequence("spoiled_gre", 20.0, 0.0, flip)) for flip in flips]
    assert signals[1] > max(signals[0], signals[2])
    null_ti = 1000.0 * np.log(2 / (1 + np.exp(-9000.0 / 1000.0)))
    assert phantom.signal(tissue, phantom.Sequence("inversion_recovery", 9000.0, 0.0, ti_ms=null_ti)) < 1e-9


def test_written_dataset_loads_like_real_data(phantom_dataset, simulated):
    entries = discover(phantom_dataset, ("T1w", "T2w", "FLAIR"))
    assert [e["id"] for e in entries] == ["sub-phantom01", "sub-phantom02"]
    assert all(e["mask"] is not None for e in entries)
    assert nib.aff2axcodes(nib.load(entries[0]["T1w"]).affine) == ("L", "A", "S")
    assert nib.aff2axcodes(nib.load(entries[1]["T1w"]).affine) == ("R", "A", "S")

    subjects = load_subjects(phantom_dataset, "T1w", "T2w")
    first = subjects[0]
    np.testing.assert_array_equal(first.mask, simulated["mask"])  # same seed/index as written, reoriented back
    np.testing.assert_array_equal(first.source_volume.data, simulated["images"]["T1w"])
    assert first.source[first.mask].mean() == pytest.approx(1 / 3, rel=1e-4)
    assert min(patch_counts(subjects, step=8).values()) > 100
    assert load_subjects(phantom_dataset, "T1w", "FLAIR")[1].target.shape == first.source.shape


def test_default_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MRIJAX_DATA_HOME", str(tmp_path))
    assert default_phantom_dir() == tmp_path / phantom.PHANTOM_VERSION
    monkeypatch.delenv("MRIJAX_DATA_HOME")
    assert default_phantom_dir().parent.name == "mrijax"


def test_ensure_generates_once_and_never_leaves_partial_data(monkeypatch, tmp_path):
    calls = []

    def fake_make(root, **options):  # stands in for the slow simulation: same contract, tiny files
        calls.append(options)
        (root / "sub-phantom01" / "anat").mkdir(parents=True)
        (root / "sub-phantom01" / "anat" / "sub-phantom01_T1w.nii.gz").write_bytes(b"x")
        if options.get("fail"):
            raise KeyboardInterrupt
        return root

    monkeypatch.setattr(phantom, "make_phantom_dataset", fake_make)
    monkeypatch.setenv("MRIJAX_DATA_HOME", str(tmp_path / "home"))
    with pytest.raises(KeyboardInterrupt):
        ensure_phantom_dataset(fail=True)
    assert not default_phantom_dir().exists()
    assert list((tmp_path / "home").iterdir()) == []  # staging folder removed

    root = ensure_phantom_dataset(n_subjects=1)
    assert root == default_phantom_dir() and (root / "sub-phantom01" / "anat").is_dir()
    assert ensure_phantom_dataset() == root and len(calls) == 2  # cached: not generated again
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == [phantom.PHANTOM_VERSION]


def test_random_contrasts_give_each_subject_its_own_protocol_and_keep_the_fixed_one():
    subjects = [simulate_subject(seed=3, index=i, resolution=3, random_contrasts=True) for i in range(6)]
    kinds = {s["sequences"]["T1w"].kind for s in subjects}
    assert kinds == {"spoiled_gre", "inversion_recovery"}  # gradient echo and MPRAGE-like both drawn
    assert len({s["sequences"]["T2w"].te_ms for s in subjects}) == 6
    again = simulate_subject(seed=3, index=0, resolution=3, random_contrasts=True)
    np.testing.assert_array_equal(again["images"]["T1w"], subjects[0]["images"]["T1w"])
    # same anatomy (the deformation stream is shared), different intensities
    fixed = simulate_subject(seed=3, index=0, resolution=3)
    np.testing.assert_array_equal(fixed["mask"], subjects[0]["mask"])
    assert fixed["sequences"] is phantom.SEQUENCES
    ratio = lambda s: tissue_mean(s, "T2w", "csf") / tissue_mean(s, "T2w", "wm")
    assert len({round(ratio(s), 3) for s in subjects}) == 6
    for s in subjects:  # every drawn protocol is still a T1w and a T2w
        assert tissue_mean(s, "T1w", "wm") > tissue_mean(s, "T1w", "gm") > tissue_mean(s, "T1w", "csf")
        assert tissue_mean(s, "T2w", "wm") < tissue_mean(s, "T2w", "gm") < tissue_mean(s, "T2w", "csf")


def test_phantom_command_writes_a_dataset_and_never_overwrites(tmp_path):
    from mrijax.cli import phantom as command

    out = tmp_path / "synthetic"
    assert command.main(["--out", str(out), "--subjects", "2", "--resolution", "4", "--random-contrasts"]) == 0
    assert [e["id"] for e in discover(out, ("T1w", "T2w"))] == ["sub-phantom01", "sub-phantom02"]
    assert "random_contrasts=True" in (out / "README.md").read_text()
    before = sorted(p.stat().st_mtime_ns for p in out.rglob("*.nii.gz"))
    with pytest.raises(ValueError, match="already exists; give a new --out"):
        command.main(["--out", str(out), "--subjects", "2"])
    assert sorted(p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")) == before
