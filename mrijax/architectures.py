"""The paper's CAE architectures as data, and their geometry; free of JAX, so flags can be parsed before it loads.

Every variant is a `CAEConfig`: a list of layer ops ("conv", "pool", "up") plus width and options. The Flax
module that runs any config is `mrijax.models.CAE`, so a new architecture is a new config, not new code.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

AXES = "dhw"


@dataclasses.dataclass(frozen=True)
class CAEConfig:
    """Architecture as data. `layers` is a sequence of ("conv",), ("pool", axes) or ("up", axes)."""

    name: str
    filters: int
    layers: tuple[tuple[str, ...], ...]
    residual: bool = False  # concatenate the last full-resolution encoder output into the first decoder conv
    dropout: float = 0.0  # dropout rate before every hidden conv (regularisation study); 0 = paper
    anchor: bool = False  # LUT-anchored: input [source, LUT(source)], output = LUT(source) + a learned correction
    in_channels: int = 1  # source contrasts fed side by side (e.g. T1w and FLAIR); an anchored model maps the first

    @property
    def n_convs(self) -> int:
        return sum(op[0] == "conv" for op in self.layers)


def cube_layers(before: int, between: int, after: int) -> tuple[tuple[str, ...], ...]:
    """The paper's encoder/decoder: convs, one 2x2x2 pool, convs, one 2x2x2 upsampling, convs."""
    return (
        (("conv",),) * before + (("pool", AXES),) + (("conv",),) * between + (("up", AXES),)
        + (("conv",),) * after
    )


# Progressive pooling (paper Fig. 12): three single-axis pools interleaved with the encoder convs and three
# single-axis upsamplings interleaved with the decoder convs, first pooled = first upsampled, so every axis
# sees four convolutions at half resolution and a cubic 40^3 input maps to a 16^3 output.
PROGRESSIVE_LAYERS = (
    ("conv",), ("pool", "d"), ("conv",), ("pool", "h"), ("conv",), ("pool", "w"),
    ("conv",), ("conv",),
    ("up", "d"), ("conv",), ("up", "h"), ("conv",), ("up", "w"), ("conv",),
)

VARIANT_CONFIGS: dict[str, CAEConfig] = {
    "base": CAEConfig("base", 32, cube_layers(3, 3, 2)),
    "narrow": CAEConfig("narrow", 16, cube_layers(3, 3, 2)),
    "wide": CAEConfig("wide", 48, cube_layers(3, 3, 2)),
    "deep": CAEConfig("deep", 32, cube_layers(4, 4, 3)),
    "shallow": CAEConfig("shallow", 32, cube_layers(2, 2, 1)),
    "progressive": CAEConfig("progressive", 32, PROGRESSIVE_LAYERS),
    "residual": CAEConfig("residual", 32, cube_layers(3, 3, 2), residual=True),
}
VARIANTS: tuple[str, ...] = tuple(VARIANT_CONFIGS)


def get_config(variant: str | CAEConfig) -> CAEConfig:
    if isinstance(variant, CAEConfig):
        return variant
    try:
        return VARIANT_CONFIGS[variant]
    except KeyError:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}") from None


def configure(variant: str | CAEConfig, *, anchor: bool = False, in_channels: int = 1, dropout: float = 0.0) -> CAEConfig:
    """A registered variant with a run's options: LUT anchoring, number of source contrasts, dropout."""
    if in_channels < 1:
        raise ValueError(f"a model needs at least one source contrast, got in_channels={in_channels}")
    return dataclasses.replace(get_config(variant), anchor=anchor, in_channels=in_channels, dropout=dropout)


# ----------------------------------------------------------------------------------------------------------
# Geometry: VALID convs trim 2 voxels per axis, pools halve, upsamplings double.


def input_shape(variant: str | CAEConfig, output: int | Sequence[int] = 16) -> tuple[int, int, int]:
    """Per-axis input size that the network maps to `output` voxels (walks the layers backwards)."""
    cfg = get_config(variant)
    size = list(np.broadcast_to(np.asarray(output, int), (3,)))
    for op in reversed(cfg.layers):
        for i, axis in enumerate(AXES):
            if op[0] == "conv":
                size[i] += 2
            elif axis in op[1] and op[0] == "up":
                if size[i] % 2:
                    raise ValueError(f"{cfg.name}: output {output} is not reachable (odd size before upsampling)")
                size[i] //= 2
            elif axis in op[1] and op[0] == "pool":
                size[i] *= 2
    return tuple(int(s) for s in size)


def input_size(variant: str | CAEConfig, output: int = 16) -> int:
    """Cubic input edge for a cubic `output` (38 for base, 46 deep, 30 shallow, 40 progressive)."""
    shape = input_shape(variant, output)
    assert len(set(shape)) == 1, shape
    return shape[0]


def output_shape(variant: str | CAEConfig, shape: Sequence[int]) -> tuple[int, int, int]:
    """Output shape for an input shape, or ValueError if a pooled size would be odd or too small."""
    cfg = get_config(variant)
    size = list(shape)
    for op in cfg.layers:
        for i, axis in enumerate(AXES):
            if op[0] == "conv":
                size[i] -= 2
            elif axis in op[1] and op[0] == "pool":
                if size[i] % 2:
                    raise ValueError(f"{cfg.name}: input {tuple(shape)} gives an odd size before pooling")
                size[i] //= 2
            elif axis in op[1] and op[0] == "up":
                size[i] *= 2
        if min(size) < 1:
            raise ValueError(f"{cfg.name}: input {tuple(shape)} is too small")
    return tuple(size)


def margin(variant: str | CAEConfig) -> int:
    """Voxels the VALID network trims on each side: output = input - 2 * margin."""
    return (input_size(variant, 16) - 16) // 2


def shift_multiple(variant: str | CAEConfig) -> int:
    """The network commutes with input shifts that are multiples of this (pooling phase)."""
    cfg = get_config(variant)
    return 2 ** max(sum(op[0] == "pool" and a in op[1] for op in cfg.layers) for a in AXES)
