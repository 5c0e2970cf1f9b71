"""Training configuration as data: one frozen dataclass and named presets.

`crop` is the edge of the output block one training sample predicts. crop=16 is the paper's patch
protocol (38^3 input -> 16^3 target, step 16). A larger crop ("dense" training) predicts one big block,
e.g. 48^3 from 70^3: with step = crop the targets tile exactly the same brain voxels as the paper's
16^3 patches, but the overlapping input context is computed once instead of per patch, so a trained
voxel costs ~4x fewer FLOPs. BatchNorm then normalises over fewer, larger samples; the loss is the same
per-voxel MSE. `batch_size` counts samples (crops) per global step.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    variant: str = "base"
    source: str = "T1w"
    target: str = "T2w"
    epochs: int = 60
    batch_size: int = 32
    lr: float = 1e-3
    crop: int = 16  # output block edge (16 = the paper's patches)
    patch_step: int | None = None  # grid step of block centres; None: = crop (16 for the paper protocol)
    seed: int = 0
    compute_dtype: str = "float32"  # "bfloat16": bf16 conv inputs, f32 accumulation (fast only on bf16 CPUs/GPUs)
    impl: str | None = None  # convolution implementation (None: mrijax.ops.DEFAULT_IMPL)
    weight_decay: float = 0.0  # L2 on kernels (regularisation study)
    dropout: float = 0.0  # dropout before hidden convs (regularisation study)
    jitter: int = 0  # augmentation: shift block centres by up to this many voxels per axis, anew each epoch
    flip: bool = False  # augmentation: add left-right mirrored copies of the training subjects
    schedule: str = "constant"  # learning rate: "constant" (the paper) or "cosine" decay to 0 over all epochs
    init_from: str | None = None  # warm start (fine-tuning): a model directory or shipped name; fresh optimizer
    max_steps_per_epoch: int | None = None  # cap, for smoke runs
    max_val_batches: int | None = None  # cap, for smoke runs

    @property
    def step(self) -> int:
        return self.patch_step or self.crop

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule {self.schedule!r}: choose constant or cosine")
        if self.jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {self.jitter}")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, TrainConfig] = {
    # Seconds: proves the whole path (tests, CI).
    "smoke": TrainConfig(epochs=2, batch_size=2, crop=16, max_steps_per_epoch=3, max_val_batches=2),
    # Minutes on 2 CPU cores: dense crops; the README's main job.
    "quick": TrainConfig(epochs=6, batch_size=4, crop=32, lr=2e-3, jitter=16, schedule="cosine"),
    # The paper's protocol: 60 epochs, batch 32 of 38^3 -> 16^3 patches on a step-16 grid, Adam 1e-3, MSE.
    "paper": TrainConfig(epochs=60, batch_size=32, crop=16, lr=1e-3),
    # What the shipped models are trained with (see README): dense 48^3 crops (70^3 inputs for base) tiling
    # the brain, cut at new random offsets each epoch, left-right mirrored subjects added, cosine decay.
    "ship": TrainConfig(epochs=40, batch_size=2, crop=48, lr=1e-3, jitter=24, flip=True, schedule="cosine"),
}
