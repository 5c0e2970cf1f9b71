"""Convolution arithmetic for the CAE: one entry point, several implementations.

`conv3d(x, kernel, bias, impl=...)` computes a VALID 3x3x3 convolution on channels-last input.
- "xla": `lax.conv_general_dilated`, the reference every fast path is tested against. Best on GPU.
- "matmul": the convolution as one matrix product per block of the volume, with a hand-written backward
  (`jax.custom_vjp`). XLA:CPU runs 3D convolutions ~5-10x below its matmul speed, and autodiff of the
  slicing/concatenation a matmul formulation needs is slow too, so both directions are spelled as matmuls.

The matmul form splits the 27 taps between the two matrix sides. Taps whose shifted copies are concatenated
into the input channels ("inner" taps) grow the contraction K = taps_in * Cin at the cost of copying the input
that many times; taps produced as extra output channels ("outer" taps, N = taps_out * Cout) are summed with
shifted views afterwards. The D taps are always outer, so the input is cut into disjoint D-blocks (one
`lax.map` step each, its copies near the cache) with no halo to recompute; `inner_axes` picks the rest per
layer shape (Cout=1: all 27 taps outer; otherwise the 9 (H, W) taps inner, K = 9 Cin, N = 3 Cout).
The price is a tap-output tensor 3x (27x for Cout=1) the size of the output, summed in one fused pass.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from jax import lax

DIMENSION_NUMBERS = ("NDHWC", "DHWIO", "NDHWC")
BLOCK_VOXELS = 8192  # input voxels per D-block; 1.5k-30k measured alike (within noise) on a 2-core AVX2 CPU


def conv3d_xla(x, kernel):
    return lax.conv_general_dilated(x, kernel, (1, 1, 1), "VALID", dimension_numbers=DIMENSION_NUMBERS,
                                    preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# Matmul formulation


def inner_axes(cin: int, cout: int) -> int:
    """How many trailing spatial axes (W, then H) put their taps into the contraction; D taps stay outputs.

    Keeping the D taps as outputs means disjoint D-blocks of the input need no halo (no recomputation).
    """
    if cout == 1:
        return 0  # K = Cin, N = 27: every tap as an output channel, no input copies at all
    return 2  # K = 9 * Cin, N = 3 * Cout


def _contraction_copies(x, n_inner: int):
    """Concatenate the 3 shifts of each of the last n_inner spatial axes into channels (tap-major order).

    x is (..., D, H, W, C); the shifted axes shrink by 2 (VALID).
    """
    copies = [x]
    for axis in range(x.ndim - 1 - n_inner, x.ndim - 1):
        size = x.shape[axis] - 2
        copies = [lax.slice_in_dim(c, s, s + size, axis=axis) for c in copies for s in range(3)]
    return jnp.concatenate(copies, axis=-1) if len(copies) > 1 else x


def _outer_taps(n_inner: int):
    return list(itertools.product(range(3), repeat=3 - n_inner))


def _block_depth(shape) -> int:
    """Input D-planes per block, about BLOCK_VOXELS voxels, so a block's copies stay near the cache."""
    _, d, h, w, _ = shape
    return int(max(1, min(d, BLOCK_VOXELS // (h * w))))


def _map_d_blocks(fn, *arrays):
    """fn over disjoint D-blocks of one sample each (arrays share B and D); zero-pads D to whole blocks."""
    b, d = arrays[0].shape[:2]
    depth = _block_depth(arrays[0].shape)
    n = -(-d // depth)
    blocks = [jnp.pad(a, ((0, 0), (0, n * depth - d)) + ((0, 0),) * (a.ndim - 2)).reshape(
        (b * n, depth) + a.shape[2:]) for a in arrays]
    return lax.map(lambda args: fn(*args), blocks), (b, n, depth)


def _conv_matmul_value(x, kernel):
    """VALID conv as per-block products (input copies) @ (kernel matrix), then a sum of shifted tap outputs."""
    cin, cout = kernel.shape[3:]
    n_inner = inner_axes(cin, cout)
    n_outer = 3 - n_inner
    order = tuple(range(n_outer, 3)) + (3,) + tuple(range(n_outer)) + (4,)
    matrix = kernel.transpose(order).reshape(3 ** n_inner * cin, 3 ** n_outer * cout)
    y, (b, n, depth) = _map_d_blocks(
        lambda block: jnp.dot(_contraction_copies(block, n_inner), matrix, preferred_element_type=jnp.float32), x)
    y = y.reshape((b, n * depth) + y.shape[2:-1] + (3 ** n_outer, cout))
    out_sizes = tuple(s - 2 for s in x.shape[1:4])
    out = None
    for i, taps in enumerate(_outer_taps(n_inner)):
        index = tuple(slice(t, t + out_sizes[a]) for a, t in enumerate(taps)) + (slice(None),) * n_inner
        part = y[(slice(None),) + index + (i,)]
        out = part if out is None else out + part
    return out


def _kernel_grad(x, dy):
    """d(sum(conv(x, k) * dy))/dk, blockwise like the forward: (copies)^T @ (dy shifted by every outer tap)."""
    cin, cout = x.shape[-1], dy.shape[-1]
    n_inner = inner_axes(cin, cout)
    n_outer = 3 - n_inner
    # shifted[q, tap] = dy[q - tap] (zero outside) at every input position q of the outer axes
    shifted = jnp.concatenate([
        jnp.pad(dy, ((0, 0),) + tuple((t, 2 - t) for t in taps) + ((0, 0),) * (n_inner + 1))
        for taps in _outer_taps(n_inner)], axis=-1)

    def block_grad(xb, sb):
        cols = _contraction_copies(xb, n_inner)
        return jnp.dot(cols.reshape(-1, cols.shape[-1]).T, sb.reshape(-1, sb.shape[-1]),
                       preferred_element_type=jnp.float32)

    parts, _ = _map_d_blocks(block_grad, x, shifted)
    grad = parts.sum(0).reshape((3,) * n_inner + (cin,) + (3,) * n_outer + (cout,))
    order = tuple(range(n_inner + 1, 4)) + tuple(range(n_inner)) + (n_inner, 4)
    return grad.transpose(order)


@jax.custom_vjp
def conv3d_matmul(x, kernel):
    return _conv_matmul_value(x, kernel)


def _matmul_fwd(x, kernel):
    return _conv_matmul_value(x, kernel), (x, kernel)


def _matmul_bwd(residuals, dy):
    x, kernel = residuals
    dy = dy.astype(x.dtype)
    # input gradient = full convolution = VALID conv of the 2-padded gradient with the flipped, transposed kernel
    flipped = kernel[::-1, ::-1, ::-1].swapaxes(3, 4)
    dy_padded = jnp.pad(dy, ((0, 0), (2, 2), (2, 2), (2, 2), (0, 0)))
    dx = _conv_matmul_value(dy_padded, flipped)
    dk = _kernel_grad(x, dy)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


conv3d_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def conv3d_auto(x, kernel):
    """Per layer, the faster measured form: matmuls on CPU up to 32 channels; XLA's convolution on other
    backends (cuDNN) and for wider layers (48 filters: the wide train step ran 2x faster with "xla" than
    with "matmul" here, 16.6 vs 34.3 s for 2 x 54^3 crops; cause not yet found)."""
    if jax.default_backend() != "cpu" or max(kernel.shape[3:]) > 32:
        return conv3d_xla(x, kernel)
    return conv3d_matmul(x, kernel)


IMPLEMENTATIONS = {"xla": conv3d_xla, "matmul": conv3d_matmul, "auto": conv3d_auto}
DEFAULT_IMPL = "auto"


def best_impl() -> str:
    """The default: "auto" picks per layer and backend."""
    return DEFAULT_IMPL


def conv3d(x, kernel, bias, impl: str = "xla", compute_dtype=jnp.float32):
    """VALID 3x3x3 conv of x (B, D, H, W, Cin) with kernel (3, 3, 3, Cin, Cout); f32 result.

    compute_dtype=bfloat16 rounds inputs and kernel to bf16 and accumulates in f32: fast on CPUs with native
    bf16 matmul (AMX, AVX512-BF16), but slower than f32 on AVX2-only CPUs, which convert in software.
    """
    try:
        fn = IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(f"unknown conv impl {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}") from None
    y = fn(x.astype(compute_dtype), kernel.astype(compute_dtype))
    return y.astype(jnp.float32) + bias.astype(jnp.float32)
