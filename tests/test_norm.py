"""mrijax's BatchNorm: flax's (two-pass variance) in values, running statistics and gradients, in both layouts,
synchronised across devices, and exact where flax's default one-pass variance cancels; and folded into the
convolution that follows it, the same in values and gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrijax import models, norm

SETTINGS = dict(momentum=0.9, epsilon=1e-3)


def _data(shape, seed=0, offset=5.0, spread=3.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * spread + offset).astype(np.float32), rng.normal(size=shape).astype(np.float32)


def _variables(module, x):
    """Initial variables moved away from (1, 0) so that scale, bias and the running statistics all matter."""
    v = module.init(jax.random.PRNGKey(0), x)
    return jax.tree.map(lambda a: a + 0.1 * jnp.arange(1, a.size + 1, dtype=a.dtype).reshape(a.shape), v)


def _train_mode(module, variables, x, weights):
    """Output, updated batch_stats, and the gradients of sum(sin(y) * weights) w.r.t. params and input."""
    y, updates = module.apply(variables, x, mutable=["batch_stats"])

    def loss(params, x):
        out = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])[0]
        return jnp.sum(jnp.sin(out) * weights)

    grads = jax.grad(loss, argnums=(0, 1))(variables["params"], x)
    return y, updates["batch_stats"], grads


@pytest.mark.parametrize("axis,shape", [(-1, (2, 6, 7, 5, 8)), (0, (8, 2, 6, 7, 5))])
def test_batchnorm_matches_flax_in_both_layouts(axis, shape):
    x, weights = _data(shape)
    ours = norm.BatchNorm(axis=axis, **SETTINGS)
    flax_bn = nn.BatchNorm(use_running_average=False, axis=axis, use_fast_variance=False, **SETTINGS)
    variables = _variables(ours, x)
    assert jax.tree.structure(variables) == jax.tree.structure(flax_bn.init(jax.random.PRNGKey(0), x))
    got, want = _train_mode(ours, variables, x, weights), _train_mode(flax_bn, variables, x, weights)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
    # and against float64 arithmetic: the normalised output and the running statistics
    reduce = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    wide = x.astype(np.float64)
    mean, var = wide.mean(reduce, keepdims=True), wide.var(reduce, keepdims=True)
    per_channel = [1] * len(shape)
    per_channel[axis] = -1
    scale, bias = (np.asarray(variables["params"][k], np.float64).reshape(per_channel) for k in ("scale", "bias"))
    np.testing.assert_allclose(np.asarray(got[0]), (wide - mean) / np.sqrt(var + 1e-3) * scale + bias, atol=1e-5)
    old = variables["batch_stats"]
    np.testing.assert_allclose(np.asarray(got[1]["var"]), 0.9 * np.asarray(old["var"]) + 0.1 * var.ravel(),
                               rtol=1e-6)


@pytest.mark.parametrize("axis,shape", [(-1, (2, 5, 4, 6, 3)), (0, (3, 2, 5, 4, 6))])
def test_gradients_through_the_running_statistics_match_flax(axis, shape):
    """A loss of the updated running mean and variance as well as the output: flax differentiates through both
    (its update has no stop_gradient), and so does this BatchNorm."""
    x, weights = _data(shape, seed=4)
    ours = norm.BatchNorm(axis=axis, **SETTINGS)
    flax_bn = nn.BatchNorm(use_running_average=False, axis=axis, use_fast_variance=False, **SETTINGS)
    variables = _variables(ours, x)
    a, b = np.arange(1.0, 4.0, dtype=np.float32), np.arange(-2.0, 1.0, dtype=np.float32)

    def grads(module):
        def loss(x):
            y, updates = module.apply(variables, x, mutable=["batch_stats"])
            stats = updates["batch_stats"]
            return jnp.sum(y * weights) + 50 * jnp.sum(stats["mean"] * a) + 50 * jnp.sum(stats["var"] * b)
        return jax.grad(loss)(x)

    np.testing.assert_allclose(np.asarray(grads(ours)), np.asarray(grads(flax_bn)), rtol=1e-4, atol=1e-5)


def test_running_average_mode_matches_flax():
    x, _ = _data((2, 5, 6, 7, 4), seed=1)
    ours = norm.BatchNorm(use_running_average=True, **SETTINGS)
    variables = _variables(ours, x)
    want = nn.BatchNorm(use_running_average=True, **SETTINGS).apply(variables, x)
    np.testing.assert_allclose(np.asarray(ours.apply(variables, x)), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_variance_is_exact_where_one_pass_cancels():
    """A large mean and a small spread: E[x^2] - E[x]^2 loses the variance; the two passes keep it."""
    x, _ = _data((4, 6, 6, 6, 3), seed=2, offset=300.0, spread=0.05)
    ours = norm.BatchNorm(**SETTINGS)
    variables = _variables(ours, x)
    stats = ours.apply(variables, x, mutable=["batch_stats"])[1]["batch_stats"]
    var = x.astype(np.float64).reshape(-1, 3).var(0)
    old = np.asarray(variables["batch_stats"]["var"], np.float64)
    np.testing.assert_allclose((np.asarray(stats["var"]) - 0.9 * old) / 0.1, var, rtol=1e-3)


@pytest.mark.parametrize("axis", [-1, 0])
def test_statistics_are_synchronised_across_devices(axis):
    """Two replicas with `axis_name` normalise by the global batch's statistics, and their input gradients (through
    the output and the statistics) are those of the summed loss, as one BatchNorm over the joined batch gives (vmap
    stands for pmap)."""
    x, weights = _data((2, 8, 3, 4, 5, 6) if axis == 0 else (2, 3, 4, 5, 6, 8), seed=3)
    join = (lambda a: np.concatenate(list(a), axis=1)) if axis == 0 else (lambda a: np.concatenate(list(a), axis=0))
    one = norm.BatchNorm(axis=axis, **SETTINGS)
    synced = norm.BatchNorm(axis=axis, axis_name="devices", **SETTINGS)
    variables = _variables(one, join(x))

    def loss(module, x, w, replicas=1):  # each replica's loss holds the (global) statistics once
        y, updates = module.apply(variables, x, mutable=["batch_stats"])
        stats = updates["batch_stats"]
        return jnp.sum(jnp.sin(y) * w) + replicas * jnp.sum(stats["var"] - stats["mean"])

    y = jax.vmap(lambda a: synced.apply(variables, a, mutable=["batch_stats"])[0], axis_name="devices")(x)
    dx = jax.vmap(jax.grad(lambda a, w: loss(synced, a, w)), axis_name="devices")(x, weights)
    want_y = one.apply(variables, join(x), mutable=["batch_stats"])[0]
    want_dx = jax.grad(lambda a: loss(one, a, join(weights), replicas=2))(join(x))
    np.testing.assert_allclose(join(np.asarray(y)), np.asarray(want_y), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(join(np.asarray(dx)), np.asarray(want_dx), rtol=1e-4, atol=1e-5)


def test_a_middle_channel_axis_is_refused():
    with pytest.raises(ValueError, match="channel axis"):
        norm.BatchNorm(axis=2).init(jax.random.PRNGKey(0), jnp.ones((2, 3, 4, 5)))


class _NormConv(nn.Module):
    """BatchNorm, then a convolution (upsampled: of the 2x upsampled batch); fold: the convolution applies the
    BatchNorm (`norm.normalized_conv`)."""
    fold: bool
    axis: int
    impl: str
    upsampled: bool = False
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x):
        y = norm.BatchNorm(axis=self.axis, axis_name=self.axis_name, **SETTINGS)(x, fold=self.fold)
        layout = "channel_major" if self.axis == 0 else "channels_last"
        return models.Conv3D(4, impl=self.impl, layout=layout, upsampled=self.upsampled)(y)


def _assert_folding_changes_nothing(axis, impl, upsampled, x, axis_name=None):
    """BatchNorm then the convolution, unfolded and folded, give the same output, updated statistics and gradients
    (params, input) of a loss of the output and of the running statistics (which flax differentiates through), and
    the same output and statistics when not differentiated, to 1e-4 of each leaf's largest value; mapped over
    replicas with `axis_name`. He-normal kernels; BatchNorm's parameters and statistics moved away from (1, 0)."""
    sample, plain = x[0] if axis_name else x, _NormConv(False, axis, impl, upsampled)
    moved = _variables(plain, sample)
    variables = {"batch_stats": moved["batch_stats"],
                 "params": {**plain.init(jax.random.PRNGKey(0), sample)["params"],
                            "BatchNorm_0": moved["params"]["BatchNorm_0"]}}
    out = plain.apply(variables, sample, mutable=["batch_stats"])[0].shape
    weights = np.random.default_rng(6).normal(size=x.shape[:1] * bool(axis_name) + out).astype(np.float32)
    a, b = np.arange(1.0, 4.0, dtype=np.float32), np.arange(-2.0, 1.0, dtype=np.float32)
    runs = []
    for fold in (False, True):
        module = _NormConv(fold, axis, impl, upsampled, axis_name)

        def loss(params, x, w):
            y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            stats = updates["batch_stats"]["BatchNorm_0"]
            penalty = 5 * jnp.sum(stats["mean"] * a) + 5 * jnp.sum(stats["var"] * b)
            return jnp.sum(jnp.sin(y) * w) + penalty, (y, stats)

        run = jax.grad(loss, argnums=(0, 1), has_aux=True)
        forward = lambda x: module.apply(variables, x, mutable=["batch_stats"])  # not differentiated
        if axis_name:
            run = jax.vmap(run, in_axes=(None, 0, 0), axis_name=axis_name)
            forward = jax.vmap(forward, axis_name=axis_name)
        with jax.default_matmul_precision("highest"):
            runs.append((jax.jit(run)(variables["params"], x, weights), jax.jit(forward)(x)))
    want, got = runs
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree_util.tree_leaves(got)):
        scale = float(np.max(np.abs(w)))
        assert float(np.max(np.abs(np.asarray(g) - np.asarray(w)))) <= 1e-4 * scale, jax.tree_util.keystr(path)


@pytest.mark.parametrize("axis,impl,upsampled", [(-1, "xla", False), (-1, "xla", True), (0, "cm", False),
                                                 (0, "winograd", True)])
def test_batchnorm_folded_into_the_convolution_matches(axis, impl, upsampled):
    """The convolution applying BatchNorm with the folded kernel and bias, whose backward takes BatchNorm's
    per-channel sums from the kernels' gradients, gives what BatchNorm then the convolution gives: output,
    running statistics, and the gradients of every parameter and of the input, through the output and the
    statistics."""
    x, _ = _data((3, 2, 6, 7, 8) if axis == 0 else (2, 6, 7, 8, 3), seed=5)
    _assert_folding_changes_nothing(axis, impl, upsampled, x)


def test_folded_batchnorm_is_synchronised_across_devices():
    """With `axis_name` (vmap standing for pmap), the folded form sums its statistics' gradients over the
    replicas as BatchNorm does: the same input and parameter gradients on every replica."""
    x, _ = _data((2, 2, 6, 7, 8, 3), seed=7)
    _assert_folding_changes_nothing(-1, "xla", False, x, axis_name="devices")
