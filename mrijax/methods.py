"""Synthesis methods behind one interface, so the CLIs and reports treat the CAE and baselines alike.

A method maps a normalised source volume and its brain mask (canonical arrays) to a prediction in
normalised target units, zero outside the mask. The source is `Subject.inputs`: (D, H, W), or (D, H, W, C) with
several source contrasts, of which the baselines read the first. Also: file-level synthesis (`synthesize_file`).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from mrijax import checkpoint, data
from mrijax.inference import DEFAULT_TILE, synthesize_normalised


@dataclasses.dataclass
class CAEMethod:
    """A trained CAE (shipped name, export directory or training workdir)."""

    model: str | None = None
    variables: dict | None = None
    meta: dict | None = None
    compute_dtype: str = "float32"  # "bfloat16": faster on CPUs with bf16 units, f32 accumulation
    tile: int | None = DEFAULT_TILE  # output tile edge of the whole-volume pass (None or 0: one pass)
    flip: bool = False  # test-time augmentation: average with the mirrored volume's prediction

    def __post_init__(self):
        if self.variables is None:
            self.variables, self.meta = checkpoint.load_model(self.model)

    @property
    def name(self) -> str:
        members = self.meta.get("members")
        return f"CAE-{self.meta['variant']}" + (f"x{len(members)}" if members else "")

    @property
    def source(self) -> str:
        return self.meta.get("source", "T1w")

    @property
    def target(self) -> str:
        return self.meta.get("target", "T2w")

    def predict(self, source, mask):
        return synthesize_normalised(self.variables, source, mask, compute_dtype=self.compute_dtype, tile=self.tile,
                                     flip=self.flip)


@dataclasses.dataclass
class BaselineMethod:
    """A baseline fitted on subjects with both contrasts: model = fit(sources, targets, masks), then
    prediction = apply(model, source, mask)."""

    name: str
    fit: Callable
    apply: Callable
    train_subjects: list

    def __post_init__(self):
        s = self.train_subjects
        self._model = self.fit([x.source for x in s], [x.target for x in s], [x.mask for x in s])

    def predict(self, source, mask):
        source = np.asarray(source)
        return self.apply(self._model, source[..., 0] if source.ndim == 4 else source, mask)


def lut_method(train_subjects) -> BaselineMethod:
    """Global intensity look-up table (conditional mean of target given source)."""
    from mrijax.baselines import lut

    return BaselineMethod("LUT", lut.fit_lut, lut.apply_lut, train_subjects)


def mimecs_method(atlas_subjects) -> BaselineMethod:
    """MIMECS sparse coding over an atlas of subjects."""
    from mrijax.baselines import mimecs

    return BaselineMethod("MIMECS", mimecs.build_atlas, mimecs.mimecs_synthesize, atlas_subjects)


def timed_predict(method, source, mask):
    """(prediction, seconds)."""
    t0 = time.perf_counter()
    pred = method.predict(source, mask)
    return np.asarray(pred, np.float32), time.perf_counter() - t0


def synthesize_file(method, input_paths, output_path, mask_path=None, target: str = "T2w") -> dict:
    """Synthesize from one NIfTI file, or from one per source contrast (a list, the model's order); the result
    overlays the first (same grid, orientation, affine, codes)."""
    paths = list(input_paths) if isinstance(input_paths, (list, tuple)) else [input_paths]
    volume, *extra = [data.load_volume(path) for path in paths]
    mask_volume = data.load_volume(mask_path) if mask_path is not None else None
    for other in (*extra, mask_volume):
        if other is not None:
            data.check_same_grid(volume, other)
    mask = data.brain_mask(volume, mask=mask_volume)
    pred, seconds = timed_predict(method, data.normalise_sources([volume, *extra], mask), mask)
    description = f"mrijax synth {target} ({method.name}); units: {target}/(3*brain mean)"
    out = data.save_like(pred, volume, output_path, description=description)
    return {"input": ", ".join(str(p) for p in paths), "output": str(out), "seconds": seconds,
            "brain_voxels": int(mask.sum())}
