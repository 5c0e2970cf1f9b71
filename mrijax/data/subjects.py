"""Finding and loading paired subjects (source contrast -> target contrast) from a folder or a manifest.

Two layouts are understood:
- BIDS-like: `root/sub-<id>/anat/sub-<id>_<modality>.nii.gz` (or `.nii`), `<modality>` e.g. T1w, T2w,
  FLAIR, and an optional `sub-<id>_mask.nii.gz`;
- a manifest (CSV or TSV; `root` is the file, or a folder holding `manifest.csv`/`manifest.tsv`) with a
  `subject` column, one column per modality and an optional `mask` column. Relative paths are relative to
  the manifest's folder; an empty cell means "not available".
Any pair of contrasts works (T1w->T2w, T2w->T1w, T1w->FLAIR, ...): they are just column/file names. Several
source contrasts are named with commas ("T1w,FLAIR"): the first is the primary one (the brain mask without a
mask file, the look-up tables), the others ride along as extra input channels.
"""
from __future__ import annotations

import csv
import dataclasses
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from mrijax.data.io import DataError, Volume, check_same_grid, load_volume
from mrijax.data.preprocessing import brain_mask, normalise

MANIFEST_NAMES = ("manifest.csv", "manifest.tsv")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclasses.dataclass(eq=False)
class Subject:
    """One subject, ready for patches: canonical float32 arrays normalised to brain mean 1/3."""

    id: str
    source: np.ndarray  # the primary (first) source contrast
    target: np.ndarray | None  # None for inference-only subjects
    mask: np.ndarray  # bool
    affine: np.ndarray  # canonical affine shared by source, target and mask
    source_volume: Volume  # original source image, to write synthesised results back like it
    paths: dict[str, Path | None]
    extra_sources: tuple[np.ndarray, ...] = ()  # further source contrasts ("T1w,FLAIR": the FLAIR), same grid

    @property
    def inputs(self) -> np.ndarray:
        """What a model reads: the source (D, H, W), or every source contrast channels-last (D, H, W, C)."""
        if not self.extra_sources:
            return self.source
        return np.stack([self.source, *self.extra_sources], axis=-1)


def source_names(source: str) -> list[str]:
    """The contrasts of a source spec: "T1w" -> ["T1w"], "T1w,FLAIR" -> ["T1w", "FLAIR"]."""
    names = [name.strip() for name in str(source).split(",") if name.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"source {source!r}: name one or more distinct contrasts, comma-separated (e.g. T1w,FLAIR)")
    return names


def mirrored(subject: Subject, axis: int = 0) -> Subject:
    """The subject flipped along one canonical axis (0 = left-right in RAS+), as a training augmentation.

    Brains are roughly left-right symmetric, so the mirror image is a plausible new subject with the same
    source -> target relation. Its id gets a "~flip<axis>" suffix; arrays are copies.
    """
    flip = lambda a: None if a is None else np.ascontiguousarray(np.flip(a, axis))
    return dataclasses.replace(subject, id=f"{subject.id}~flip{axis}", source=flip(subject.source),
                               target=flip(subject.target), mask=flip(subject.mask),
                               extra_sources=tuple(flip(a) for a in subject.extra_sources))


def _find_nifti(folder: Path, stem: str) -> Path | None:
    for suffix in NIFTI_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _scan_bids(root: Path, modalities: Sequence[str]) -> list[dict]:
    entries = []
    for anat in sorted(root.glob("sub-*/anat")):
        subject_id = anat.parent.name
        entry = {"id": subject_id}
        for modality in (*modalities, "mask"):
            entry[modality] = _find_nifti(anat, f"{subject_id}_{modality}")
        entries.append(entry)
    return entries


def _scan_manifest(manifest: Path, modalities: Sequence[str]) -> list[dict]:
    delimiter = "\t" if manifest.suffix.lower() == ".tsv" else ","
    try:
        with open(manifest, newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter=delimiter))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{manifest}: cannot read manifest ({error}); write it as UTF-8 CSV/TSV") from error
    columns = set(rows[0]) if rows else set()
    missing_columns = [c for c in ("subject", *modalities) if c not in columns]
    if missing_columns:
        raise DataError(f"{manifest}: manifest lacks column(s) {', '.join(missing_columns)}; add a header row with "
                        f"'subject', {', '.join(repr(m) for m in modalities)} and optionally 'mask'")

    def resolve(cell: str | None) -> Path | None:
        if not cell or not cell.strip():
            return None
        path = Path(cell.strip()).expanduser()
        return path if path.is_absolute() else manifest.parent / path

    entries = []
    for row in rows:
        entry = {"id": row["subject"].strip()}
        for modality in (*modalities, "mask"):
            entry[modality] = resolve(row.get(modality))
        entries.append(entry)
    return entries


def _manifest_of(root: Path) -> Path | None:
    """The manifest `root` names (a file, or manifest.csv/.tsv in a folder), or None for a BIDS-like folder."""
    if root.is_file():
        return root
    if root.is_dir():
        return next((root / name for name in MANIFEST_NAMES if (root / name).is_file()), None)
    raise DataError(f"{root}: no such folder or manifest; pass a data folder or a CSV/TSV manifest")


def _scan(root: str | Path, modalities: Sequence[str]) -> list[dict]:
    """All subjects under `root`, sorted by id, with None for any modality file that is not there."""
    root = Path(root)
    manifest = _manifest_of(root)
    entries = _scan_manifest(manifest, modalities) if manifest else _scan_bids(root, modalities)
    if not entries:
        raise DataError(f"{root}: no subjects found; expected sub-<id>/anat/sub-<id>_<modality>.nii.gz "
                        "folders or a manifest.csv with a 'subject' column")
    for entry in entries:  # a listed file that does not exist counts as missing
        for key, value in entry.items():
            if key != "id" and value is not None and not Path(value).is_file():
                entry[key] = None
    ids = [entry["id"] for entry in entries]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DataError(f"{root}: subject id(s) {', '.join(duplicates)} listed more than once; make ids unique")
    return sorted(entries, key=lambda entry: entry["id"])


def _missing(entry: dict, modalities: Sequence[str]) -> list[str]:
    return [modality for modality in modalities if entry.get(modality) is None]


def _missing_error(entry: dict, missing: Sequence[str], root: str | Path) -> DataError:
    """Name the subject and where its missing file was expected: the BIDS path or the manifest column."""
    root, modality = Path(root), missing[0]
    manifest = _manifest_of(root)
    where = (f"column '{modality}' of {manifest} is empty or names no existing file" if manifest
             else f"{root / entry['id'] / 'anat' / entry['id']}_{modality}.nii.gz does not exist")
    return DataError(f"subject {entry['id']} has no {', '.join(missing)} image: {where}; "
                     "add the file or leave the subject out")


def discover(root: str | Path, modalities: Sequence[str] = ("T1w", "T2w"), require: bool = True) -> list[dict]:
    """Subjects under `root` as dicts {"id", <modality>: path, "mask": path | None}, sorted by id.

    A subject lacking one of `modalities` raises `DataError` when `require`, else it is skipped.
    """
    entries = []
    for entry in _scan(root, modalities):
        missing = _missing(entry, modalities)
        if missing and require:
            raise _missing_error(entry, missing, root)
        if not missing:
            entries.append(entry)
    return entries


def load_subject(entry: dict, source: str = "T1w", target: str | None = "T2w") -> Subject:
    """Load, grid-check, mask and normalise one discovered subject (`target=None` for inference only); `source`
    may name several contrasts ("T1w,FLAIR"), each normalised by its own brain mean."""
    sources = source_names(source)
    missing = _missing(entry, sources + ([target] if target else []))
    if missing:
        raise DataError(f"subject {entry['id']} has no {', '.join(missing)} image in {entry}; "
                        "use discover() with these modalities")
    source_volume, *extra_volumes = [load_volume(entry[name]) for name in sources]
    target_volume = load_volume(entry[target]) if target else None
    mask_volume = load_volume(entry["mask"]) if entry.get("mask") else None
    for other in (*extra_volumes, target_volume, mask_volume):
        if other is not None:
            check_same_grid(source_volume, other)
    mask = brain_mask(source_volume, target_volume, mask_volume)
    paths = {"source": source_volume.path, "target": target_volume.path if target_volume else None,
             "mask": mask_volume.path if mask_volume else None,
             **{name: volume.path for name, volume in zip(sources[1:], extra_volumes)}}
    return Subject(
        id=entry["id"],
        source=normalise(source_volume, mask),
        target=normalise(target_volume, mask) if target_volume is not None else None,
        mask=mask,
        affine=source_volume.affine,
        source_volume=source_volume,
        paths=paths,
        extra_sources=tuple(normalise(volume, mask) for volume in extra_volumes),
    )


def _matches(subject_id: str, wanted: str) -> bool:
    return subject_id == wanted or subject_id == f"sub-{wanted}"


def find_subjects(root: str | Path, modalities: Sequence[str], ids: Sequence[str] | None = None) -> list[dict]:
    """The discovered entries (ids and file paths, nothing loaded) of every subject, or of those in `ids` (with or
    without the `sub-` prefix), that has all `modalities`.

    Subjects requested by `ids` must be complete (else `DataError`); without `ids`, incomplete subjects are
    skipped with a warning, so e.g. T1w->FLAIR works on a folder where some subjects have no FLAIR.
    """
    modalities = list(modalities)
    entries = _scan(root, modalities)
    if ids is not None:
        unknown = [i for i in ids if not any(_matches(e["id"], i) for e in entries)]
        if unknown:
            raise DataError(f"{root}: unknown subject id(s) {', '.join(unknown)}; "
                            f"available: {', '.join(e['id'] for e in entries)}")
        entries = [e for e in entries if any(_matches(e["id"], i) for i in ids)]
        for entry in entries:
            missing = _missing(entry, modalities)
            if missing:
                raise _missing_error(entry, missing, root)
    else:
        incomplete = [e["id"] for e in entries if _missing(e, modalities)]
        if incomplete:
            warnings.warn(f"{root}: skipping subject(s) without {' and '.join(modalities)}: {', '.join(incomplete)}",
                          stacklevel=2)
        entries = [e for e in entries if not _missing(e, modalities)]
        if not entries:
            raise DataError(f"{root}: no subject has both {' and '.join(modalities)}; check the modality names")
    return entries


def load_subjects(root: str | Path, source: str = "T1w", target: str | None = "T2w",
                  ids: Sequence[str] | None = None) -> list[Subject]:
    """Load every subject (or those in `ids`) that has every source contrast and the target; see `find_subjects`."""
    modalities = source_names(source) + ([target] if target else [])
    return [load_subject(entry, source, target) for entry in find_subjects(root, modalities, ids)]
