"""Convolution arithmetic for the CAE: one entry point, several implementations.

`conv3d(x, kernel, bias, impl=...)` computes a VALID 3x3x3 convolution on channels-last input.
- "xla": `lax.conv_general_dilated`, the reference every other form is tested against. Best on GPU (cuDNN).
- "cm": the convolution as matrix products in channel-major layout over the whole (flattened) volume, with a
  hand-written backward (`jax.custom_vjp`). XLA:CPU runs 3D convolutions several times below its matrix product
  speed, and autodiff of the slicing a product formulation needs is slow too, so both directions are spelled as
  products; channel-major, every shifted copy is a long contiguous row copy (see the section below).
- "auto" (the default): "cm" on CPUs (the whole network channel-major, one transpose in and out), "xla"
  elsewhere.

The product splits the 27 taps between its two sides. Taps whose shifted copies are concatenated into the
input channels ("inner" taps) grow the contraction K = taps_in * Cin at the cost of copying the input that many
times; taps produced as extra output channels ("outer" taps, N = taps_out * Cout) are summed with shifted
views afterwards, at the price of a tap-output tensor taps_out times the size of the output. `cm_inner_axes`
picks the split per layer shape. Speeds are in RESULTS.md.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from jax import lax

DIMENSION_NUMBERS = ("NDHWC", "DHWIO", "NDHWC")


def conv3d_xla(x, kernel):
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


def cm_inner_axes(cin: int, cout: int) -> int:
    """How many trailing spatial axes (W, then H, then D) put their taps into the contraction; the others' taps
    are extra output rows (see the module docstring)."""
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


def _tap_rows(raw, strides, length, reverse=False):
    """Shifted copies of the payload raw (C, L): rows (tap, c) = raw[c, o(tap) : o(tap) + length] for every tap
    of the axes with these flat strides, o(tap) = sum t_a * stride_a (t_a = 0, 1, 2; the first axis's tap
    outermost; reverse: 2 - t_a). Built one axis at a time from the last: each stage is one stack of 3 shifted long
    contiguous slices of the previous stage's rows, which XLA:CPU copies faster than 9 shifted copies written
    directly into one buffer, though it copies 12 rows per input row, not 9."""
    if not strides:
        return raw[:, :length]
    extra = sum(2 * s for s in strides)
    for stride in reversed(strides):
        extra -= 2 * stride
        size = length + extra
        taps = (2, 1, 0) if reverse else (0, 1, 2)
        raw = jnp.stack([lax.slice_in_dim(raw, t * stride, t * stride + size, axis=1) for t in taps]
                        ).reshape(-1, size)
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
    """(3, 3, 3, Cin, Cout) -> (taps_out * Cout, taps_in * Cin), rows (outer taps, co), cols (inner taps, ci)."""
    n_outer = 3 - n_inner
    cin, cout = kernel.shape[3:]
    order = tuple(range(n_outer)) + (4,) + tuple(range(n_outer, 3)) + (3,)
    return kernel.transpose(order).reshape(3 ** n_outer * cout, 3 ** n_inner * cin)


def _cm_plan(grid, cin, cout):
    """Flat strides of the inner (contraction) and outer (tap output) axes of a (D, H, W) grid, and the flat
    offsets of the outer taps (outermost axis first, as in `_tap_rows` and `_cm_kernel_matrix`)."""
    n_inner = cm_inner_axes(cin, cout)
    strides = (grid[1] * grid[2], grid[2], 1)
    inner, outer = strides[3 - n_inner:], strides[:3 - n_inner]
    offsets = [sum(t * s for t, s in zip(taps, outer)) for taps in itertools.product(range(3), repeat=len(outer))]
    return inner, outer, offsets


def _flat_conv(raw, kernel, grid, out_length):
    """out[co, p] = sum over taps t and ci of kernel[t, ci, co] * x[ci, p + offset(t)], p < out_length, f32.

    raw (Cin, L) is the payload (`_payload`) of a flattened (., D, H, W) grid (given by `grid`) in the kernel's
    dtype, L >= out_length + the largest offset. Inner taps are copied into the contraction (`_tap_rows`), outer
    taps are extra output rows summed with shifted contiguous slices: one product
    (taps_out Cout, taps_in Cin) @ (taps_in Cin, length)."""
    cin, cout = kernel.shape[3:]
    inner, outer, offsets = _cm_plan(grid, cin, cout)
    cols = _values(_tap_rows(raw, inner, out_length + offsets[-1]), kernel.dtype)
    y = lax.dot_general(_cm_kernel_matrix(kernel, len(inner)), cols, (((1,), (0,)), ((), ())),
                        preferred_element_type=jnp.float32)
    out = None
    for i, o in enumerate(offsets):
        part = y[i * cout:(i + 1) * cout, o:o + out_length]
        out = part if out is None else out + part
    return out


def _max_offset(grid) -> int:
    return 2 * (grid[1] * grid[2] + grid[2] + 1)


def _cm_forward(xt, kernel):
    """VALID conv, channel-major in and out: xt (Cin, B, D, H, W) -> f32 (Cout, B, D-2, H-2, W-2), and the
    input's payload (kept for the backward pass, so it does not recompute the input's producers).

    Every voxel of the flattened (B, D, H, W) grid is an output position, so a tap is a flat offset: the
    columns are contiguous row slices and the outer-tap sum adds contiguous row slices. Positions whose
    window leaves the volume (or the sample) are computed too and cropped at the end (cheaper than the strided
    copies a VALID-only layout needs)."""
    cout = kernel.shape[4]
    c, b, d, h, w = xt.shape
    n = b * d * h * w
    out_length = n - _max_offset((d, h, w))
    raw = _payload(xt)
    out = _flat_conv(raw, kernel, (d, h, w), out_length)
    out = jnp.pad(out, ((0, 0), (0, n - out_length))).reshape(cout, b, d, h, w)
    return out[:, :, :d - 2, :h - 2, :w - 2], raw


def _cm_backward(residuals, dyt):
    """Both gradients from the output gradient placed on the input grid (zero where there is no output).

    Input gradient: dx[p] = sum_t kernel[t]^T dy[p - offset(t)], the same flat product as the forward with the
    flipped, in/out-swapped kernel on dy shifted right by the largest offset; exact on the flat grid, since every
    p - offset(t) that wraps around a row, plane or sample lands on a zero (no-output) position.
    Kernel gradient: dk[inner tap, outer tap] = sum_q columns(x)[q] * dy[q - outer offset]."""
    raw, kernel = residuals
    cout, b = dyt.shape[:2]
    d, h, w = (s + 2 for s in dyt.shape[2:])
    cin = kernel.shape[3]
    n = b * d * h * w
    grid = (d, h, w)
    shift = _max_offset(grid)
    # dy placed at corner (2, 2, 2) of each sample's grid = the flat gradient shifted right by `shift` (every
    # shifted position stays inside its sample), plus one zero sample of tail: the input of the dx product, and,
    # sliced, of the kernel gradient. Padding the 5D array before the identity product is one cheap pass; a flat
    # pad after a 5D one is fused into the copies, where it costs far more per element.
    placed = jnp.pad(dyt.astype(kernel.dtype), ((0, 0), (0, 1), (2, 0), (2, 0), (2, 0)))
    dy_raw = _payload(placed)
    flipped = kernel[::-1, ::-1, ::-1].swapaxes(3, 4)
    dx = _flat_conv(dy_raw, flipped, grid, n).astype(kernel.dtype)

    inner, outer, offsets = _cm_plan(grid, cin, cout)
    length = n - 2 * sum(inner)
    cols = _values(_tap_rows(raw, inner, length), kernel.dtype)
    shifted = _values(_tap_rows(dy_raw[:, shift - offsets[-1]:], outer, length, reverse=True),
                      kernel.dtype)
    grad = lax.dot_general(cols, shifted, (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)  # (taps_in Cin, taps_out Cout)
    n_inner, n_outer = len(inner), len(outer)
    grad = grad.reshape((3,) * n_inner + (cin,) + (3,) * n_outer + (cout,))
    order = tuple(range(n_inner + 1, 4)) + tuple(range(n_inner)) + (n_inner, 4)
    return dx.reshape(cin, b, d, h, w), grad.transpose(order).astype(kernel.dtype)


@jax.custom_vjp
def conv3d_cm_t(xt, kernel):
    """VALID 3x3x3 conv in channel-major layout: (Cin, B, D, H, W) -> f32 (Cout, B, D-2, H-2, W-2).

    xt and kernel share a dtype (float32 or bfloat16); the product accumulates in f32."""
    return _cm_forward(xt, kernel)[0]


def _cm_forward_vjp(xt, kernel):
    out, raw = _cm_forward(xt, kernel)
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


def conv3d_cm(x, kernel):
    """`conv3d_cm_t` on channels-last input and output (one materialised transpose each way)."""
    return from_channel_major(conv3d_cm_t(to_channel_major(x), kernel))


def conv3d_auto(x, kernel):
    """"cm" on CPUs, where it beats XLA's CPU convolution for every layer shape in f32 and bf16 (RESULTS.md);
    XLA's convolution (cuDNN) elsewhere."""
    if jax.default_backend() != "cpu":
        return conv3d_xla(x, kernel)
    return conv3d_cm(x, kernel)


IMPLEMENTATIONS = {"xla": conv3d_xla, "cm": conv3d_cm, "auto": conv3d_auto}
DEFAULT_IMPL = "auto"


def channel_major(impl: str) -> bool:
    """Whether a whole network with this impl keeps its activations channel-major, (C, B, D, H, W), between
    layers: when every layer is "cm" ("cm" itself, or "auto" on a CPU). Then no layer pays the two transposes
    `conv3d_cm` needs on channels-last input, and pooling, BatchNorm and ReLU run on that layout."""
    return impl == "cm" or (impl == "auto" and jax.default_backend() == "cpu")


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
        return conv3d_cm_t(x, kernel) + bias.astype(jnp.float32)[:, None, None, None, None]
    if layout != "channels_last":
        raise ValueError(f"unknown layout {layout!r}")
    return fn(x, kernel).astype(jnp.float32) + bias.astype(jnp.float32)
