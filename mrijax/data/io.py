"""Reading and writing NIfTI volumes in one canonical orientation, without ever resampling.

Everything inside mrijax works on arrays in RAS+ voxel order (nibabel's closest canonical orientation), so
subjects stored as LAS, LPS or RAS look alike to the model. Results are written back in the orientation,
shape, affine and qform/sform codes of the file they came from, so they overlay the input in any viewer.
Reorienting only permutes and flips axes; nothing is ever interpolated.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import nibabel as nib
import numpy as np

GRID_TOLERANCE = 1e-3  # affine entries (mm) within this count as the same grid
DESCRIP_LENGTH = 80  # size of the NIfTI-1 `descrip` header field

_CANONICAL_ORNT = nib.orientations.axcodes2ornt("RAS")


class DataError(ValueError):
    """Bad user input (files, grids, masks). The message is one line naming the file and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image in canonical RAS+ orientation plus what is needed to write results back like the input."""

    data: np.ndarray  # float32, canonical (RAS+) voxel order
    affine: np.ndarray  # canonical voxel -> world (mm) affine
    header: nib.Nifti1Header  # header of the original file
    reference: nib.Nifti1Image  # the original (3D) image: orientation, shape, affine and codes for `save_like`
    path: Path

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)


def _first_line(error: BaseException, path: Path) -> str:
    """The library error's first line without the file name our message already starts with."""
    text = str(error).strip().splitlines()
    text = re.sub(rf"[\s:,]*'?{re.escape(str(path))}'?", "", text[0]).strip() if text else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_volume(path: str | Path) -> Volume:
    """Load a 3D NIfTI as float32 in canonical RAS+ orientation; any unusable input raises `DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path (expected a .nii or .nii.gz file)")
    try:
        image = nib.load(path)
        image = nib.funcs.squeeze_image(image)  # drops trailing singleton dims, e.g. (X, Y, Z, 1)
        shape = image.shape
        if len(shape) != 3:
            raise DataError(
                f"{path}: image has {len(shape)} dimensions {tuple(shape)}, expected a 3D volume; "
                "extract one 3D volume (e.g. one time point) first")
        canonical = nib.as_closest_canonical(image)
        data = canonical.get_fdata(dtype=np.float32)
    except DataError:
        raise
    except Exception as error:  # nibabel raises many types for corrupt/truncated/non-NIfTI files
        raise DataError(
            f"{path}: cannot read as NIfTI ({_first_line(error, path)}); re-export it as a valid .nii/.nii.gz"
        ) from error
    n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if n_bad:
        raise DataError(f"{path}: {n_bad} voxels are NaN or Inf; replace them (e.g. by 0) before use")
    return Volume(data=data, affine=canonical.affine.copy(), header=image.header, reference=image, path=path)


def to_reference_orientation(data_canonical: np.ndarray, reference: Volume) -> np.ndarray:
    """Undo `load_volume`'s reorientation: canonical-order array -> the reference file's voxel order."""
    if tuple(data_canonical.shape) != reference.shape:
        raise DataError(
            f"{reference.path}: result shape {tuple(data_canonical.shape)} does not match the reference grid "
            f"{reference.shape}; pass an array on the reference's canonical grid")
    original = nib.orientations.io_orientation(reference.reference.affine)
    transform = nib.orientations.ornt_transform(_CANONICAL_ORNT, original)
    return nib.orientations.apply_orientation(data_canonical, transform)


def save_like(data_canonical: np.ndarray, reference_volume: Volume, path: str | Path, description: str = "") -> Path:
    """Write float32 `data_canonical` as NIfTI on the reference's original grid, orientation and header codes."""
    path = Path(path)
    data = np.ascontiguousarray(to_reference_orientation(np.asarray(data_canonical), reference_volume),
                                dtype=np.float32)
    reference = reference_volume.reference
    header = reference.header.copy()
    header.set_data_dtype(np.float32)
    header.set_slope_inter(None, None)  # float output: no integer scaling carried over from the input
    # The reference affine equals the header's best affine, so nibabel keeps the qform/sform and their codes.
    image = nib.Nifti1Image(data, reference.affine, header=header)
    image.header["descrip"] = description.encode("ascii", "replace")[:DESCRIP_LENGTH - 1]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def check_same_grid(a: Volume, b: Volume) -> None:
    """Raise `DataError` unless both volumes share one voxel grid; mrijax never resamples silently."""
    if a.shape != b.shape:
        raise DataError(
            f"{a.path} and {b.path} are on different grids (shape {a.shape} vs {b.shape}); "
            "register/resample them onto one grid before use")
    if not np.allclose(a.affine, b.affine, rtol=0.0, atol=GRID_TOLERANCE):
        raise DataError(
            f"{a.path} and {b.path} are on different grids (affines differ by up to "
            f"{np.abs(a.affine - b.affine).max():.4g} mm); register/resample them onto one grid before use")
