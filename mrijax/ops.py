"""Convolution arithmetic for the CAE: one entry point, several implementations.

`conv3d(x, kernel, bias, impl=...)` computes a VALID 3x3x3 convolution on channels-last input.
- "xla": `lax.conv_general_dilated`, the reference every fast path is tested against. Best on GPU.
- "matmul": the convolution as one matrix product per block of the volume, with a hand-written backward
  (`jax.custom_vjp`). XLA:CPU runs 3D convolutions ~5-10x below its matmul speed, and autodiff of the
  slicing/concatenation a matmul formulation needs is slow too, so both directions are spelled as matmuls.

The matmul form splits the 27 taps between the two matrix sides. Taps whose shifted copies are concatenated
into the input channels ("inner" taps) grow the contraction K = taps_in * Cin at the cost of copying the input
that many times; taps produced as extra output channels ("outer" taps, N = taps_out * Cout) are summed with
shifted views afterwards. `inner_axes` picks the split per layer shape (Cin=1: all 27 inner; Cout=1: all
outer; otherwise the 3 W taps inner, 9 (D, H) taps outer). The volume is processed in D-blocks (one
`lax.map` step each) so each block's copies stay near the cache instead of streaming 9-27x the volume.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from jax import lax

DIMENSION_NUMBERS = ("NDHWC", "DHWIO", "NDHWC")
BLOCK_VOXELS = 8192  # input voxels per block (one D-block of one sample); tuned on a 2-core AVX2 CPU


def conv3d_xla(x, kernel):
    return lax.conv_general_dilated(x, kernel, (1, 1, 1), "VALID", dimension_numbers=DIMENSION_NUMBERS,
                                    preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# Matmul formulation


def inner_axes(cin: int, cout: int) -> int:
    """How many trailing spatial axes (W, then H, then D) put their taps into the contraction."""
    if cin == 1:
        return 3  # K = 27: the full im2col of a one-channel input is small
    if cout == 1:
        return 0  # N = 27 * 1: every tap as an output channel, no input copies at all
    return 1  # K = 3 * Cin, N = 9 * Cout: balanced, only 3 input copies


def _inner_copies(x, n_inner: int, out_sizes):
    """Concatenate the 3 shifts of each of the last n_inner spatial axes into channels (tap-major)."""
    copies = [x]
    for axis in range(3 - n_inner, 3):
        copies = [lax.slice_in_dim(c, s, s + out_sizes[axis], axis=1 + axis) for c in copies for s in range(3)]
    return jnp.concatenate(copies, axis=-1) if len(copies) > 1 else x


def _outer_taps(n_inner: int):
    return list(itertools.product(range(3), repeat=3 - n_inner))


def _outer_view(y, taps, out_sizes):
    """y[..., taps-selected] shifted by the outer tap offsets, cropped to the output."""
    index = tuple(slice(t, t + out_sizes[i]) for i, t in enumerate(taps))
    return y[(slice(None),) + index]


def _conv_block(x, kernel):
    """Unblocked matmul conv of x (B, D, H, W, Cin); f32 result (B, D-2, H-2, W-2, Cout)."""
    cin, cout = kernel.shape[3:]
    n_inner = inner_axes(cin, cout)
    n_outer = 3 - n_inner
    out_sizes = tuple(s - 2 for s in x.shape[1:4])
    cols = _inner_copies(x, n_inner, out_sizes)
    # kernel as (inner taps..., Cin) x (outer taps..., Cout), matching the copy order above
    order = tuple(range(n_outer, 3)) + (3,) + tuple(range(n_outer)) + (4,)
    matrix = kernel.transpose(order).reshape(3 ** n_inner * cin, 3 ** n_outer * cout)
    y = jnp.dot(cols, matrix, preferred_element_type=jnp.float32)
    if n_outer == 0:
        return y
    y = y.reshape(y.shape[:-1] + (3 ** n_outer, cout))
    out = None
    for i, taps in enumerate(_outer_taps(n_inner)):
        part = _outer_view(y[..., i, :], taps, out_sizes)
        out = part if out is None else out + part
    return out


def _kernel_grad_block(x, dy):
    """d(sum(conv(x, k) * dy))/dk for one block: (3, 3, 3, Cin, Cout) in f32."""
    cin, cout = x.shape[-1], dy.shape[-1]
    n_inner = inner_axes(cin, cout)
    out_sizes = dy.shape[1:4]
    cols = _inner_copies(x, n_inner, out_sizes)
    rows = dy.reshape(-1, cout)
    parts = []
    for taps in _outer_taps(n_inner):
        view = _outer_view(cols, taps, out_sizes)
        parts.append(jnp.dot(view.reshape(-1, view.shape[-1]).T, rows, preferred_element_type=jnp.float32))
    grad = jnp.stack(parts)  # (outer taps, inner taps * Cin, Cout)
    n_outer = 3 - n_inner
    grad = grad.reshape((3,) * n_outer + (3,) * n_inner + (cin, cout))
    return grad


def _block_depth(shape) -> int:
    """Output planes per block so that a block holds about BLOCK_VOXELS input voxels (at least 2 planes)."""
    _, d, h, w, _ = shape
    return int(max(2, min(d - 2, BLOCK_VOXELS // (h * w) - 2)))


def _conv_matmul_fwd_value(x, kernel):
    """Blocked matmul conv: lax.map over (sample, D-block) keeps every block's copies cache-sized."""
    b, d = x.shape[:2]
    out_d = d - 2
    depth = _block_depth(x.shape)
    n = -(-out_d // depth)
    if n * b == 1:
        return _conv_block(x, kernel)
    xp = jnp.pad(x, ((0, 0), (0, n * depth - out_d), (0, 0), (0, 0), (0, 0)))

    def one(i):
        block = lax.dynamic_slice(xp, (i // n, (i % n) * depth, 0, 0, 0), (1, depth + 2) + xp.shape[2:])
        return _conv_block(block, kernel)[0]

    y = lax.map(one, jnp.arange(b * n))
    y = y.reshape((b, n * depth) + y.shape[2:])
    return y[:, :out_d]


def _kernel_grad(x, dy):
    b, out_d = dy.shape[:2]
    depth = _block_depth(x.shape)
    n = -(-out_d // depth)
    if n * b == 1:
        return _kernel_grad_block(x, dy)
    pad = n * depth - out_d
    xp = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    dyp = jnp.pad(dy, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))  # zero rows contribute nothing

    def one(carry, i):
        start = (i // n, (i % n) * depth, 0, 0, 0)
        xb = lax.dynamic_slice(xp, start, (1, depth + 2) + xp.shape[2:])
        dyb = lax.dynamic_slice(dyp, start, (1, depth) + dyp.shape[2:])
        return carry + _kernel_grad_block(xb, dyb), None

    cin, cout = x.shape[-1], dy.shape[-1]
    grad, _ = lax.scan(one, jnp.zeros((3, 3, 3, cin, cout), jnp.float32), jnp.arange(b * n))
    return grad


@jax.custom_vjp
def conv3d_matmul(x, kernel):
    return _conv_matmul_fwd_value(x, kernel)


def _matmul_fwd(x, kernel):
    return _conv_matmul_fwd_value(x, kernel), (x, kernel)


def _matmul_bwd(residuals, dy):
    x, kernel = residuals
    dy = dy.astype(x.dtype)
    # input gradient = full convolution = VALID conv of the 2-padded gradient with the flipped, transposed kernel
    flipped = kernel[::-1, ::-1, ::-1].swapaxes(3, 4)
    dy_padded = jnp.pad(dy, ((0, 0), (2, 2), (2, 2), (2, 2), (0, 0)))
    dx = _conv_matmul_fwd_value(dy_padded, flipped)
    dk = _kernel_grad(x, dy)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


conv3d_matmul.defvjp(_matmul_fwd, _matmul_bwd)


IMPLEMENTATIONS = {"xla": conv3d_xla, "matmul": conv3d_matmul}
DEFAULT_IMPL = "matmul"


def best_impl() -> str:
    """The fastest correct impl for the current backend: hand-made matmuls on CPU, cuDNN/XLA convs elsewhere."""
    return DEFAULT_IMPL if jax.default_backend() == "cpu" else "xla"


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
