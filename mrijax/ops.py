"""Convolution arithmetic for the CAE: one entry point, several implementations.

`conv3d(x, kernel, bias, impl=...)` computes a VALID 3x3x3 convolution on channels-last input.
- "xla": `lax.conv_general_dilated`, the reference every fast path is tested against.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

DIMENSION_NUMBERS = ("NDHWC", "DHWIO", "NDHWC")


def conv3d_xla(x, kernel):
    return lax.conv_general_dilated(x, kernel, (1, 1, 1), "VALID", dimension_numbers=DIMENSION_NUMBERS,
                                    preferred_element_type=jnp.float32)


IMPLEMENTATIONS = {"xla": conv3d_xla}


def conv3d(x, kernel, bias, impl: str = "xla", compute_dtype=jnp.float32):
    """VALID 3x3x3 conv of x (B, D, H, W, Cin) with kernel (3, 3, 3, Cin, Cout); f32 result.

    compute_dtype=bfloat16 rounds inputs and kernel to bf16 and accumulates in f32 (fast on AMX CPUs).
    """
    try:
        fn = IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(f"unknown conv impl {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}") from None
    y = fn(x.astype(compute_dtype), kernel.astype(compute_dtype))
    return y.astype(jnp.float32) + bias.astype(jnp.float32)
