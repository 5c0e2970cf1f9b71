"""Synthesis methods behind one interface, so the CLIs and reports treat the CAE and baselines alike.

A method maps a normalised source volume and its brain mask (canonical arrays) to a prediction in
normalised target units, zero outside the mask. Also: file-level synthesis (`synthesize_file`).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from mrijax import checkpoint, data
from mrijax.inference import synthesize


@dataclasses.dataclass
class CAEMethod:
    """A trained CAE (shipped name, export directory or training workdir)."""

    model: str | None = None
    variables: dict | None = None
    meta: dict | None = None

    def __post_init__(self):
        if self.variables is None:
            self.variables, self.meta = checkpoint.load_model(self.model)

    @property
    def name(self) -> str:
        return f"CAE-{self.meta['variant']}"

    @property
    def source(self) -> str:
        return self.meta.get("source", "T1w")

    @property
    def target(self) -> str:
        return self.meta.get("target", "T2w")

    def predict(self, source, mask):
        return synthesize(self.variables, source, mask)


@dataclasses.dataclass
class MimecsMethod:
    """MIMECS sparse coding over an atlas of subjects with both contrasts."""

    atlas_subjects: list
    name: str = "MIMECS"

    def __post_init__(self):
        from mrijax.baselines import mimecs

        s = self.atlas_subjects
        self._atlas = mimecs.build_atlas([x.source for x in s], [x.target for x in s], [x.mask for x in s])

    def predict(self, source, mask):
        from mrijax.baselines import mimecs

        return mimecs.mimecs_synthesize(self._atlas, source, mask)


@dataclasses.dataclass
class LUTMethod:
    """Global intensity look-up table (conditional mean of target given source) fitted on subjects."""

    train_subjects: list
    name: str = "LUT"

    def __post_init__(self):
        from mrijax.baselines import lut

        s = self.train_subjects
        self._lut = lut.fit_lut([x.source for x in s], [x.target for x in s], [x.mask for x in s])

    def predict(self, source, mask):
        from mrijax.baselines import lut

        return lut.apply_lut(self._lut, source, mask)


def timed_predict(method, source, mask):
    """(prediction, seconds)."""
    t0 = time.perf_counter()
    pred = method.predict(source, mask)
    return np.asarray(pred, np.float32), time.perf_counter() - t0


def synthesize_file(method, input_path, output_path, mask_path=None, target: str = "T2w") -> dict:
    """Synthesize one NIfTI file; the result overlays the input (same grid, orientation, affine, codes)."""
    volume = data.load_volume(input_path)
    mask_volume = None
    if mask_path is not None:
        mask_volume = data.load_volume(mask_path)
        data.check_same_grid(volume, mask_volume)
    mask = data.brain_mask(volume, mask=mask_volume)
    source = data.normalise(volume, mask)
    pred, seconds = timed_predict(method, source, mask)
    description = f"mrijax synth {target} ({method.name}); units: {target}/(3*brain mean)"
    out = data.save_like(pred, volume, output_path, description=description)
    return {"input": str(input_path), "output": str(out), "seconds": seconds, "brain_voxels": int(mask.sum())}
