"""Training configuration as data: one frozen dataclass and named presets.

`crop` is the edge of the output block one training sample predicts. crop=16 is the paper's patch
protocol (38^3 input -> 16^3 target, step 16). A larger crop ("dense" training) predicts one big block,
e.g. 48^3 from 70^3: with step = crop the targets tile exactly the same brain voxels as the paper's
16^3 patches, but the overlapping input context is computed once instead of per patch, so a trained
voxel costs ~4x fewer FLOPs. BatchNorm then normalises over fewer, larger samples. `batch_size` counts
samples (crops) per global step.

Each field's `metadata` carries its command-line help (and flag name or choices where they differ from the
field), so the CLI generates its training flags from this class: a flag is defined here, once.
"""
from __future__ import annotations

import dataclasses

from mrijax.architectures import VARIANTS

# The names of `mrijax.ops.IMPLEMENTATIONS` (tested equal): this module stays free of JAX, so flags parse and bad
# ones fail before it loads.
IMPLS = ("xla", "cm", "winograd", "onednn", "auto")

LOSSES = ("all", "brain")
ANCHORS = ("none", "lut")
AUGMENTS = ("none", "all", "resolution", "strip")


def augment_name(value) -> str:
    """`augment` as a family name; cards and checkpoints written before it named one hold a boolean (true = all)."""
    return ("all" if value else "none") if isinstance(value, bool) else value


def _field(default, help: str, **extra):
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    variant: str = _field("base", "network variant", choices=VARIANTS)
    source: str = _field("T1w", "source contrast (input), a modality name of the data; several, comma-separated "
                         "(T1w,FLAIR), are fed side by side as input channels")
    target: str = _field("T2w", "target contrast (output), a modality name of the data")
    epochs: int = _field(60, "training epochs")
    batch_size: int = _field(32, "global batch: samples (blocks) per step (paper: 32)")
    lr: float = _field(1e-3, "Adam learning rate")
    crop: int = _field(16, "output block edge (16 = the paper's patches; larger = dense training)")
    patch_step: int | None = _field(None, "grid step of block centres (paper: 16; default: = crop)")
    seed: int = _field(0, "seed of initialisation, data order and augmentation")
    compute_dtype: str = _field("float32", "convolution input precision (bfloat16: f32 accumulation, faster "
                                "on bf16 CPUs)", flag="--dtype", choices=("float32", "bfloat16"))
    impl: str | None = _field(None, "convolution implementation (see mrijax.ops; same numbers)",
                              choices=IMPLS)
    workers: int = _field(1, "training processes on this machine, one per core, each with its share of the batch "
                          "and its own BatchNorm statistics, gradients averaged on the host: on CPUs, one "
                          "single-threaded process per core steps faster than one process on all cores (RESULTS.md)")
    weight_decay: float = _field(0.0, "L2 penalty on kernels (regularisation study)")
    dropout: float = _field(0.0, "dropout rate before hidden convolutions (regularisation study)")
    jitter: int = _field(0, "augmentation: shift block centres by up to this many voxels per axis, anew each epoch")
    flip: bool = _field(False, "augmentation: add left-right mirrored copies of the training subjects")
    schedule: str = _field("constant", "learning rate: constant (the paper) or cosine decay to 0 over the run",
                           choices=("constant", "cosine"))
    loss: str = _field("all", "voxels the MSE (loss and validation) averages over: all of the output block "
                       "(the paper) or brain voxels only (no reward for predicting background at the brain edge)",
                       choices=LOSSES)
    anchor: str = _field("none", "lut: the network gets the global intensity look-up table's output (fitted on "
                         "the training subjects, stored in the model) as a second input channel and predicts a "
                         "correction to it, starting from the LUT itself", choices=ANCHORS)
    augment: str = _field("none", "training augmentation. Of the source image, the target untouched: all = random "
                          "intensity curve, contrast, bias field, noise, blur or thick slices; resolution = blur or "
                          "thick slices only. Of the skull stripping: strip = the brain mask eroded by 1-3 voxels "
                          "(source, target and mask) on half of the samples, as other skull-stripping tools would "
                          "draw it", choices=AUGMENTS)
    init_from: str | None = _field(None, "warm start (fine-tuning): a model directory or shipped name; fresh "
                                   "optimizer", metavar="MODEL")
    max_steps_per_epoch: int | None = _field(None, "cap on steps per epoch (smoke runs)")
    max_val_batches: int | None = _field(None, "cap on validation batches (smoke runs)")

    @property
    def step(self) -> int:
        return self.patch_step or self.crop

    def __post_init__(self):
        object.__setattr__(self, "augment", augment_name(self.augment))
        for field in dataclasses.fields(self):
            choices = field.metadata.get("choices")
            if choices and getattr(self, field.name) not in (*choices, field.default):
                raise ValueError(f"{field.name} {getattr(self, field.name)!r}: choose one of {', '.join(choices)}")
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
    # What the shipped base model is trained with (see README): dense 48^3 crops (70^3 inputs for base) tiling
    # the brain, cut at new random offsets each epoch, left-right mirrored subjects added, cosine decay; and the
    # choices the leave-one-source-out CV made (RESULTS.md): the network anchored on the training subjects' LUT,
    # the loss over brain voxels; no source-contrast augmentation (--augment lowered the CV mean at equal budget).
    "ship": TrainConfig(epochs=10, batch_size=2, crop=48, lr=1e-3, jitter=24, flip=True, schedule="cosine",
                        loss="brain", anchor="lut"),
    # Adapting the shipped base to a new scanner from a few paired subjects of it: the ship recipe continued from
    # `t1w-t2w-base` (its LUT refitted on these subjects) for 4 epochs at a lower rate. On the CV's held-out sources,
    # one adaptation subject (100 steps) raised the SNR on the source's other people in 11 of 12 cases (RESULTS.md).
    "adapt": TrainConfig(epochs=4, batch_size=2, crop=48, lr=3e-4, jitter=24, flip=True, schedule="cosine",
                         loss="brain", anchor="lut", init_from="t1w-t2w-base"),
}
