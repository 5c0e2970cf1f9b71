"""Every fast convolution equals the "xla" reference: outputs and gradients, per layer and for whole models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import expected_auto_form
from mrijax import config, models, ops

FAST_IMPLS = [name for name in ops.IMPLEMENTATIONS if name != "xla"]
LAYER_IMPLS = ["cm", "winograd", "onednn"]  # "auto" is one of them (test_auto_picks_...)
F32_RTOL = 1e-5  # relative to the largest magnitude: both sides sum the same products in another order
BF16_RTOL = 2e-2  # bf16 rounding (8 mantissa bits) of products taken in a different order than the reference

# (batch, D, H, W, Cin, Cout): first layer (Cin=1: every tap in the contraction), last layer (Cout=1: every tap
# an output row), widths 16/32/48 (9 taps in, 3 out), odd and unequal sizes (flat offsets that wrap around rows,
# planes and samples), batch 1 and 3, and a larger volume; even W (Winograd's output pairs) and odd W.
SHAPES = [
    (3, 7, 8, 9, 1, 32),
    (1, 12, 9, 8, 16, 1),
    (3, 10, 10, 10, 32, 32),
    (1, 11, 7, 9, 48, 48),
    (1, 40, 24, 20, 32, 32),
]
BF16_SHAPES = [SHAPES[0], SHAPES[1], SHAPES[3], SHAPES[4]]


def relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def assert_matches(y, grads, y_ref, grads_ref, rtol):
    """An f32 output and the (x, kernel, bias) gradients equal the reference's to rtol of its largest value."""
    assert y.dtype == jnp.float32 and y.shape == y_ref.shape
    assert relative_error(y, y_ref) < rtol
    for name, got, want in zip(("x", "kernel", "bias"), grads, grads_ref):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert relative_error(got, want) < rtol, name


def random_layer(shape, seed=0):
    b, d, h, w, cin, cout = shape
    kx, kk, kb, kp = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(kx, (b, d, h, w, cin))
    kernel = jax.random.normal(kk, (3, 3, 3, cin, cout)) / np.sqrt(27 * cin)
    bias = jax.random.normal(kb, (cout,))
    projection = jax.random.normal(kp, (b, d - 2, h - 2, w - 2, cout))
    return x, kernel, bias, projection


def layer_value_and_grads(impl, compute_dtype, x, kernel, bias, projection):
    def scalar(x, kernel, bias):
        y = ops.conv3d(x, kernel, bias, impl=impl, compute_dtype=compute_dtype)
        return jnp.sum(y * projection), y

    (_, y), grads = jax.jit(jax.value_and_grad(scalar, argnums=(0, 1, 2), has_aux=True))(x, kernel, bias)
    return y, grads


@pytest.fixture(autouse=True, scope="module")
def exact_reference():
    """Make the XLA reference compute f32 convolutions at full precision on every backend."""
    with jax.default_matmul_precision("highest"):
        yield


CASES = [(shape, jnp.float32, F32_RTOL) for shape in SHAPES] + [(shape, jnp.bfloat16, BF16_RTOL) for shape in BF16_SHAPES]


@pytest.mark.parametrize("impl", LAYER_IMPLS)
@pytest.mark.parametrize("shape,compute_dtype,rtol", CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else None)
def test_layer_matches_xla(impl, shape, compute_dtype, rtol):
    args = random_layer(shape)
    y_ref, grads_ref = layer_value_and_grads("xla", compute_dtype, *args)
    y, grads = layer_value_and_grads(impl, compute_dtype, *args)
    assert_matches(y, grads, y_ref, grads_ref, rtol)


def test_bias_gradient_is_the_per_channel_sum():
    """add_bias (whose bias gradient is a product with ones, its output gradient `computed_once`) against autodiff
    of a plain broadcast add."""
    ky, kb, kp = jax.random.split(jax.random.PRNGKey(7), 3)
    y = jax.random.normal(ky, (3, 4, 5, 6, 7))
    bias = jax.random.normal(kb, (7,))
    projection = jax.random.normal(kp, y.shape)
    got = jax.value_and_grad(lambda y, b: jnp.sum(ops.add_bias(y, b) * projection), (0, 1))(y, bias)
    want = jax.value_and_grad(lambda y, b: jnp.sum((y + b) * projection), (0, 1))(y, bias)
    np.testing.assert_array_equal(ops.add_bias(y, bias), y + bias)
    np.testing.assert_array_equal(got[1][0], projection)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_computed_once_is_exact_and_computed_once(dtype):
    """computed_once returns x bit for bit and passes the gradient through unchanged; and where a producer has
    three consumers XLA computes it once (one division in the compiled program), which it does not without."""
    kx, kp = jax.random.split(jax.random.PRNGKey(3))
    x = (jax.random.normal(kx, (4, 6, 8, 16)) * 1e3).astype(dtype)
    anchor = jnp.arange(16, dtype=jnp.float32)
    np.testing.assert_array_equal(jax.jit(ops.computed_once)(x, anchor), x)
    projection = jax.random.normal(kp, x.shape).astype(dtype)
    dx, danchor = jax.grad(lambda x, a: jnp.sum(ops.computed_once(x, a) * projection), (0, 1))(x, anchor)
    np.testing.assert_array_equal(dx, projection)
    np.testing.assert_array_equal(danchor, jnp.zeros_like(anchor))
    # the default anchor (from x itself) stays finite: an inf or a NaN first element spoils nothing else
    for first in (jnp.inf, jnp.nan):
        special = x.at[0, 0, 0, 0].set(first)
        np.testing.assert_array_equal(jax.jit(ops.computed_once)(special), special)
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(ops.computed_once(x) * projection))(x), projection)

    def consumers(x, anchor, scale, once):  # once: "no", "anchor" (the given one) or "default" (computed_once's)
        y = jnp.maximum(x * scale, 0) * scale + scale  # a cheap elementwise producer
        if once != "no":
            y = ops.computed_once(y, anchor if once == "anchor" else None)
        return jnp.sum(y, axis=(0, 1)), jnp.pad(y, 1), y @ jnp.ones((16, 3), dtype)

    def multiplies_and_divisions(once):
        hlo = jax.jit(consumers, static_argnums=3).lower(x, anchor, jnp.full((16,), 0.5, dtype), once)
        text = hlo.compile().as_text()
        return text.count(" multiply("), text.count(" divide(")

    if ops.OLD_JAX:  # XLA since jax 0.7 turns the division into a multiplication (computed_once's docstring)
        # without: the producer's two multiplies in several consumers; once: in one, and the anchor's 0 * anchor
        multiplies, divisions = multiplies_and_divisions("no")
        assert multiplies >= 4 and divisions == 0
        assert multiplies_and_divisions("anchor") == (3, 1)
        assert multiplies_and_divisions("default")[1] == 1  # one division too


def test_bf16_is_close_to_f32():
    """The bf16 path really rounds (it is not silently f32) and stays within bf16 accuracy of f32."""
    args = random_layer((1, 10, 10, 10, 32, 32))
    y32, _ = layer_value_and_grads(ops.DEFAULT_IMPL, jnp.float32, *args)
    y16, _ = layer_value_and_grads(ops.DEFAULT_IMPL, jnp.bfloat16, *args)
    assert 0 < relative_error(y16, y32) < BF16_RTOL


def test_unknown_impl_is_refused():
    x, kernel, bias, _ = random_layer((1, 5, 5, 5, 1, 2))
    with pytest.raises(ValueError, match="unknown conv impl"):
        ops.conv3d(x, kernel, bias, impl="nope")


def test_implementations_and_default():
    """The forms there are: the reference, the channel-major products (direct and Winograd), oneDNN's convolution
    and the choice by backend."""
    assert set(ops.IMPLEMENTATIONS) == {"xla", "cm", "winograd", "onednn", "auto"}
    assert config.IMPLS == tuple(ops.IMPLEMENTATIONS)  # the --impl choices, named without importing JAX
    assert FAST_IMPLS == ["cm", "winograd", "onednn", "auto"]
    assert ops.DEFAULT_IMPL == "auto"


def _jaxpr(impl, x, kernel, bias):
    return str(jax.make_jaxpr(jax.grad(lambda a, k: jnp.sum(ops.conv3d(a, k, bias, impl=impl))))(x, kernel))


def test_auto_picks_the_fast_form_of_this_backend():
    """"auto" = on CPU oneDNN's convolution where XLA hands convolutions to it (jax < 0.7, whose classic runtime
    importing mrijax requests), else the channel-major products with Winograd's W taps, "winograd", for every layer
    (never XLA's own convolution); XLA's convolution elsewhere."""
    expected = expected_auto_form()
    assert ops.resolve("auto") == expected
    assert ops.channel_major("auto") == (expected == "winograd")
    for channels in (32, 48):
        x, kernel, bias, _ = random_layer((1, 6, 7, 8, channels, channels))
        assert _jaxpr("auto", x, kernel, bias) == _jaxpr(expected, x, kernel, bias)
        assert ("conv_general_dilated" in _jaxpr("auto", x, kernel, bias)) == (expected in ("xla", "onednn"))
        np.testing.assert_allclose(ops.conv3d(x, kernel, bias, impl="auto"), ops.conv3d(x, kernel, bias, impl="xla"),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cout,library_convolutions", [(16, 2), (1, 1)])
def test_onednn_runs_a_library_convolution_where_available(cout, library_convolutions):
    """Under jax < 0.7 importing mrijax asks XLA:CPU for its classic runtime, which compiles the "onednn" form's
    convolutions (forward and input gradient) to oneDNN calls; its kernel gradient stays one product, and so does
    the value of a layer with one output channel (values: test_layer_matches_xla)."""
    if not ops.onednn_convolutions():
        pytest.skip(f"XLA does not hand convolutions to oneDNN with jax {jax.__version__} on this backend")
    x, kernel, bias, projection = random_layer((1, 8, 9, 10, 16, cout))
    loss = lambda a, k: jnp.sum(ops.conv3d(a, k, bias, impl="onednn") * projection)
    hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, kernel).compile().as_text()
    assert hlo.count('custom_call_target="__onednn$convolution"') == library_convolutions
    assert " convolution(" not in hlo


@pytest.mark.parametrize("shape,applies", [
    ((2, 6, 7, 8, 32, 32), True),   # W even: output pairs along W
    ((1, 6, 8, 9, 32, 32), False),  # W odd: pairs would straddle rows
    ((2, 6, 7, 8, 1, 32), False),   # Cin = 1: every tap in the contraction already
    ((2, 6, 7, 8, 32, 1), False),   # Cout = 1: no copies to save
])
def test_winograd_only_where_it_applies(shape, applies):
    """"winograd" computes a different program from "cm" exactly where F(2,3) applies and falls back to "cm"
    elsewhere (its values are checked against the reference in test_layer_matches_xla)."""
    b, d, h, w, cin, cout = shape
    out_length = b * d * h * w - 2 * (h * w + w + 1)
    assert ops.winograd_applies(cin, cout, (d, h, w), out_length) == applies
    assert not ops.winograd_applies(cin, cout, (d, h, w), out_length, taps=2)  # F(2,3) is for 3-tap kernels
    x, kernel, bias, _ = random_layer(shape)
    assert (_jaxpr("winograd", x, kernel, bias) != _jaxpr("cm", x, kernel, bias)) == applies
    np.testing.assert_allclose(ops.conv3d(x, kernel, bias, impl="winograd"), ops.conv3d(x, kernel, bias, impl="cm"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_channel_major_transpose_is_exact(dtype):
    """The identity product that stands in for a transpose ("cm") returns every value bit for bit."""
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 3, 4, 5, 48)) * jnp.logspace(-30, 30, 48)
    x = x.astype(dtype)
    got = jax.jit(ops._to_channel_major)(x)
    want = x.reshape(-1, 48).T
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cm_payload_is_exact(dtype):
    """The identity product that materialises a "cm" input (and the bf16 bits taken from its f32 result) gives
    back every value bit for bit, over 60 decades, in (C, L) order."""
    x = jax.random.normal(jax.random.PRNGKey(5), (6, 2, 3, 4, 48)) * jnp.logspace(-30, 30, 48)
    x = x.astype(dtype)
    raw = jax.jit(ops._payload)(x)
    assert raw.dtype == {jnp.float32: jnp.uint32, jnp.bfloat16: jnp.uint16}[dtype] and raw.shape == (6, 2 * 3 * 4 * 48)
    got = ops._values(raw, dtype)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(x.reshape(6, -1), np.float32))


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, F32_RTOL), (jnp.bfloat16, BF16_RTOL)])
@pytest.mark.parametrize("shape", [(2, 6, 7, 8), (1, 5, 6, 12), (3, 7, 5, 4)], ids=lambda v: "x".join(map(str, v)))
def test_winograd_kernel_gradient_tiles_equal_the_reference(shape, dtype, rtol):
    """The kernel gradient by F(3,2) and by F(3,4) (tiles of 2 and 4 along W, which splits into 4s here) equals
    XLA's; the whole-layer tests reach F(3,4) only where `kernel_grad_tile` picks it (W a multiple of 4)."""
    b, d, h, w = shape
    x, _, _, projection = random_layer((b, d, h, w, 8, 16), seed=6)
    x, dy = x.astype(dtype), projection.astype(dtype)
    conv = lambda k: jax.lax.conv_general_dilated(x.astype(jnp.float32), k, (1, 1, 1), "VALID",
                                                  dimension_numbers=ops.DIMENSION_NUMBERS)
    want = jax.vjp(conv, jnp.zeros((3, 3, 3, 8, 16)))[1](dy.astype(jnp.float32))[0]
    raw = ops._payload(ops.to_channel_major(x))
    dy_raw = ops._payload(ops._on_input_grid(ops.to_channel_major(dy), 3))
    assert ops.kernel_grad_tile((d, h, w)) == 4 and ops.kernel_grad_tile((d, h, w + 2)) == 2
    for tile in (2, 4):
        got = jax.jit(ops._winograd_kernel_grad, static_argnums=(2, 3, 4, 5, 6))(
            raw, dy_raw, (d, h, w), (3, 3, 3, 8, 16), dtype, jnp.float32, tile)
        assert got.dtype == dtype
        assert relative_error(got.astype(jnp.float32), want) < rtol, tile
    with pytest.raises(ValueError, match="multiple of 4"):
        ops._winograd_kernel_grad(raw, dy_raw, (d, h, w + 2), (3, 3, 3, 8, 16), dtype, jnp.float32, 4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tile,start,width", [(4, 0, 64), (4, 8, 64), (4, 6, 64), (4, 0, 62), (2, 0, 64), (2, 3, 64)])
def test_tile_values_are_the_payloads_values(dtype, tile, start, width):
    """`_tile_values` (bf16 tiles of 4 read as u32 pairs) gives each tile's values exactly: from a whole tile of the
    payload, from inside one, and from a payload whose width is not a whole number of tiles."""
    x = jax.random.normal(jax.random.PRNGKey(9), (3, width)).astype(dtype)
    count = 10
    got = jax.jit(ops._tile_values, static_argnums=(1, 2, 3, 4))(ops._bits(x), dtype, tile, start, count)
    want = np.asarray(x, np.float32)[:, start:start + tile * count].reshape(3, count, tile)
    assert len(got) == tile
    for i, values in enumerate(got):
        assert values.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(values), want[..., i])


@pytest.mark.parametrize("dtype,w,widening,product", [(jnp.float32, 10, 2, "f32[6,96,96]"),
                                                      (jnp.float32, 8, 0, "f32[6,96,96]"),
                                                      (jnp.bfloat16, 10, 2, "bf16[6,96,96]")])
def test_onednn_kernel_gradient_widens_w_to_tiles_of_4(dtype, w, widening, product):
    """The "onednn" form's kernel gradient takes F(3,4) (6 Winograd components, one batched product) on a grid with
    W = 2 mod 4 too, two zero columns appended (W a multiple of 4 needs none). The widened gradient equals XLA's."""
    assert ops.kernel_grad_widening((6, 7, w), 2) == widening
    assert ops.kernel_grad_widening((6, 7, w), 3) == 0  # the first layer's plan has no Winograd
    x, kernel, bias, projection = random_layer((1, 6, 7, w, 32, 32))
    loss = lambda k: jnp.sum(ops.conv3d(x, k, bias, impl="onednn", compute_dtype=dtype) * projection)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(kernel))
    assert product in jaxpr
    got = jax.jit(jax.grad(loss))(kernel)
    want = jax.grad(lambda k: jnp.sum(ops.conv3d(x, k, bias, impl="xla", compute_dtype=dtype) * projection))(kernel)
    assert relative_error(got, want) < (F32_RTOL if dtype == jnp.float32 else BF16_RTOL)


def model_value_and_grads(variant, impl, variables, x, projection):
    model = models.build_model(variant, impl=impl)

    def scalar(params):
        y, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                           mutable=["batch_stats"])
        return jnp.sum(y * projection), y

    (_, y), grads = jax.jit(jax.value_and_grad(scalar, has_aux=True))(variables["params"])
    return y, grads


@pytest.mark.parametrize("impl", LAYER_IMPLS)
@pytest.mark.parametrize("variant", ["residual", "progressive"])
def test_model_matches_xla(impl, variant):
    """Whole networks (skip concatenation, single-axis pooling) train identically with every impl."""
    variables = models.init_variables(variant, seed=1)
    shape = models.input_shape(variant, 4)
    x = jax.random.uniform(jax.random.PRNGKey(2), (2, *shape, 1))
    projection = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 4, 1))
    y_ref, grads_ref = model_value_and_grads(variant, "xla", variables, x, projection)
    y, grads = model_value_and_grads(variant, impl, variables, x, projection)
    assert relative_error(y, y_ref) < F32_RTOL
    flat_ref = jax.tree_util.tree_leaves_with_path(grads_ref)
    flat = jax.tree_util.tree_leaves(grads)
    for (path, want), got in zip(flat_ref, flat):
        assert relative_error(got, want) < 1e-4, jax.tree_util.keystr(path)


# (batch, D, H, W, Cin, Cout) of the coarse input: the decoder's shape (Cin = Cout: the 8 phase kernels as one
# contraction of 8 Cin), more input than phase outputs (Cin > 8 Cout: the phases as output rows), odd sizes.
UPSAMPLED_SHAPES = [(2, 5, 6, 7, 32, 32), (1, 4, 5, 3, 48, 4)]


def upsampled_value_and_grads(impl, layout, compute_dtype, x, kernel, bias, projection, fused):
    def scalar(x, kernel, bias):
        if not fused:  # the literal form: upsample, then convolve with the reference
            y = ops.conv3d(models.upsample(x, "dhw"), kernel, bias, impl="xla", compute_dtype=compute_dtype)
        elif layout == "channel_major":
            y = ops.from_channel_major(ops.conv3d_upsampled(ops.to_channel_major(x), kernel, bias, impl=impl,
                                                            compute_dtype=compute_dtype, layout=layout))
        else:
            y = ops.conv3d_upsampled(x, kernel, bias, impl=impl, compute_dtype=compute_dtype)
        return jnp.sum(y * projection), y

    (_, y), grads = jax.jit(jax.value_and_grad(scalar, argnums=(0, 1, 2), has_aux=True))(x, kernel, bias)
    return y, grads


UPSAMPLED_FAST = [("winograd", "channel_major"), ("onednn", "channels_last")]
UPSAMPLED_CASES = ([(impl, layout, jnp.float32, F32_RTOL) for impl, layout in
                    [("xla", "channels_last"), ("cm", "channels_last"), ("cm", "channel_major")] + UPSAMPLED_FAST]
                   + [(impl, layout, jnp.bfloat16, BF16_RTOL) for impl, layout in UPSAMPLED_FAST])


@pytest.mark.parametrize("impl,layout,compute_dtype,rtol", UPSAMPLED_CASES)
@pytest.mark.parametrize("shape", UPSAMPLED_SHAPES, ids=lambda v: "x".join(map(str, v)))
def test_upsampled_conv_equals_upsampling_then_convolving(impl, layout, shape, compute_dtype, rtol):
    """The sub-pixel convolution (8 phase kernels of 2x2x2 taps on the coarse grid) computes the convolution of
    the 2x nearest-upsampled input, values and all three gradients, in every form."""
    b, d, h, w, cin, cout = shape
    x, kernel, bias, _ = random_layer((b, d, h, w, cin, cout), seed=6)
    projection = jax.random.normal(jax.random.PRNGKey(8), (b, 2 * d - 2, 2 * h - 2, 2 * w - 2, cout))
    y_ref, grads_ref = upsampled_value_and_grads(impl, layout, compute_dtype, x, kernel, bias, projection, False)
    y, grads = upsampled_value_and_grads(impl, layout, compute_dtype, x, kernel, bias, projection, True)
    assert_matches(y, grads, y_ref, grads_ref, rtol)


def test_upsampled_kernel_phases_sum_the_taps_that_read_one_coarse_sample():
    """Each phase kernel holds, per coarse tap, the sum of the 3x3x3 weights that read that coarse sample; over
    all 8 phases every weight is used 8 times (once per phase), so the phase kernels sum to 8x the kernel's sum."""
    kernel = jax.random.normal(jax.random.PRNGKey(9), (3, 3, 3, 2, 3))
    phases = np.asarray(ops.upsampled_kernel(kernel)).reshape(2, 2, 2, 2, 2, 2, 2, 3)  # a b c ci pd ph pw co
    k = np.asarray(kernel, np.float64)
    # phase (0, 1, 1), coarse tap (0, 1, 0): D taps {0, 1}, H taps {1, 2}, W tap {0}
    np.testing.assert_allclose(phases[0, 1, 0, :, 0, 1, 1], k[0:2, 1:3, 0].sum(axis=(0, 1)), rtol=1e-6)
    np.testing.assert_allclose(phases.sum(axis=(0, 1, 2, 4, 5, 6)), 8 * k.sum(axis=(0, 1, 2)), rtol=1e-5)
