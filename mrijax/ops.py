"""Convolution arithmetic for the CAE: one entry point, several implementations.

`conv3d(x, kernel, bias, impl=...)` computes a VALID 3x3x3 convolution on channels-last input.
- "xla": `lax.conv_general_dilated`, the reference every other form is tested against. Best on GPU (cuDNN).
- "cm": the convolution as matrix products in channel-major layout over the whole (flattened) volume, with a
  hand-written backward (`jax.custom_vjp`). XLA:CPU runs 3D convolutions several times below its matrix product
  speed, and autodiff of the slicing a product formulation needs is slow too, so both directions are spelled as
  products; channel-major, every shifted copy is a long contiguous row copy (see the section below).
- "winograd": "cm" with the W taps of every layer with more than one input and output channel computed by
  Winograd's minimal filtering F(2,3) (Lavin & Gray 2016, "Fast algorithms for convolutional neural networks"):
  2 outputs along W from 4 transformed inputs, so the products do 2/3 of the multiplications (forward pass and
  input gradient; the kernel gradient by F(3,2), its transpose, or by F(3,4) where W splits into 4s).
- "onednn": XLA's convolution where XLA:CPU hands it to oneDNN (jax < 0.7, classic runtime: the default
  install on Linux x86-64) for the forward pass and input gradient, the kernel gradient as "winograd"'s products.
- "auto" (the default): on CPUs "onednn" where XLA compiles convolutions to oneDNN, else "winograd" (the whole
  network channel-major, one transpose in and out); "xla" elsewhere.

`conv3d_upsampled` is the convolution of a 2x nearest-upsampled input in any of these forms, computed on the coarse
grid as a sub-pixel convolution (8 phase kernels of 2x2x2 taps): the CAE's first decoder convolution.

The product splits the 27 taps between its two sides. Taps whose shifted copies are concatenated into the
input channels ("inner" taps) grow the contraction K = taps_in * Cin at the cost of copying the input that many
times; taps produced as extra output channels ("outer" taps, N = taps_out * Cout) are summed with shifted
views afterwards, at the price of a tap-output tensor taps_out times the size of the output. `cm_inner_axes`
picks the split per layer shape. Speeds are in RESULTS.md.
"""
from __future__ import annotations

import functools
import itertools
import os

import jax
import jax.numpy as jnp
from jax import lax

DIMENSION_NUMBERS = ("NDHWC", "DHWIO", "NDHWC")

# jax < 0.7 (jax 0.6.2 is the default install on Linux x86-64): XLA:CPU still has its classic runtime (oneDNN's
# convolutions) and the older compiler, so several forms below and in `mrijax.models` differ by it.
OLD_JAX = tuple(int(p) for p in jax.__version__.split(".")[:2]) < (0, 7)


def conv3d_xla(x, kernel):
    if x.dtype == jnp.bfloat16 and OLD_JAX:
        # jax < 0.7 cannot differentiate a bf16 convolution with an f32 result; products of bf16 values are exact
        # in f32, so converting first computes the same
        x, kernel = x.astype(jnp.float32), kernel.astype(jnp.float32)
    return lax.conv_general_dilated(x, kernel, (1, 1, 1), "VALID", dimension_numbers=DIMENSION_NUMBERS,
                                    preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# Channel-major product formulation ("cm")
#
# Activations are transposed once to (C, B*D*H*W) (`_to_channel_major`). Every voxel of that flat axis is treated
# as an output position, so each tap is a flat offset and each shifted copy ("column" block) is one long
# contiguous slice per channel row (`_tap_rows`); positions whose window leaves the volume are computed and
# cropped (for a 36^3 input about a fifth more products). Every product has the long voxel axis as the minor
# axis of both the columns and the result: (N, K) @ (K, M) for values and input gradients, (K, M) @ (N, M)^T for
# kernel gradients, the orientation XLA:CPU's dot kernels run fastest (the channels-last (M, K) @ (K, N) and
# its transposed-lhs kernel gradient ran several times slower). The price is whole-volume columns (9x the
# input); since each input is materialised once as an integer payload (`_payload`) that traffic is cheap.


def cm_inner_axes(cin: int, cout: int, taps: int = 3) -> int:
    """How many trailing spatial axes (W, then H, then D) put their taps into the contraction; the others' taps
    are extra output rows (see the module docstring). `taps`: kernel taps per axis (3, or 2 for the phase
    kernels of `conv3d_upsampled`)."""
    if taps == 2:  # 8 taps: copy the narrower side, the input (K = 8 Cin) or the tap outputs (N = 8 Cout)
        return 3 if cin <= cout else 0
    if cin == 1:
        return 3  # K = 27: copies of a 1-channel volume are cheap, and no tap outputs to sum
    if cout == 1:
        return 0  # K = Cin, N = 27: no copies at all, 27 one-channel tap outputs summed
    return 2  # K = 9 Cin, N = 3 Cout


def _payload(x):
    """x (C, ..., W) flattened to (C, L) and materialised once as same-width integers (bf16 -> uint16,
    f32 -> uint32), for the tap copies.

    Three XLA:CPU behaviours make this the fast form (profiled in the bf16 train step): (1) a copy fuses its
    producer (BatchNorm, ReLU, the bf16 cast, pads) and recomputes it per tap, and `optimization_barrier` does not
    stop that inside a training step; a product is never fused into its consumers, so the data passes once through
    a product with the identity (exact: one nonzero term, accumulated in f32). (2) A fusion whose result collapses
    the minor axes (5D -> (C, L)) is emitted with per-element index arithmetic, far slower than one that keeps the
    minor axis, so the identity multiplies the W axis of (rows, W) and the product's result is reshaped for free.
    (3) XLA:CPU moves bf16 elementwise through f32 converts, slow inside pad/slice fusions, so
    pads and copies move integers, and the bf16 bits are taken from the f32 product by a shift (exact: the value
    is a bf16 value). A non-finite value turns its whole W row NaN, which the convolution would spread anyway."""
    if x.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"channel-major convolution supports float32 and bfloat16, got {x.dtype}")
    w = x.shape[-1]
    y = lax.dot_general(x.reshape(-1, w), jnp.eye(w, dtype=x.dtype), (((1,), (0,)), ((), ())),
                        preferred_element_type=jnp.float32)
    bits = lax.bitcast_convert_type(y.reshape(x.shape[0], -1), jnp.uint32)
    return (bits >> 16).astype(jnp.uint16) if x.dtype == jnp.bfloat16 else bits


def _values(raw, dtype):
    """The float values of an integer payload (a bitcast)."""
    return lax.bitcast_convert_type(raw, dtype)


def _bits(x):
    """The integer payload of float values (a bitcast): bf16 -> uint16, f32 -> uint32."""
    return lax.bitcast_convert_type(x, {2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])


def _tap_rows(raw, strides, length, reverse=False, taps=3):
    """Shifted copies of the payload raw (C, L): rows (tap, c) = raw[c, o(tap) : o(tap) + length] for every tap
    of the axes with these flat strides, o(tap) = sum t_a * stride_a (t_a = 0 .. taps - 1; the first axis's tap
    outermost; reverse: taps - 1 - t_a). Built one axis at a time from the last: each stage is one stack of
    `taps` shifted long contiguous slices of the previous stage's rows, which XLA:CPU copies faster than 9
    shifted copies written directly into one buffer, though it copies 12 rows per input row, not 9. A batch of
    payloads (N, C, L) gives (N, rows, length)."""
    if not strides:
        return raw[..., :length]
    extra = sum((taps - 1) * s for s in strides)
    for stride in reversed(strides):
        extra -= (taps - 1) * stride
        size = length + extra
        order = range(taps - 1, -1, -1) if reverse else range(taps)
        raw = jnp.stack([lax.slice_in_dim(raw, t * stride, t * stride + size, axis=-1) for t in order],
                        axis=raw.ndim - 2).reshape(*raw.shape[:-2], -1, size)
    return raw


def _to_channel_major(x):
    """(B, D, H, W, C) -> (C, B*D*H*W), materialised by a product with the identity (exact: one nonzero term).

    A plain transpose would be fused by XLA into each of the 9-27 shifted copies that read it, each then
    reading the channels-last input with a 2*C-byte stride (several times slower than copying a channel-major
    array); a product is never fused into its consumers, and at K = C it is cheap. Exact for finite values;
    a non-finite input value turns the whole voxel (all channels) NaN, which the convolution would spread anyway."""
    c = x.shape[-1]
    eye = jnp.eye(c, dtype=x.dtype)
    return lax.dot_general(eye, x.reshape(-1, c), (((1,), (1,)), ((), ())),
                           preferred_element_type=x.dtype)


def _cm_kernel_matrix(kernel, n_inner: int):
    """(k, ..., k, Cin, Cout) -> (taps_out * Cout, taps_in * Cin), rows (outer taps, co), cols (inner taps, ci):
    the last n_inner tap axes are inner."""
    n_taps = kernel.ndim - 2
    n_outer = n_taps - n_inner
    k = kernel.shape[0]
    cin, cout = kernel.shape[-2:]
    order = tuple(range(n_outer)) + (n_taps + 1,) + tuple(range(n_outer, n_taps)) + (n_taps,)
    return kernel.transpose(order).reshape(k ** n_outer * cout, k ** n_inner * cin)


def _cm_plan(grid, cin, cout, taps=3):
    """Flat strides of the inner (contraction) and outer (tap output) axes of a (D, H, W) grid, and the flat
    offsets of the outer taps (outermost axis first, as in `_tap_rows` and `_cm_kernel_matrix`)."""
    n_inner = cm_inner_axes(cin, cout, taps)
    strides = (grid[1] * grid[2], grid[2], 1)
    inner, outer = strides[3 - n_inner:], strides[:3 - n_inner]
    offsets = [sum(t * s for t, s in zip(tap, outer)) for tap in itertools.product(range(taps), repeat=len(outer))]
    return inner, outer, offsets


def _flat_conv(raw, kernel, grid, out_length, winograd=False):
    """out[co, p] = sum over taps t and ci of kernel[t, ci, co] * x[ci, p + offset(t)], p < out_length, f32.

    raw (Cin, L) is the payload (`_payload`) of a flattened (., D, H, W) grid (given by `grid`) in the kernel's
    dtype, L >= out_length + the largest offset. Inner taps are copied into the contraction (`_tap_rows`), outer
    taps are extra output rows summed with shifted contiguous slices: one product
    (taps_out Cout, taps_in Cin) @ (taps_in Cin, length). With `winograd` (where `winograd_applies`), the W taps
    by F(2,3) instead (`_flat_conv_winograd`)."""
    cin, cout = kernel.shape[3:]
    taps = kernel.shape[0]
    if winograd and winograd_applies(cin, cout, grid, out_length, taps):
        return _flat_conv_winograd(raw, kernel, grid, out_length)
    inner, outer, offsets = _cm_plan(grid, cin, cout, taps)
    cols = _values(_tap_rows(raw, inner, out_length + offsets[-1], taps=taps), kernel.dtype)
    return _outer_tap_sum(_product(_cm_kernel_matrix(kernel, len(inner)), cols), cout, offsets, out_length)


def _product(matrix, cols):
    """(N, K) @ (K, M), accumulated and returned in f32."""
    return lax.dot_general(matrix, cols, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _outer_tap_sum(y, cout, offsets, out_length):
    """sum_i y[i Cout:(i + 1) Cout, offset_i : offset_i + out_length]: the outer taps' output rows, shifted."""
    out = None
    for i, o in enumerate(offsets):
        part = y[i * cout:(i + 1) * cout, o:o + out_length]
        out = part if out is None else out + part
    return out


# Winograd F(m,3) (Lavin & Gray 2016): for a 3-tap filter g along an axis, the m outputs y[mj : mj+m] are
# A^T [(G g) * (B^T d)] with d = x[mj : mj+m+2]: m+2 multiplications instead of 3m. Per tile m: (B^T, G, A^T),
# rows of B^T and G and columns of A^T the m+2 components; F(4,3)'s points are 0, 1, -1, 2, -2 and infinity.
WINOGRAD = {
    2: (((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
        ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)),
        ((1, 1, 1, 0), (0, 1, -1, -1))),
    4: (((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0),
         (0, 4, 0, -5, 0, 1)),
        ((1 / 4, 0.0, 0.0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
         (1 / 24, -1 / 12, 1 / 6), (0.0, 0.0, 1.0)),
        ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))),
}


def _combine(coefficients, terms):
    """sum_i coefficients[i] * terms[i], the positive terms first and every +-1 coefficient as an add or a subtract."""
    out = None
    for c, t in sorted(zip(coefficients, terms), key=lambda ct: ct[0] < 0):
        if c == 0:
            continue
        term = t if abs(c) == 1 else abs(c) * t
        if out is None:
            out = -term if c < 0 else term
        else:
            out = out - term if c < 0 else out + term
    return out


def winograd_applies(cin: int, cout: int, grid, out_length: int, taps: int = 3) -> bool:
    """Winograd's F(2,3) along W is for 3-tap kernels; it needs output pairs that never straddle a row (W even, so
    every flat tap offset is a whole number of pairs) and is worth it where the direct form copies its input into
    a 9-tap contraction (Cin > 1 and Cout > 1; see `cm_inner_axes`)."""
    return taps == 3 and cin > 1 and cout > 1 and grid[2] % 2 == 0 and out_length % 2 == 0


def _flat_conv_winograd(raw, kernel, grid, out_length):
    """`_flat_conv` with the W taps by Winograd F(2,3) on the flat axis (exact up to rounding).

    Output pairs (2j, 2j+1) along the flat axis are pairs along W (W even). Each of the 4 components is a
    2-axis (D, H) convolution of the transformed input U_k (Cin, L/2) with the transformed kernel (G g)_k on the
    grid of pairs, done like `_flat_conv` (H taps in the contraction, D taps as output rows): 4 products
    (3 Cout, 3 Cin) @ (3 Cin, L/2), 2/3 of the direct form's multiplications, and 3 copies of the input instead
    of 9. The transforms run in f32; in bf16, U and the kernel are rounded once, as the direct form rounds its
    input."""
    cin, cout = kernel.shape[3:]
    pair_strides = (grid[1] * grid[2] // 2, grid[2] // 2)  # D and H in pairs
    pairs = out_length // 2
    offsets = [t * pair_strides[0] for t in range(3)]
    transformed = _winograd_input_transform(raw, kernel.dtype)
    kernels = jnp.einsum("kw,dhwio->kdhio", jnp.asarray(WINOGRAD[2][1], jnp.float32),
                         kernel.astype(jnp.float32)).astype(kernel.dtype)  # G g, per (D, H) tap
    m = []
    for u, g in zip(transformed, kernels):
        cols = _values(_tap_rows(_bits(u.astype(kernel.dtype)), pair_strides[1:], pairs + offsets[-1]),
                       kernel.dtype)
        m.append(_outer_tap_sum(_product(_cm_kernel_matrix(g, 1), cols), cout, offsets, pairs))
    # A^T: y[2j] = m0 + m1 + m2, y[2j+1] = m1 - m2 - m3, interleaved
    return jnp.stack([_combine(row, m) for row in WINOGRAD[2][2]], axis=-1).reshape(cout, out_length)


def _winograd_input_transform(raw, dtype, tile=2, extend=False):
    """B^T d for every tile j of the flat axis of the payload raw (C, L), d = x[tile j : tile j + tile + 2]: the
    tile + 2 Winograd components, each (C, L // tile - 1), in f32; extend: (C, L // tile), x read as zeros past
    its end."""
    current = _tile_values(raw, dtype, tile, 0, raw.shape[1] // tile)
    ahead = [v[:, 1:] for v in current[:2]]  # the next tile's first two values
    if extend:
        ahead = [jnp.pad(v, ((0, 0), (0, 1))) for v in ahead]
    else:
        current = [v[:, :-1] for v in current]
    return tuple(_combine(row, current + ahead) for row in WINOGRAD[tile][0])


def _tile_values(raw, dtype, tile, start, count):
    """The values of `count` whole tiles of the flat axis of the payload raw (C, L) from flat offset start: `tile`
    arrays (C, count) in f32, the i-th holding each tile's value i. Tiles that start on whole tiles of the payload are
    read in place (a slice starting inside a tile is copied first). A bf16 payload's tiles of 4 are read as u32
    pairs, each half made f32 by a shift or a mask (exact): XLA:CPU materialised them converted to f32 and read them
    with a stride of 4, which made F(3,4)'s bf16 transforms slower than F(3,2)'s; tiles of 2 are fastest read directly
    (RESULTS.md)."""
    c, n = raw.shape
    if start % tile or n % tile:
        raw, start, n = raw[:, start:start + tile * count], 0, tile * count
    if dtype != jnp.bfloat16 or tile != 4:
        x = _values(raw, dtype).astype(jnp.float32).reshape(c, -1, tile)[:, start // tile:start // tile + count]
        return [x[..., i] for i in range(tile)]
    pairs = lax.bitcast_convert_type(raw.reshape(c, n // 2, 2), jnp.uint32).reshape(c, -1, 2)
    pairs = pairs[:, start // tile:start // tile + count]
    values = []
    for p in range(2):  # a pair's first value is its low half (little-endian)
        pair = pairs[..., p]
        values += [_values(pair << 16, jnp.float32), _values(pair & jnp.uint32(0xFFFF0000), jnp.float32)]
    return values


def kernel_grad_tile(grid) -> int:
    """Winograd's tile along W for a kernel gradient (`_winograd_kernel_grad`): F(3,4) where W splits into 4s (3/4
    of F(3,2)'s multiplications and copies), else F(3,2). In bf16 F(4,3)'s transforms, with coefficients up to 8,
    give the kernel gradient about three times F(3,2)'s error. Neither a drift check against f32 training nor the ship
    recipe's held-out SNR (two held-out sources, two or three seeds each) showed an effect (RESULTS.md)."""
    return 4 if grid[2] % 4 == 0 else 2


def kernel_grad_widening(grid, n_inner: int) -> int:
    """Zero columns the "onednn" form appends along W before a kernel gradient, so that F(3,4) applies
    (`kernel_grad_tile`): 2 where W = 2 mod 4 (the 34^3 layer: F(3,4) on a 36-wide grid does 0.79x F(3,2)'s products
    and copies on the 34-wide one), else 0. Only for the Winograd layers (`n_inner` 2, 3x3x3 kernels)."""
    return 2 if n_inner == 2 and grid[2] % 4 == 2 else 0


def _winograd_kernel_grad(raw, dy_raw, grid, kernel_shape, dtype, result_dtype=jnp.float32, tile=None,
                          dy_offset=None):
    """`_cm_kernel_grad` (same arguments; 3x3x3 kernels, W even) with the W taps by Winograd F(3,m), m = tile
    (2, or 4 where W splits into 4s; default `kernel_grad_tile`): (m + 2) / 3m of its multiplications.

    Along W the kernel gradient dk[kw] = sum_q x[q + kw] dy[q] is F(3,m) on the flat axis's tiles of m: for tile j,
    with d = x[mj : mj + m + 2] and e = dy[mj : mj + m], the 3 taps are G^T [(B^T d) * (A e)], F(m,3)'s matrices
    transposed (the transposition principle). Each of the m + 2 components is a product like `_cm_kernel_grad`'s,
    the H taps copied into the contraction (3 Cin rows), the D taps as shifted rows of the output gradient
    (3 Cout): m + 2 products (3 Cin, L/m) @ (L/m, 3 Cout) instead of one (9 Cin, L) @ (L, 3 Cout), as one batched
    product, which a CPU's threads share better than separate products with only 96 x 96 results (RESULTS.md).
    Tiles that straddle a row meet zeros of the placed gradient. The transforms run in f32 and are rounded once.
    dy_offset: as `_cm_kernel_grad`'s; both payloads' tiles are read by `_tile_values`."""
    tile = tile or kernel_grad_tile(grid)
    cin, cout = kernel_shape[3], kernel_shape[4]
    _, h, w = grid
    if w % tile:
        raise ValueError(f"F(3,{tile}) needs W a multiple of {tile}, got the grid {grid}")
    plane = h * w // tile  # tiles per plane
    # Tiles of output-gradient positions to cover: up to the last one whose H taps read the input (q < L - 2W - 2).
    length = -(-(raw.shape[1] - 2 * w - 2) // tile)
    # The placed gradient read from two planes before its corner: two zero planes in front of it for the D taps'
    # shifts (the sample before it, or the zeros placed in front of the first).
    start, count = (_max_offset(grid) if dy_offset is None else dy_offset) - 2 * h * w, length + 2 * plane
    e = _tile_values(dy_raw, dtype, tile, start, count)
    a = tuple(zip(*WINOGRAD[tile][2]))  # A's rows: one per component
    # B^T d and A e, each rounded before the stack (a stack of f32 components would be materialised in f32)
    extend = length + 2 * w // tile > raw.shape[1] // tile - 1  # the H taps read one tile past the last full one
    transformed = jnp.stack([_bits(u.astype(dtype)) for u in _winograd_input_transform(raw, dtype, tile, extend)])
    combined = jnp.stack([_bits(_combine(row, e).astype(dtype)) for row in a])
    cols = _values(_tap_rows(transformed, (w // tile,), length), dtype)  # (m + 2, (kh, ci), length)
    rows = _values(_tap_rows(combined, (plane,), length, reverse=True), dtype)  # (m + 2, (kd, co), length)
    products = lax.dot_general(cols, rows, (((2,), (2,)), ((0,), (0,))), preferred_element_type=result_dtype)
    grad = jnp.einsum("ck,cab->kab", jnp.asarray(WINOGRAD[tile][1], jnp.float32),
                      products.astype(jnp.float32))  # (kw, (kh, ci), (kd, co))
    return grad.reshape(3, 3, cin, 3, cout).transpose(3, 1, 0, 2, 4).astype(dtype)


def _max_offset(grid, taps=3) -> int:
    return (taps - 1) * (grid[1] * grid[2] + grid[2] + 1)


def _cm_forward(xt, kernel, winograd=False):
    """VALID conv, channel-major in and out: xt (Cin, B, D, H, W) -> f32 (Cout, B, D-2, H-2, W-2), and the
    input's payload (kept for the backward pass, so it does not recompute the input's producers).

    Every voxel of the flattened (B, D, H, W) grid is an output position, so a tap is a flat offset: the
    columns are contiguous row slices and the outer-tap sum adds contiguous row slices. Positions whose
    window leaves the volume (or the sample) are computed too and cropped at the end (cheaper than the strided
    copies a VALID-only layout needs)."""
    taps = kernel.shape[0]
    _, b, d, h, w = xt.shape
    out_length = b * d * h * w - _max_offset((d, h, w), taps)
    raw = _payload(xt)
    return _on_output_grid(_flat_conv(raw, kernel, (d, h, w), out_length, winograd), (b, d, h, w), taps), raw


def _on_output_grid(out, batch_shape, taps):
    """The flat result (Cout, n - largest offset) of a product convolution on the flattened grid of a batch of
    shape (B, D, H, W): (Cout, B, D', H', W'), the positions whose window leaves the volume cropped."""
    b, d, h, w = batch_shape
    out = jnp.pad(out, ((0, 0), (0, b * d * h * w - out.shape[1]))).reshape(out.shape[0], b, d, h, w)
    return out[:, :, :d - taps + 1, :h - taps + 1, :w - taps + 1]


def _cm_backward(winograd, residuals, dyt):
    """Both gradients from the output gradient placed on the input grid (zero where there is no output).

    Input gradient: dx[p] = sum_t kernel[t]^T dy[p - offset(t)], the same flat product as the forward with the
    flipped, in/out-swapped kernel on dy shifted right by the largest offset; exact on the flat grid, since every
    p - offset(t) that wraps around a row, plane or sample lands on a zero (no-output) position.
    Kernel gradient: dk[inner tap, outer tap] = sum_q columns(x)[q] * dy[q - outer offset] (`_kernel_grad`)."""
    raw, kernel = residuals
    b = dyt.shape[1]
    taps, cin = kernel.shape[0], kernel.shape[3]
    d, h, w = (s + taps - 1 for s in dyt.shape[2:])
    n = b * d * h * w
    grid = (d, h, w)
    # Padding the 5D array before the identity product is one cheap pass; a flat pad after a 5D one is fused into
    # the copies, where it costs far more per element.
    dy_raw = _payload(_on_input_grid(dyt.astype(kernel.dtype), taps))
    dx = _flat_conv(dy_raw, _transposed_kernel(kernel), grid, n, winograd).astype(kernel.dtype)
    return dx.reshape(cin, b, d, h, w), _kernel_grad(raw, dy_raw, grid, kernel.shape, kernel.dtype, winograd=winograd)


def _on_input_grid(dyt, taps, channels_last=False, corner=None):
    """The channel-major output gradient (Cout, B, D', H', W') placed at corner (taps - 1,) * 3 of each sample's
    input grid, = the flat gradient shifted right by the largest offset (`_max_offset`; every shifted position
    stays inside its sample), plus one zero sample of tail: the input of the dx product and, sliced, of the kernel
    gradient. channels_last: the same for a (B, D', H', W', Cout) gradient. corner: another corner (per axis 0 or
    taps - 1), at flat offset `_corner_offset`."""
    corner = (taps - 1,) * 3 if corner is None else corner
    pads = ((0, 1),) + tuple((c, taps - 1 - c) for c in corner)
    return jnp.pad(dyt, pads + ((0, 0),) if channels_last else ((0, 0),) + pads)


def _corner_offset(grid, corner) -> int:
    """The flat offset of a corner (per axis, voxels in front) of a (D, H, W) grid."""
    return corner[0] * grid[1] * grid[2] + corner[1] * grid[2] + corner[2]


def _at_corner(dy, taps):
    """A channels-last output gradient (B, D', H', W', C) placed at corner 0 of each sample's input grid: its flat
    rows line up with the input's flat positions where the windows start. Written as one 5D pad, which XLA:CPU
    emits fast; placing it at the far corner and slicing the flat rows (as `_on_input_grid` and a slice would) made
    a fusion collapsing the minor axes, several times slower (RESULTS.md)."""
    return jnp.pad(dy, ((0, 0),) + ((0, taps - 1),) * 3 + ((0, 0),))


def _transposed_kernel(kernel):
    """The kernel of the input gradient: flipped along D, H and W, input and output channels swapped."""
    return kernel[::-1, ::-1, ::-1].swapaxes(3, 4)


def _cm_kernel_grad(raw, dy_raw, grid, kernel_shape, dtype, result_dtype=jnp.float32, dy_channels_last=False,
                    dy_offset=None):
    """The kernel gradient from the payloads of the input (Cin, L) and of the output gradient placed on the input
    grid (`_cm_backward`): dk[inner tap, outer tap] = sum_q columns(x)[q] * dy[q - outer offset], one product
    contracting the long axis, its result in `result_dtype` (f32 for YNNPACK; the kernel's dtype lets oneDNN run
    bf16 at full speed, see `conv3d_onednn`). dy_channels_last: for plans without outer taps, dy_raw is (L, Cout)
    with the gradient at corner 0 of each sample's grid instead (`_at_corner`), the product's other side as it is
    (no transpose, no slice), and the input read as zeros past its end. dy_offset: the flat offset of the corner the
    gradient is placed at (default: the far corner, `_max_offset`); at least the largest outer-tap offset."""
    taps, cin, cout = kernel_shape[0], kernel_shape[3], kernel_shape[4]
    n = raw.shape[1]
    inner, outer, offsets = _cm_plan(grid, cin, cout, taps)
    shift = _max_offset(grid, taps) if dy_offset is None else dy_offset
    if dy_channels_last:
        if outer:
            raise ValueError("a channels-last output gradient needs a plan without outer taps")
        cols = _values(_tap_rows(jnp.pad(raw, ((0, 0), (0, shift))), inner, n, taps=taps), dtype)
        shifted, contracted = _values(dy_raw, dtype), 0
    else:
        length = n - (taps - 1) * sum(inner)
        cols = _values(_tap_rows(raw, inner, length, taps=taps), dtype)
        shifted = _values(_tap_rows(dy_raw[:, shift - offsets[-1]:], outer, length, reverse=True, taps=taps), dtype)
        contracted = 1
    grad = lax.dot_general(cols, shifted, (((1,), (contracted,)), ((), ())),
                           preferred_element_type=result_dtype)  # (taps_in Cin, taps_out Cout)
    n_inner, n_outer = len(inner), len(outer)
    grad = grad.reshape((taps,) * n_inner + (cin,) + (taps,) * n_outer + (cout,))
    order = tuple(range(n_inner + 1, 4)) + tuple(range(n_inner)) + (n_inner, 4)
    return grad.transpose(order).astype(dtype)


def _kernel_grad(raw, dy_raw, grid, kernel_shape, dtype, result_dtype=jnp.float32, winograd=True,
                 dy_channels_last=False, dy_offset=None):
    """The kernel gradient by `_winograd_kernel_grad` where Winograd applies to the layer (and `winograd`), else by
    `_cm_kernel_grad` (arguments: theirs)."""
    cin, cout = kernel_shape[3], kernel_shape[4]
    if winograd and winograd_applies(cin, cout, grid, raw.shape[1], kernel_shape[0]):
        return _winograd_kernel_grad(raw, dy_raw, grid, kernel_shape, dtype, result_dtype, dy_offset=dy_offset)
    return _cm_kernel_grad(raw, dy_raw, grid, kernel_shape, dtype, result_dtype, dy_channels_last, dy_offset)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3d_cm_t(xt, kernel, winograd=False):
    """VALID 3x3x3 conv in channel-major layout: (Cin, B, D, H, W) -> f32 (Cout, B, D-2, H-2, W-2); a 2x2x2
    kernel (`conv3d_upsampled`) trims one voxel per axis instead of two.

    xt and kernel share a dtype (float32 or bfloat16); the product accumulates in f32. winograd: the W taps of a
    3x3x3 kernel by F(2,3) where `winograd_applies` (forward and input gradient; the kernel gradient by F(3,2) or
    F(3,4), `kernel_grad_tile`)."""
    return _cm_forward(xt, kernel, winograd)[0]


def _cm_forward_vjp(xt, kernel, winograd):
    out, raw = _cm_forward(xt, kernel, winograd)
    return out, (raw, kernel)


conv3d_cm_t.defvjp(_cm_forward_vjp, _cm_backward)


@jax.custom_vjp
def to_channel_major(x):
    """(B, D, H, W, C) -> (C, B, D, H, W), materialised (see `_to_channel_major`); its gradient likewise."""
    return _to_channel_major(x).reshape((x.shape[-1],) + x.shape[:-1])


@jax.custom_vjp
def from_channel_major(xt):
    """(C, B, D, H, W) -> (B, D, H, W, C); its gradient is materialised channel-major (`to_channel_major`)."""
    return xt.transpose(1, 2, 3, 4, 0)


to_channel_major.defvjp(lambda x: (to_channel_major(x), None), lambda _, g: (from_channel_major(g),))
from_channel_major.defvjp(lambda xt: (from_channel_major(xt), None), lambda _, g: (to_channel_major(g),))


def conv3d_cm(x, kernel, winograd=False):
    """`conv3d_cm_t` on channels-last input and output (one materialised transpose each way)."""
    return from_channel_major(conv3d_cm_t(to_channel_major(x), kernel, winograd))


def conv3d_winograd(x, kernel):
    return conv3d_cm(x, kernel, winograd=True)


# ----------------------------------------------------------------------------------------------------------
# oneDNN's convolution ("onednn")
#
# Up to jax 0.6, XLA:CPU's classic runtime (`--xla_cpu_use_thunk_runtime=false`, set by `use_classic_cpu_runtime`
# before the backend starts) hands a convolution whose operands and result share a dtype to oneDNN's direct
# convolution: on AVX-512 CPUs several times XLA's own convolution and above our products (RESULTS.md). Later
# jax versions dropped that runtime; there this form is still correct, but slow.

CLASSIC_RUNTIME_FLAG = "--xla_cpu_use_thunk_runtime=false"


def use_classic_cpu_runtime(enable: bool = True) -> None:
    """Ask XLA:CPU for its classic runtime (oneDNN convolutions) where this jax still has it (< 0.7), or withdraw
    that request: that runtime cannot run collectives, so several devices or processes need the default one
    (`mrijax.cli.use_cpu_devices`; not requested when XLA_FLAGS or `jax_num_cpu_devices` already asks for
    several host devices). Takes effect only before the first computation, and leaves a setting of the user's own
    in XLA_FLAGS alone; `onednn_convolutions` says which runtime compiled."""
    before = os.environ.get("XLA_FLAGS", "")
    flags = before.split()
    several = (getattr(jax.config, "jax_num_cpu_devices", -1) > 1
               or any(f.startswith("--xla_force_host_platform_device_count=") and f.split("=")[1] != "1" for f in flags))
    if enable and OLD_JAX and not several and not any("xla_cpu_use_thunk_runtime" in f for f in flags):
        flags.append(CLASSIC_RUNTIME_FLAG)
    elif not enable and CLASSIC_RUNTIME_FLAG in flags:
        flags.remove(CLASSIC_RUNTIME_FLAG)
    if flags != before.split():
        os.environ["XLA_FLAGS"] = " ".join(flags)


use_classic_cpu_runtime()  # at import: models and inference import this module before they compute anything


@functools.cache
def onednn_convolutions() -> bool:
    """Whether XLA compiles a 3D convolution on this backend to oneDNN's (read from the compiled program, where a
    classic runtime can exist: a CPU and jax < 0.7)."""
    if jax.default_backend() != "cpu" or not OLD_JAX:
        return False
    x = jax.ShapeDtypeStruct((1, 4, 4, 4, 2), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, 3, 2, 2), jnp.float32)
    return "__onednn$convolution" in jax.jit(_lib_conv).lower(x, k).compile().as_text()


def _lib_conv(x, kernel):
    """lax.conv with its result in the operands' dtype: the form oneDNN takes (an f32 result from bf16 operands
    runs several times slower); oneDNN accumulates in f32 and rounds the result once, as PyTorch's bf16 does."""
    return lax.conv_general_dilated(x, kernel, (1, 1, 1), "VALID", dimension_numbers=DIMENSION_NUMBERS)


@jax.custom_vjp
def conv3d_onednn(x, kernel):
    """VALID conv of channels-last x with a (k, k, k, Cin, Cout) kernel (same dtype), f32 result: the forward and
    the input gradient as convolutions (oneDNN's under the classic runtime), the kernel gradient as products over
    channel-major tap rows (`_kernel_grad`: Winograd's F(3,2) or F(3,4) where it applies), since oneDNN runs
    XLA's kernel-gradient convolution (a window the size of the volume) several times slower. One output channel
    (the CAE's last layer): the value as "cm"'s product too, from the channel-major input the kernel gradient reads
    (computed once), since oneDNN runs that convolution far below its speed (RESULTS.md)."""
    if kernel.shape[-1] != 1:
        return _lib_conv(x, kernel).astype(jnp.float32)
    taps = kernel.shape[0]
    b, d, h, w, _ = x.shape
    raw = _bits(_to_channel_major(x))
    out = _flat_conv(raw, kernel, (d, h, w), raw.shape[1] - _max_offset((d, h, w), taps))
    return _on_output_grid(out, (b, d, h, w), taps).reshape(b, d - taps + 1, h - taps + 1, w - taps + 1, 1)


def _onednn_forward(x, kernel):
    return conv3d_onednn(x, kernel), (x, kernel)


def _onednn_backward(residuals, dy):
    x, kernel = residuals
    taps = kernel.shape[0]
    dy = dy.astype(kernel.dtype)
    full = jnp.pad(dy, ((0, 0),) + ((taps - 1, taps - 1),) * 3 + ((0, 0),))
    dx = _lib_conv(full, _transposed_kernel(kernel))
    cin, cout = kernel.shape[3:]
    n_inner = cm_inner_axes(cin, cout, taps)
    widen = kernel_grad_widening(x.shape[1:4], n_inner)
    if widen:  # zero columns of input and gradient, which meet only each other's zeros in the kernel gradient
        x, dy = (jnp.pad(a, ((0, 0),) * 3 + ((0, widen),) + ((0, 0),)) for a in (x, dy))
    raw = _bits(_to_channel_major(x))
    # Placed while channels last, as integers, then made channel-major by the product: padding the 5D channel-major
    # array instead let XLA fuse the pad and the 5D -> (C, L) collapse into the tap copies (per-element index
    # arithmetic), which made them several times slower (RESULTS.md). Without outer taps (the first layer), the
    # gradient at corner 0 (`_at_corner`), its rows used as they are. With outer taps along D only, at corner
    # (taps - 1, 0, 0): all a D tap's shifts need, and a whole number of Winograd tiles into the payload.
    corner = (taps - 1, 0, 0) if n_inner == 2 else (taps - 1,) * 3
    if n_inner == 3:
        dy_raw = _at_corner(_bits(dy), taps).reshape(-1, cout)
    else:
        dy_raw = _bits(_to_channel_major(_values(_on_input_grid(_bits(dy), taps, True, corner), dy.dtype)))
    dk = _kernel_grad(raw, dy_raw, x.shape[1:4], kernel.shape, kernel.dtype, result_dtype=kernel.dtype,
                      dy_channels_last=n_inner == 3, dy_offset=_corner_offset(x.shape[1:4], corner))
    return dx.astype(x.dtype), dk


conv3d_onednn.defvjp(_onednn_forward, _onednn_backward)


def resolve(impl: str) -> str:
    """The form "auto" stands for on the default backend: on CPUs "onednn" where XLA hands convolutions to oneDNN
    (`onednn_convolutions`), else "winograd", which beats "cm" and XLA's own CPU convolution (RESULTS.md); XLA's
    convolution (cuDNN) elsewhere. Other names stand for themselves."""
    if impl != "auto":
        return impl
    if jax.default_backend() != "cpu":
        return "xla"
    return "onednn" if onednn_convolutions() else "winograd"


def conv3d_auto(x, kernel):
    return IMPLEMENTATIONS[resolve("auto")](x, kernel)


IMPLEMENTATIONS = {"xla": conv3d_xla, "cm": conv3d_cm, "winograd": conv3d_winograd, "onednn": conv3d_onednn,
                   "auto": conv3d_auto}
DEFAULT_IMPL = "auto"


def channel_major(impl: str) -> bool:
    """Whether a whole network with this impl keeps its activations channel-major, (C, B, D, H, W), between
    layers: when every layer is "cm" or "winograd" (or "auto" on a CPU). Then no layer pays the two transposes
    `conv3d_cm` needs on channels-last input, and pooling, BatchNorm and ReLU run on that layout."""
    return resolve(impl) in ("cm", "winograd")


def channel_sums(x, channels_last: bool):
    """f32 per-channel sums of x over every axis but the channel one (the last, else the first).

    As products of rows of ones with x in blocks of the two minor voxel axes (H*W): channels last, a batch of B*D
    products (1, H*W) @ (H*W, C); channels first, one (C*B*D, H*W) @ (H*W,); then a sum over the B*D blocks. The
    products run on the CPU's matrix library, and their sequential accumulation runs over H*W voxels only, not over
    all of them. XLA:CPU's classic runtime (jax 0.6.2, the default on Linux x86-64) reduces over major axes
    several times more slowly, and without LLVM's optimisations (the tests') less exactly (RESULTS.md)."""
    if x.ndim < 4:
        raise ValueError(f"channel_sums takes (B, D, ..., C) or (C, B, D, ...) activations, got shape {x.shape}")
    if channels_last:
        blocks = x.reshape(x.shape[0] * x.shape[1], -1, x.shape[-1])
        ones = jnp.ones(blocks.shape[:2], x.dtype)
        sums = lax.dot_general(ones, blocks, (((1,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
        return jnp.sum(sums, axis=0)
    rows = x.reshape(x.shape[0] * x.shape[1] * x.shape[2], -1)
    sums = lax.dot_general(rows, jnp.ones((rows.shape[1],), x.dtype), (((1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)
    return jnp.sum(sums.reshape(x.shape[0], -1), axis=1)


def computed_once(x, anchor=None):
    """x, written once to a buffer that all its consumers read (the gradient passes through unchanged).

    XLA:CPU fuses a cheap elementwise producer into each of its consumers and computes it again in each: a layer's
    output gradient (the backward of the next BatchNorm, ReLU and pooling, a dozen inputs) was computed three
    times, for the input-gradient convolution, the kernel gradient's operand and the bias gradient. A division is
    one of the operations XLA counts as expensive and does not repeat, so x is divided by ones made at run time
    from `anchor` (finite values broadcastable against x, which the compiler cannot fold away; default: whether
    x's first element is NaN, finite whatever x holds): exact. This holds for jax 0.6.2's XLA (the default install
    on Linux x86-64, where the channels-last "onednn" layers run); later XLAs rewrite the division as a
    multiplication and may compute x in each consumer again (still exact)."""
    return _divided_by_ones(x, jnp.isnan(x.reshape(-1)[:1]).astype(x.dtype) if anchor is None else anchor)


@jax.custom_vjp
def _divided_by_ones(x, anchor):
    return x / (1 + 0 * anchor).astype(x.dtype)


_divided_by_ones.defvjp(lambda x, anchor: (_divided_by_ones(x, anchor), anchor),
                        lambda anchor, g: (g, jnp.zeros_like(anchor)))


@jax.custom_vjp
def add_bias(y, bias):
    """y + bias along y's last (channel) axis. Backward: the output gradient `computed_once` (it feeds the
    convolution's input and kernel gradients too), the bias gradient its `channel_sums`: XLA:CPU fuses the
    producers of a reduction's input (a layer's ReLU, pooling and BatchNorm backward) into it, and its classic
    runtime ran those fused reductions several times more slowly than the product (RESULTS.md). The channel-major
    layers keep a plain add: on jax 0.10.2, where they run, the product was slower there."""
    return y + bias


def _add_bias_backward(bias, g):
    g = computed_once(g, bias)
    return g, channel_sums(g, channels_last=True)


add_bias.defvjp(lambda y, bias: (y + bias, bias), _add_bias_backward)


def conv3d(x, kernel, bias, impl: str = "xla", compute_dtype=jnp.float32, layout: str = "channels_last"):
    """VALID 3x3x3 conv of x (B, D, H, W, Cin) with kernel (3, 3, 3, Cin, Cout); f32 result.

    layout="channel_major": x is (Cin, B, D, H, W) and so is the result (any impl for which `channel_major`
    holds). compute_dtype=bfloat16 rounds inputs and kernel to bf16 and accumulates in f32: fast on CPUs with
    native bf16 matmul (AMX, AVX512-BF16), but slower than f32 on AVX2-only CPUs, which convert in software.
    """
    try:
        fn = IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(f"unknown conv impl {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}") from None
    x, kernel = x.astype(compute_dtype), kernel.astype(compute_dtype)
    if layout == "channel_major":
        if not channel_major(impl):
            raise ValueError(f"impl {impl!r} has no channel-major form on {jax.default_backend()}")
        return conv3d_cm_t(x, kernel, resolve(impl) == "winograd") + bias.astype(jnp.float32)[:, None, None, None, None]
    if layout != "channels_last":
        raise ValueError(f"unknown layout {layout!r}")
    return add_bias(fn(x, kernel).astype(jnp.float32), bias.astype(jnp.float32))


# A 3-tap filter on a 2x nearest-upsampled signal u[i] = x[i // 2] reads only two samples of x per output:
# output 2j + p = (w0 + w1) x[j] + w2 x[j + 1] for p = 0 and w0 x[j] + (w1 + w2) x[j + 1] for p = 1. Rows: phase,
# then the weight of each of the 3 taps in the 2 phase taps.
UPSAMPLE_PHASES = (((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)), ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)))


def upsampled_kernel(kernel):
    """(3, 3, 3, Cin, Cout) -> (2, 2, 2, Cin, 8 Cout): the 8 phase kernels of `conv3d_upsampled`, output channels
    ordered (phase D, phase H, phase W, Cout); summed in f32."""
    s = jnp.asarray(UPSAMPLE_PHASES, jnp.float32)
    cin, cout = kernel.shape[3:]
    phases = jnp.einsum("pat,qbu,rcv,tuvio->abcipqro", s, s, s, kernel.astype(jnp.float32))
    return phases.reshape(2, 2, 2, cin, 8 * cout)


def conv3d_upsampled(x, kernel, bias, impl: str = "xla", compute_dtype=jnp.float32, layout: str = "channels_last"):
    """`conv3d` of x upsampled 2x (nearest) along D, H and W, computed on x's own grid: one 2x2x2 convolution
    with the 8 phase kernels side by side (`upsampled_kernel`), whose outputs are interleaved into the 2x grid
    (sub-pixel convolution). Equal to upsampling and convolving up to rounding, with 8 instead of 27
    multiplications per output and no upsampled copy of the input. Input (n_d, n_h, n_w), output 2 (n - 1)."""
    cout = kernel.shape[4]
    y = conv3d(x, upsampled_kernel(kernel), jnp.tile(bias, 8), impl, compute_dtype, layout)
    if layout == "channel_major":
        _, b, d, h, w = y.shape
        y = y.reshape(2, 2, 2, cout, b, d, h, w).transpose(3, 4, 5, 0, 6, 1, 7, 2)
        return y.reshape(cout, b, 2 * d, 2 * h, 2 * w)
    b, d, h, w, _ = y.shape
    y = y.reshape(b, d, h, w, 2, 2, 2, cout).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return y.reshape(b, 2 * d, 2 * h, 2 * w, cout)
