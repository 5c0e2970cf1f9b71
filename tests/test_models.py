"""The model zoo: the paper's exact parameter counts and the documented input -> 16^3 geometry."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mrijax
from conftest import expected_auto_form
from mrijax import models, ops

PAPER_PARAMS = {"base": 168_289, "wide": 376_849, "deep": 251_521}
PAPER_INPUT = {"base": 38, "narrow": 38, "wide": 38, "deep": 46, "shallow": 30, "residual": 38,
               "progressive": 40}


@pytest.mark.parametrize("variant,count", sorted(PAPER_PARAMS.items()))
def test_trainable_parameter_counts_match_the_paper(variant, count):
    assert mrijax.count_params(mrijax.init_variables(variant)["params"]) == count


@pytest.mark.parametrize("variant", mrijax.VARIANTS)
def test_documented_input_size_maps_to_a_16_cube(variant):
    size = mrijax.input_size(variant)
    assert size == PAPER_INPUT[variant]
    variables = mrijax.init_variables(variant)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, size, size, size, 1))
    y = jax.jit(mrijax.build_model(variant).apply)(variables, x)
    assert y.shape == (2, 16, 16, 16, 1)
    assert bool(jnp.all((y >= 0) & (y <= 1)))  # sigmoid output
    assert models.output_shape(variant, (size,) * 3) == (16, 16, 16)


def test_structure_follows_the_paper():
    params = mrijax.init_variables("base")["params"]
    convs = sorted(k for k in params if k.startswith("conv"))
    bns = sorted(k for k in params if k.startswith("bn"))
    assert len(convs) == 8 and len(bns) == 7  # BatchNorm before every conv but the first
    assert params["conv8_full"]["kernel"].shape == (3, 3, 3, 32, 1)
    assert params["conv1_full"]["kernel"].shape == (3, 3, 3, 1, 32)
    assert [k for k in convs if k.endswith("dhw")] == ["conv4_dhw", "conv5_dhw", "conv6_dhw"]
    # residual: conv7 sees the upsampled features and the centre-cropped conv3 output
    assert mrijax.init_variables("residual")["params"]["conv7_full"]["kernel"].shape == (3, 3, 3, 64, 32)


def test_he_normal_initialisation():
    kernel = np.asarray(mrijax.init_variables("wide", seed=3)["params"]["conv5_dhw"]["kernel"])
    fan_in = 27 * 48
    assert abs(kernel.std() - np.sqrt(2 / fan_in)) < 0.1 * np.sqrt(2 / fan_in)
    assert abs(kernel.mean()) < 0.01


@pytest.mark.parametrize("shape", [(3, 3, 3, 48, 48), (3, 3, 3, 1, 32), (3, 3, 3, 64, 32)])
def test_he_normal_is_flax_he_normal_bit_for_bit(shape):
    """The kernel initialiser draws 2D for compile time only: the values are flax's He-normal ones."""
    key = jax.random.PRNGKey(7)
    want = jax.jit(lambda k: jax.nn.initializers.he_normal()(k, shape))(key)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda k: models.he_normal(k, shape))(key)), np.asarray(want))


@pytest.mark.parametrize("variant", mrijax.VARIANTS)
def test_variant_is_recognised_from_its_variables(variant):
    assert mrijax.recognise_variant(mrijax.init_variables(variant, seed=1)) == variant


def test_unknown_variant_and_foreign_params_are_rejected():
    with pytest.raises(ValueError, match="unknown variant"):
        mrijax.build_model("huge")
    variables = mrijax.init_variables("base")
    variables = {"params": {**variables["params"], "extra": {"kernel": np.zeros(3)}},
                 "batch_stats": variables["batch_stats"]}
    with pytest.raises(ValueError, match="match none"):
        mrijax.recognise_variant(variables)


def test_network_commutes_with_even_shifts_only():
    """Pooling makes the VALID network equivariant to shifts by 2: the basis of exact tiling."""
    apply, variables = jax.jit(mrijax.build_model("base").apply), mrijax.init_variables("base", seed=2)
    x = jax.random.uniform(jax.random.PRNGKey(0), (1, 44, 40, 40, 1))
    y = apply(variables, x)
    y_shift2 = apply(variables, x[:, 2:])
    y_shift1 = apply(variables, x[:, 1:43])
    np.testing.assert_allclose(y[:, 2:], y_shift2, atol=1e-6)
    assert not np.allclose(y[:, 1:21], y_shift1[:, :20], atol=1e-4)


@pytest.mark.parametrize("axes", ["dhw", "d", "h", "w", "dh"])
def test_max_pool_matches_flax_in_values_and_gradients(axes):
    """The reshape-and-max pooling (with its own backward) equals Flax's reduce_window pooling, odd sizes
    included (the last plane is dropped); ties have probability zero for continuous inputs."""
    import flax.linen as nn
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 7, 6, 9, 3))
    window = tuple(2 if a in axes else 1 for a in models.AXES)
    projection = jax.random.normal(jax.random.PRNGKey(6), nn.max_pool(x, window, strides=window).shape)

    def loss(pool, x):
        return jnp.sum(pool(x) * projection)

    ours = lambda x: models.max_pool(x, axes)
    flax_pool = lambda x: nn.max_pool(x, window, strides=window, padding="VALID")
    np.testing.assert_array_equal(ours(x), flax_pool(x))
    np.testing.assert_array_equal(jax.grad(lambda x: loss(ours, x))(x), jax.grad(lambda x: loss(flax_pool, x))(x))


@pytest.mark.skipif(not ops.OLD_JAX, reason="later XLAs turn computed_once's division into a multiplication")
def test_max_pool_computes_its_maxima_once():
    """Where the pooled batch feeds several consumers (BatchNorm's statistics and standardisation) and the
    backward's mask, the compiled program takes each window's maximum once (3 maxima: one per pooled axis)."""
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 8, 8, 8, 4))
    projection = jax.random.normal(jax.random.PRNGKey(6), (2, 4, 4, 4, 4))

    def loss(x):
        y = models.max_pool(models.relu(x), "dhw")
        mean, var = jnp.mean(y, axis=(0, 1, 2, 3)), jnp.var(y, axis=(0, 1, 2, 3))
        return jnp.sum((y - mean) * jax.lax.rsqrt(var + 1e-3) * projection)

    text = jax.jit(jax.value_and_grad(loss)).lower(x).compile().as_text()
    assert text.count(" maximum(") == 3


@pytest.mark.parametrize("form", ["relu_halves", "relu_post_op"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_relu_forms_are_relu_in_values_and_gradients(form, dtype):
    """The ReLU forms (jax < 0.7's, and the one after oneDNN's convolutions) equal jax.nn.relu, including zeros,
    extremes and the gradient at 0."""
    relu = getattr(models, form)
    x = jnp.concatenate([jax.random.normal(jax.random.PRNGKey(3), (997,)) * 10.0,
                         jnp.array([0.0, -0.0, 1e-30, -1e-30, 3e38, -3e38, 1.0, -1.0])]).astype(dtype)
    np.testing.assert_array_equal(relu(x), jax.nn.relu(x))
    weights = jnp.arange(x.size, dtype=dtype)
    got = jax.grad(lambda v: jnp.sum(relu(v) * weights))(x)
    want = jax.grad(lambda v: jnp.sum(jax.nn.relu(v) * weights))(x)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_relu_after_a_onednn_convolution_is_its_post_op(dtype):
    """Where XLA hands convolutions to oneDNN, `relu_post_op` after a layer (value and gradients compiled together,
    the activation read by several consumers) becomes the convolution's ReLU post-op; the plain forms stay separate
    passes."""
    if not ops.onednn_convolutions():
        pytest.skip(f"XLA does not hand convolutions to oneDNN with jax {jax.__version__} on this backend")
    kx, kk, kp = jax.random.split(jax.random.PRNGKey(4), 3)
    x = jax.random.normal(kx, (2, 8, 8, 8, 8))
    kernel = jax.random.normal(kk, (3, 3, 3, 8, 8)) * 0.1
    projection = jax.random.normal(kp, (2, 6, 6, 6, 8))

    def post_ops(relu):
        def loss(x, kernel):
            y = relu(ops.conv3d(x, kernel, jnp.zeros(8), impl="onednn", compute_dtype=dtype))
            return jnp.sum(y * projection) + jnp.sum(y * y)  # two consumers
        text = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(x, kernel).compile().as_text()
        return text.count('"RELU"')

    assert post_ops(models.relu_post_op) == 1
    assert post_ops(models.relu) == 0


@pytest.mark.parametrize("impl", ["winograd", "onednn"])  # "auto" is one of them on CPUs (tests/test_ops.py)
@pytest.mark.parametrize("dtype,tolerance", [(jnp.bfloat16, 2e-2), (jnp.float32, 1e-5)])
def test_fast_network_matches_the_reference(impl, dtype, tolerance):
    """The CPU forms' whole networks ("winograd" channel-major, "onednn" channels-last) compute what "xla"
    computes."""
    variables = models.init_variables("base", seed=3)
    x = jax.random.uniform(jax.random.PRNGKey(7), (1, 40, 38, 42, 1))
    with jax.default_matmul_precision("highest"):
        want = jax.jit(models.build_model("base", impl="xla", compute_dtype=dtype).apply)(variables, x)
    got = jax.jit(models.build_model("base", impl=impl, compute_dtype=dtype).apply)(variables, x)
    assert got.shape == want.shape == (1, 18, 16, 20, 1)
    assert float(jnp.max(jnp.abs(got - want))) < tolerance


def test_channel_major_network_transposes_once(monkeypatch):
    """The point of the channel-major network: one transpose in for all 8 layers, not one per "cm" layer."""
    calls = []
    transpose = ops.to_channel_major
    monkeypatch.setattr(ops, "to_channel_major", lambda x: calls.append(x.shape) or transpose(x))
    variables = models.init_variables("base", seed=3)
    x = jax.ShapeDtypeStruct((1, 38, 38, 38, 1), jnp.float32)
    auto = 1 if expected_auto_form() in ("cm", "winograd") else 0
    # "cm" and "winograd" are channel-major (one transpose); "xla" and "onednn" stay channels-last (none); "auto"
    # is whichever is fast here (tests/test_ops.py)
    cases = [("cm", jnp.float32, 1), ("winograd", jnp.bfloat16, 1), ("auto", jnp.bfloat16, auto),
             ("auto", jnp.float32, auto), ("xla", jnp.float32, 0), ("onednn", jnp.float32, 0)]
    for impl, dtype, expected in cases:
        calls.clear()
        jax.make_jaxpr(lambda v, a: models.build_model("base", impl=impl, compute_dtype=dtype).apply(v, a))(
            variables, x)
        assert len(calls) == expected, (impl, dtype, calls)


def _train_once(model, variables, x):
    """The training-mode output, the gradients of sum(y^2) and the updated batch statistics, in f32 products."""
    def loss(params):
        y, state = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                               mutable=["batch_stats"])
        return jnp.sum(y * y), (y, state["batch_stats"])

    with jax.default_matmul_precision("highest"):
        (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    return y, grads, stats


def _assert_trains_alike(got, want):
    """`_train_once` results: output to 1e-5, gradients to 1e-4, statistics to 1e-5 of the largest value."""
    relative = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
    assert relative(got[0], want[0]) < 1e-5
    for tree, ref, tolerance in ((got[1], want[1], 1e-4), (got[2], want[2], 1e-5)):
        for (path, b), a in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree_util.tree_leaves(tree)):
            assert relative(a, b) < tolerance, jax.tree_util.keystr(path)


def test_folded_batchnorm_trains_like_batchnorm_then_convolution():
    """The whole CAE with each BatchNorm folded into the next convolution trains as with BatchNorm applied first:
    output, every gradient and the batch statistics, from BatchNorm parameters away from (1, 0). Folding is the
    default for the "onednn" form only, and only in training. (Each form of the pair is checked alone in
    test_norm.)"""
    variables = models.init_variables("base", seed=3)
    moved = lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape)
    variables["params"] = {k: jax.tree.map(moved, v) if k.startswith("bn") else v for k, v in variables["params"].items()}
    x = jax.random.uniform(jax.random.PRNGKey(5), (2, *models.input_shape("base", 4), 1))
    folds = lambda model, train=True: str(jax.make_jaxpr(
        lambda v: model.apply(v, x, train=train, mutable=["batch_stats"]))(variables)).count("name=_normalized_conv")
    unfolded, folded = (models.CAE(models.get_config("base"), impl="xla", fold_batchnorm=f) for f in (False, True))
    assert (folds(unfolded), folds(folded), folds(folded, train=False)) == (0, 7, 0)  # the 7 BatchNorms
    _assert_trains_alike(_train_once(folded, variables, x), _train_once(unfolded, variables, x))
    for impl in ("auto", "winograd", "xla"):
        model = models.CAE(models.get_config("base"), impl=impl)
        assert folds(model) == (7 if ops.resolve(impl) == "onednn" else 0), impl


def test_fused_upsampling_trains_like_the_literal_upsampling():
    """The decoder's upsampling + BatchNorm + convolution, run as BatchNorm on the coarse grid and a sub-pixel
    convolution (the default), gives the literal form's output, gradients and batch statistics in training
    and its output in evaluation, and the fused program convolves 2x2x2 phase kernels instead of the upsampled
    tensor. (Each impl's sub-pixel convolution is checked against the literal one in test_ops.)"""
    variant, impl = "base", "xla"
    variables = models.init_variables(variant, seed=2)
    x = jax.random.uniform(jax.random.PRNGKey(4), (2, *models.input_shape(variant, 4), 1))
    runs, phase_kernels, evaluated = [], [], []
    for fuse in (False, True):
        model = models.CAE(models.get_config(variant), impl=impl, fuse_upsampling=fuse)
        # the first decoder conv as 2x2x2 taps into 8 x 32 phase outputs: only in the fused program
        phase_kernels.append(str(jax.make_jaxpr(model.apply)(variables, x)).count("f32[2,2,2,32,256]"))
        runs.append(_train_once(model, variables, x))
        with jax.default_matmul_precision("highest"):
            evaluated.append(jax.jit(model.apply)(variables, x))
    _assert_trains_alike(runs[1], runs[0])
    assert float(jnp.max(jnp.abs(evaluated[1] - evaluated[0])) / jnp.max(jnp.abs(evaluated[0]))) < 1e-5
    assert phase_kernels[0] == 0 and phase_kernels[1] > 0
