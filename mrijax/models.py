"""The paper's 3D convolutional autoencoders (CAE) built as Flax linen modules.

Every variant is a `CAEConfig` (`mrijax.architectures`, re-exported here): a list of layer ops ("conv", "pool",
"up") plus width and options. One generic module, `CAE`, runs any config, so a new architecture is a new config,
not new code.

Conventions (Klingelhoefer & Rousseau): VALID 3x3x3 convolutions, ReLU, BatchNorm *before* every
convolution but the first, He-normal init, a final 1-filter convolution with a sigmoid, 2x max-pooling
and 2x nearest upsampling. Arrays are channels-last: (batch, D, H, W, C).

Layer names encode the resolution each convolution runs at (`conv4_dhw` runs on a volume pooled along
D, H and W), so a variables dict alone tells which architecture it belongs to (`recognise_variant`).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mrijax import norm, ops
from mrijax.architectures import (  # noqa: F401  (re-exported: models.margin, models.VARIANTS, ...)
    AXES, VARIANTS, CAEConfig, configure, get_config, input_shape, margin, output_shape, shift_multiple,
)

# ----------------------------------------------------------------------------------------------------------
# Modules


_HE_NORMAL = nn.initializers.he_normal()


def he_normal(key, shape, dtype=jnp.float32):
    """`nn.initializers.he_normal()` (fan-in = all axes but the last), bit for bit, drawn as a 2D (fan-in, Cout)
    array and reshaped: XLA:CPU compiled the random bits of some 5D kernel shapes for seconds each (e.g.
    (3, 3, 3, 16, 16): ~8 s against ~0.4 s drawn 2D), which made the narrow network's init take ~18 s."""
    return _HE_NORMAL(key, (int(np.prod(shape[:-1])), shape[-1]), dtype).reshape(shape)


class Conv3D(nn.Module):
    """VALID 3x3x3 convolution with He-normal kernel; the arithmetic lives in `mrijax.ops` (fast paths).

    The kernel is (3, 3, 3, Cin, Cout) in either layout ("channels_last" or "channel_major" activations)."""

    features: int
    impl: str = "xla"
    compute_dtype: Any = jnp.float32
    layout: str = "channels_last"
    kernel_init: Any = he_normal
    upsampled: bool = False  # convolve x upsampled 2x along D, H and W, on x's grid (`ops.conv3d_upsampled`)

    @nn.compact
    def __call__(self, x):
        """x: activations, or a `norm.Standardized` batch whose BatchNorm the convolution applies."""
        standardized = isinstance(x, norm.Standardized)
        cin = (x.x if standardized else x).shape[0 if self.layout == "channel_major" else -1]
        kernel = self.param("kernel", self.kernel_init, (3, 3, 3, cin, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        conv = functools.partial(ops.conv3d_upsampled if self.upsampled else ops.conv3d, impl=self.impl,
                                 compute_dtype=self.compute_dtype, layout=self.layout)
        return norm.normalized_conv(conv, x, kernel, bias) if standardized else conv(x, kernel, bias)


@jax.custom_vjp
def relu_halves(x):
    """max(x, 0) as |x|/2 + x/2 (equal for every finite x but denormals; compiled, XLA may add before halving, which
    overflows above half the largest float), with max's gradient (zero at 0)."""
    return jnp.abs(x) * 0.5 + x * 0.5


relu_halves.defvjp(lambda x: (relu_halves(x), x), lambda x, g: (jnp.where(x > 0, g, 0),))

# XLA:CPU of jax < 0.7 (jax 0.6.2 is the default install on Linux x86-64) ran a lone f32 maximum over channels-last
# activations several times slower than the 4-op form on an AMD Zen 4; jax 0.10's ran the maximum faster (RESULTS.md).
relu = relu_halves if ops.OLD_JAX else nn.relu


@jax.custom_vjp
def relu_post_op(x):
    """max(x, 0), written once, for the output of a oneDNN convolution ("onednn" form): behind an optimization
    barrier XLA does not fuse the maximum into each of its consumers (BatchNorm's statistics and standardisation,
    the kernel gradient's operand, the backward's mask), so XLA:CPU's oneDNN rewriter folds it into the convolution
    as a ReLU post-op, and every consumer reads the convolution's output. The gradient's mask is taken from that
    output (y > 0 exactly where x > 0), as relu's, zero at 0."""
    return lax.optimization_barrier(jnp.maximum(x, 0))


relu_post_op.defvjp(lambda x: (relu_post_op(x),) * 2, lambda y, g: (jnp.where(y > 0, g, 0),))


def _split_windows(x, axes):
    """View x with every pooled axis split into (size / 2, 2); returns the view and the indices of the 2s."""
    shape, window = [], []
    for i, s in enumerate(x.shape):
        if i in axes:
            shape += [s // 2, 2]
            window.append(len(shape) - 1)
        else:
            shape.append(s)
    return x.reshape(shape), tuple(window)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _pool_even(x, axes):
    """2x max-pooling of the array axes `axes` (even sizes), one axis at a time: each a max of two contiguous
    (or, for the minor axis, stride-2) halves, fused by XLA into one pass, whose result is `computed_once`:
    XLA:CPU otherwise computed the maxima again in each consumer (the next BatchNorm's statistics and
    standardisation, and the backward's mask, each reading the 8x larger input)."""
    for a in axes:
        pairs = x.reshape(x.shape[:a] + (x.shape[a] // 2, 2) + x.shape[a + 1:])
        x = jnp.maximum(lax.index_in_dim(pairs, 0, a + 1, keepdims=False),
                        lax.index_in_dim(pairs, 1, a + 1, keepdims=False))
    return ops.computed_once(x)


def _pool_even_fwd(x, axes):
    y = _pool_even(x, axes)
    return y, (x, y)


def _pool_even_bwd(axes, residuals, dy):
    """The gradient goes to the window's maximum; to every tied maximum (in the CAE pooling follows a ReLU,
    whose tied zeros get no gradient anyway, and ties of positive values have probability zero)."""
    x, y = residuals
    xw, window = _split_windows(x, axes)
    expand = lambda a: lax.expand_dims(a, window)
    return (jnp.where(xw == expand(y), expand(dy), 0).astype(x.dtype).reshape(x.shape),)


_pool_even.defvjp(_pool_even_fwd, _pool_even_bwd)


def max_pool(x, axes: str, spatial=(1, 2, 3)):
    """2x max-pooling along `axes` ("d", "h", "w"; `spatial` = their array axes), VALID: an odd last plane
    is dropped. Written as maxima of halves with a mask backward (`_pool_even`): XLA:CPU's reduce_window
    forward and select-and-scatter backward took ~10% of a train step, a reshape-and-max ~7%, this ~1.5%."""
    pooled = tuple(spatial[AXES.index(a)] for a in axes)
    x = x[tuple(slice(0, s // 2 * 2) if i in pooled else slice(None) for i, s in enumerate(x.shape))]
    return _pool_even(x, pooled)


def upsample(x, axes: str, spatial=(1, 2, 3)):
    for i, a in enumerate(AXES):
        if a in axes:
            x = jnp.repeat(x, 2, axis=spatial[i])
    return x


LUT_BINS = 256  # bins of the look-up table an anchored model carries


def identity_lut(bins: int = LUT_BINS) -> dict:
    """Placeholder table of an anchored model before `set_lut` (maps [0, 2] to itself)."""
    centres = (jnp.arange(bins, dtype=jnp.float32) + 0.5) * (2.0 / bins)
    return {"centres": centres, "values": centres}


def apply_lut(x, centres, values):
    """Linear interpolation in a table of equal-width bins (constant beyond the end bins), zero where x == 0
    (background): the same mapping as `mrijax.baselines.lut.apply_lut`, written as a gather so it stays cheap
    on every voxel of a batch."""
    width = centres[1] - centres[0]
    t = (x - centres[0]) / width
    i0 = jnp.clip(jnp.floor(t), 0, centres.shape[0] - 2)
    frac = jnp.clip(t - i0, 0.0, 1.0)
    i0 = i0.astype(jnp.int32)
    mapped = values[i0] * (1.0 - frac) + values[i0 + 1] * frac
    return jnp.where(x != 0, mapped, 0.0).astype(x.dtype)


def center_crop(x, shape, spatial=(1, 2, 3)):
    index = [slice(None)] * x.ndim
    for axis, target in zip(spatial, shape):
        start = (x.shape[axis] - target) // 2
        index[axis] = slice(start, start + target)
    return x[tuple(index)]


class CAE(nn.Module):
    """Any `CAEConfig`: input (B, D, H, W, in_channels) in normalised units, output (B, D', H', W', 1) in [0, 1].

    An anchored config (`anchor=True`) reads a look-up table from the variable collection "lut" (fitted on
    the training subjects, never trained), feeds [source, LUT(source)] to the network and returns
    LUT(source) + the last convolution's output (no sigmoid; zero-initialised, so training starts from
    the LUT): the network only learns what spatial context adds to an intensity mapping, which is what
    transfers to scanners it never saw. With several source contrasts the table maps the first.

    `impl` picks the convolution arithmetic ("xla": lax.conv reference; see `mrijax.ops` for fast ones);
    `bn_axis_name` synchronises BatchNorm statistics across pmapped devices. `fuse_upsampling`: a D, H and W
    upsampling followed by BatchNorm and a convolution runs as BatchNorm on the coarse grid and the sub-pixel
    convolution `ops.conv3d_upsampled` (8 instead of 27 multiplications per output, no upsampled copy). Equal up
    to rounding: BatchNorm is per channel, and the batch statistics of a nearest-upsampled tensor are those of the
    coarse one. False: the paper's literal upsampling, the reference it is tested against. `fold_batchnorm`: in
    training, each BatchNorm is applied by the convolution after it (`norm.normalized_conv`), whose backward takes
    BatchNorm's per-channel sums from the kernel gradients instead of two passes over the activations; equal up to
    rounding (False: BatchNorm, then the convolution). Not with dropout, which stands between the two. None (the
    default): where it was measured faster, the "onednn" form (jax 0.6.2 on CPUs; with jax 0.10's channel-major
    "winograd" form the bf16 base step ran 2-3% slower with it, RESULTS.md).
    """

    config: CAEConfig
    impl: str = "xla"
    compute_dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    fuse_upsampling: bool = True
    fold_batchnorm: bool | None = None
    # Keras's epsilon, as in the paper's implementation. Momentum 0.9 rather than Keras's 0.99: the running
    # statistics keep momentum**steps of their initial values (0, 1), 40% after 92 steps at 0.99, which
    # made validation in eval mode meaningless for runs of a few hundred steps like ours (measured: val MSE
    # 0.226 vs train 0.065 after one epoch). The paper's thousands of steps per epoch hide this.
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-3

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg = self.config
        if x.shape[-1] != cfg.in_channels:
            raise ValueError(f"the model takes {cfg.in_channels} source contrast(s) as input channels, got "
                             f"{x.shape[-1]}")
        anchor = None
        if cfg.anchor:
            table = {k: self.variable("lut", k, lambda v=v: v).value for k, v in identity_lut().items()}
            anchor = apply_lut(x[..., :1], table["centres"], table["values"])
            x = jnp.concatenate([x, anchor], axis=-1)
        # Channel-major activations (C, B, D, H, W) when every convolution is "cm" or "winograd" (see
        # ops.channel_major): one transpose in, one out, instead of two per layer. Parameters are the same in both
        # layouts.
        layout = "channel_major" if ops.channel_major(self.impl) else "channels_last"
        spatial, channels = ((2, 3, 4), 0) if layout == "channel_major" else ((1, 2, 3), -1)
        if layout == "channel_major":
            x = ops.to_channel_major(x)
        onednn = ops.resolve(self.impl) == "onednn"
        fold_batchnorm = onednn if self.fold_batchnorm is None else self.fold_batchnorm
        activation = relu_post_op if onednn else relu
        pooled = ""  # axes along which the current tensor is at half resolution
        fuse = False  # the next conv convolves x upsampled along D, H and W (see fuse_upsampling)
        skip = None
        conv_index = 0
        last_conv = cfg.n_convs
        for i, op in enumerate(cfg.layers):
            if op[0] == "pool":
                if skip is None:
                    skip = x
                x = max_pool(x, op[1], spatial)
                pooled += op[1]
                continue
            if op[0] == "up":
                pooled = "".join(a for a in pooled if a not in op[1])
                skip_joins = cfg.residual and not pooled
                next_is_conv = i + 1 < len(cfg.layers) and cfg.layers[i + 1][0] == "conv"
                fuse = (self.fuse_upsampling and sorted(op[1]) == sorted(AXES) and next_is_conv and not skip_joins
                        and not (train and cfg.dropout))
                if not fuse:
                    x = upsample(x, op[1], spatial)
                if skip_joins:
                    x = jnp.concatenate([x, center_crop(skip, [x.shape[a] for a in spatial], spatial)],
                                        axis=channels)
                continue
            conv_index += 1
            suffix = "".join(a for a in AXES if a in pooled) or "full"
            if conv_index > 1:
                x = norm.BatchNorm(
                    use_running_average=not train, axis=channels, momentum=self.bn_momentum,
                    epsilon=self.bn_epsilon, axis_name=self.bn_axis_name, name=f"bn{conv_index}_{suffix}",
                )(x, fold=fold_batchnorm and train and not cfg.dropout)
                if cfg.dropout:
                    x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
            last = conv_index == last_conv
            init = nn.initializers.zeros if last and cfg.anchor else he_normal
            x = Conv3D(1 if last else cfg.filters, impl=self.impl, compute_dtype=self.compute_dtype,
                       layout=layout, kernel_init=init, upsampled=fuse, name=f"conv{conv_index}_{suffix}")(x)
            fuse = False
            if not last:
                x = activation(x)
            elif not cfg.anchor:
                x = nn.sigmoid(x)
        if layout == "channel_major":
            x = ops.from_channel_major(x)
        if anchor is not None:
            x = x + center_crop(anchor, x.shape[1:4])
        return x


def build_model(variant: str | CAEConfig = "base", **kwargs) -> CAE:
    """The Flax module of a variant (name or config); kwargs: impl, compute_dtype, bn_axis_name."""
    return CAE(get_config(variant), **kwargs)


COLLECTIONS = ("params", "batch_stats", "lut")  # what a model's variables hold ("lut": anchored models only)


def model_variables(variables) -> dict:
    """The collections of `variables` that define a model (drops e.g. optimizer state or intermediates)."""
    return {k: variables[k] for k in COLLECTIONS if k in variables}


def init_variables(variant: str | CAEConfig = "base", seed: int = 0) -> dict:
    """Fresh {"params", "batch_stats"} (+ "lut" when anchored) for a variant, He-normal kernels, zero biases."""
    variables = _jitted_init(get_config(variant))(jax.random.PRNGKey(seed))
    return model_variables(variables)


def set_lut(variables: dict, centres, values) -> dict:
    """An anchored model's variables with its look-up table replaced (bin centres of equal width, values)."""
    if "lut" not in variables:
        raise ValueError("only an anchored model (anchor=lut) carries a look-up table")
    centres, values = np.asarray(centres, np.float32), np.asarray(values, np.float32)
    if centres.shape != (LUT_BINS,) or values.shape != (LUT_BINS,):
        raise ValueError(f"an anchored model's table has {LUT_BINS} bins, got {centres.shape} and {values.shape}")
    return {**variables, "lut": {"centres": jnp.asarray(centres), "values": jnp.asarray(values)}}


@functools.lru_cache(maxsize=None)
def _jitted_init(config: CAEConfig):
    """One compiled init per architecture (eager init compiles a small program per parameter shape)."""
    shape = input_shape(config)
    return jax.jit(lambda key: build_model(config).init(key, jnp.zeros((1, *shape, config.in_channels), jnp.float32)))


def count_params(params) -> int:
    """Trainable parameters (kernels, biases, BatchNorm scale and bias)."""
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def _signature(variables) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


_SIGNATURES: dict[CAEConfig, dict] = {}


def recognise_config(variables) -> CAEConfig:
    """The registered variant's config a variables dict belongs to, from its layer names and shapes (anchored
    when it carries a "lut" collection; its source contrasts from the first kernel's input channels)."""
    if not isinstance(variables, dict) and not hasattr(variables, "keys") or "params" not in variables:
        raise ValueError("expected a variables dict with 'params' and 'batch_stats' (see mrijax.init_variables)")
    signature, anchor = _signature(variables), "lut" in variables
    first_kernel = signature.get("['conv1_full']['kernel']")
    in_channels = first_kernel[3] - anchor if first_kernel else 1
    for name in VARIANTS:
        config = configure(name, anchor=anchor, in_channels=max(in_channels, 1))
        if config not in _SIGNATURES:
            _SIGNATURES[config] = _signature(jax.eval_shape(lambda c=config: init_variables(c)))
        if _SIGNATURES[config] == signature:
            return config
    raise ValueError("the parameters match none of the registered variants " + ", ".join(VARIANTS))


def recognise_variant(variables) -> str:
    """Which registered variant a variables dict belongs to (its name)."""
    return recognise_config(variables).name
