"""The data path: NIfTI I/O in canonical orientation, subjects, normalisation, patches and the phantom dataset."""
from mrijax.data.io import DataError, Volume, check_same_grid, load_volume, save_like, to_reference_orientation
from mrijax.data.patches import (
    epoch_seed, extract_patch, jitter_records, num_batches, patch_centres, patch_counts, patch_dataset, patch_records,
)
from mrijax.data.phantom import default_phantom_dir, ensure_phantom_dataset, make_phantom_dataset, simulate_subject
from mrijax.data.preprocessing import brain_mask, normalise, normalise_sources
from mrijax.data.subjects import (
    Subject, discover, find_subjects, load_subject, load_subjects, mirrored, source_names,
)

__all__ = [
    "DataError", "Volume", "check_same_grid", "load_volume", "save_like", "to_reference_orientation",
    "epoch_seed", "extract_patch", "jitter_records", "num_batches", "patch_centres", "patch_counts", "patch_dataset",
    "patch_records",
    "default_phantom_dir", "ensure_phantom_dataset", "make_phantom_dataset", "simulate_subject",
    "brain_mask", "normalise", "normalise_sources",
    "Subject", "discover", "find_subjects", "load_subject", "load_subjects", "mirrored", "source_names",
]
