"""BatchNorm with flax's variables and semantics, its per-channel sums written as matrix products.

Batch statistics and their gradients are sums over every axis but the channel one. XLA:CPU's classic runtime
(jax 0.6.2, the default install on Linux x86-64) runs such reductions several times more slowly than products of
rows of ones with the activations, and less exactly when compiled without LLVM's optimisations (RESULTS.md); the
products cost about the same as the reductions on jax 0.10. The variance is two-pass, E[(x - mean)^2], more exact
than flax's default E[x^2] - E[x]^2, which cancels digits. In training, the convolution after a BatchNorm can apply
it (`normalized_conv`), whose backward then needs no sums over the activations.
"""
import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mrijax.ops import channel_sums


def _per_channel(v, x, channels_last):
    """v (C,) shaped to broadcast against x along its channel axis."""
    return v if channels_last else v.reshape((-1,) + (1,) * (x.ndim - 1))


def _scale_shift(centred, k, bias, channels_last):
    """centred * k + bias, k and bias per channel: the normalisation once the statistics are known."""
    return centred * _per_channel(k, centred, channels_last) + _per_channel(bias, centred, channels_last)


def _mean(x, channels_last, axis_name):
    m = channel_sums(x, channels_last) * (x.shape[-1 if channels_last else 0] / x.size)
    return m if axis_name is None else lax.pmean(m, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_normalize(x, scale, bias, channels_last, epsilon, axis_name):
    """Training-mode BatchNorm: (y, batch mean, batch variance), the statistics over the whole batch, across
    devices with `axis_name` (pmap)."""
    return _normalize(x, scale, bias, channels_last, epsilon, axis_name)[0]


def _normalize(x, scale, bias, channels_last, epsilon, axis_name):
    mean, var, centred = _statistics(x, channels_last, axis_name)
    inv = lax.rsqrt(var + epsilon)
    return (_scale_shift(centred, inv * scale, bias, channels_last), mean, var), (centred, inv, scale)


def _statistics(x, channels_last, axis_name):
    """The batch mean and (two-pass) variance per channel, and x - mean."""
    mean = _mean(x, channels_last, axis_name)
    centred = x - _per_channel(mean, x, channels_last)
    return mean, _mean(centred * centred, channels_last, axis_name), centred


def _normalize_backward(channels_last, epsilon, axis_name, residuals, cotangents):
    """dx = scale * inv * (g - mean(g) - xhat * mean(g * xhat)), xhat = (x - mean) * inv, the means over the
    global batch; plus the paths through the returned statistics (the running averages)."""
    centred, inv, scale = residuals
    g, g_mean, g_var = cotangents
    sum_g, sum_gc = channel_sums(g, channels_last), channel_sums(g * centred, channels_last)
    dscale, dbias = sum_gc * inv, sum_g
    # through xhat: d mean = -inv sum(g scale), d var = -inv^3 / 2 sum(g scale centred)
    g_mean = g_mean - scale * inv * sum_g
    g_var = g_var - 0.5 * scale * inv ** 3 * sum_gc
    dx = _statistics_backward(centred, g_mean, g_var, channels_last, axis_name, g * _per_channel(scale * inv, g,
                                                                                                   channels_last))
    return dx.astype(g.dtype), dscale, dbias


def _statistics_backward(centred, g_mean, g_var, channels_last, axis_name, direct):
    """direct + the gradient through the batch statistics: d mean / dx = 1 / n and d var / dx = 2 (x - mean) / n
    (the sum of x - mean is zero), with g_mean and g_var summed over the devices' batches."""
    count = centred.size // centred.shape[-1 if channels_last else 0]
    if axis_name is not None:
        (g_mean, g_var), count = lax.psum((g_mean, g_var), axis_name), count * lax.psum(1, axis_name)
    return (direct + _per_channel(g_mean / count, centred, channels_last)
            + centred * _per_channel(2 * g_var / count, centred, channels_last))


batch_normalize.defvjp(_normalize, _normalize_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def batch_statistics(x, channels_last, axis_name):
    """The batch mean and variance per channel (over the devices' batches with `axis_name`)."""
    return _statistics(x, channels_last, axis_name)[:2]


def _statistics_forward(x, channels_last, axis_name):
    mean, var, centred = _statistics(x, channels_last, axis_name)
    return (mean, var), centred


batch_statistics.defvjp(_statistics_forward, lambda channels_last, axis_name, centred, g: (
    _statistics_backward(centred, *g, channels_last, axis_name, 0).astype(centred.dtype),))


class Standardized(NamedTuple):
    """A batch and its BatchNorm, to be applied by the convolution that reads it (`normalized_conv`)."""
    x: Any
    mean: Any
    var: Any
    scale: Any
    bias: Any
    epsilon: float
    channels_last: bool


def _fold(kernel, conv_bias, scale, bias):
    """The kernel and bias that convolve the standardised batch xhat as the original ones convolve
    xhat * scale + bias: the kernel's input channels scaled, the shift's constant response added to the bias."""
    return kernel * scale[:, None], conv_bias + jnp.einsum("...io,i->o", kernel, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _normalized_conv(conv, epsilon, channels_last, x, mean, var, scale, bias, kernel, conv_bias):
    return conv(_standardized(x, mean, var, epsilon, channels_last)[0], *_fold(kernel, conv_bias, scale, bias))


def _standardized(x, mean, var, epsilon, channels_last):
    """xhat = (x - mean) / sqrt(var + epsilon), and 1 / sqrt(var + epsilon)."""
    inv = lax.rsqrt(var + epsilon)
    return (x - _per_channel(mean, x, channels_last)) * _per_channel(inv, x, channels_last), inv


def _normalized_conv_forward(conv, epsilon, channels_last, x, mean, var, scale, bias, kernel, conv_bias):
    """The value, and as residuals the convolution's and the fold's VJPs (so the backward computes no forward)."""
    xhat, inv = _standardized(x, mean, var, epsilon, channels_last)
    (folded_kernel, folded_bias), fold_vjp = jax.vjp(_fold, kernel, conv_bias, scale, bias)
    y, conv_vjp = jax.vjp(conv, xhat, folded_kernel, folded_bias)
    return y, (conv_vjp, fold_vjp, inv, folded_kernel)


def _normalized_conv_backward(conv, epsilon, channels_last, residuals, dy):
    conv_vjp, fold_vjp, inv, folded_kernel = residuals
    dxhat, dkernel, dbias = conv_vjp(dy)
    sum_dxhat = jnp.einsum("...io,o->i", folded_kernel, dbias)
    sum_dxhat_xhat = jnp.einsum("...io,...io->i", folded_kernel, dkernel)
    # xhat = (x - mean) * inv: d mean = -inv sum(dxhat), d var = -inv^2 / 2 sum(dxhat * xhat)
    dmean, dvar = -inv * sum_dxhat, -0.5 * inv * inv * sum_dxhat_xhat
    dx = dxhat * _per_channel(inv, dxhat, channels_last)
    dkernel, dconv_bias, dscale, dbias = fold_vjp((dkernel, dbias))
    return dx, dmean, dvar, dscale, dbias, dkernel, dconv_bias


_normalized_conv.defvjp(_normalized_conv_forward, _normalized_conv_backward)


def normalized_conv(conv: Callable, s: Standardized, kernel, conv_bias):
    """conv(BatchNorm(x), kernel, conv_bias) for a convolution `conv(x, kernel, bias)` linear in x and in kernel
    (VALID, any form, upsampled too), computed as conv(xhat, folded kernel, folded bias) (`_fold`), xhat the
    standardised batch.

    Why: BatchNorm's backward needs, per channel, the sums over the batch of the gradient at xhat (dxhat) and of
    dxhat * xhat: two passes over an activation-sized tensor. Both follow from the convolution's own gradients:
    sum dxhat = sum over taps and outputs of kernel * (the output gradient's sum, the bias gradient), and, as the
    convolution is linear in each input channel's data and in that channel's kernel entries,
    sum dxhat * xhat = the sum of kernel * kernel gradient over that channel's entries. So the backward reads only
    the kernels (exact in exact arithmetic; rounding differs from the direct sums only at the level of the
    convolution's own rounding)."""
    return _normalized_conv(conv, s.epsilon, s.channels_last, s.x, s.mean, s.var, s.scale, s.bias, kernel,
                            conv_bias)


class BatchNorm(nn.Module):
    """`flax.linen.BatchNorm`'s variables (params scale, bias; batch_stats mean, var) and running-average update,
    with `batch_normalize`'s statistics; `axis` is the channel axis, the first or the last."""

    use_running_average: bool = False
    axis: int = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, fold: bool = False):
        """The normalised batch; in training with `fold`, a `Standardized` batch for the next convolution to
        normalise (`normalized_conv`), the running statistics updated here."""
        if self.axis % x.ndim not in (0, x.ndim - 1):
            raise ValueError(f"BatchNorm's channel axis must be the first or the last, got {self.axis}")
        channels_last = self.axis % x.ndim != 0
        c = x.shape[self.axis]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        if self.use_running_average:
            centred = x - _per_channel(ra_mean.value, x, channels_last)
            return _scale_shift(centred, lax.rsqrt(ra_var.value + self.epsilon) * scale, bias, channels_last)
        if fold:
            mean, var = batch_statistics(x, channels_last, self.axis_name)
            y = Standardized(x, mean, var, scale, bias, self.epsilon, channels_last)
        else:
            y, mean, var = batch_normalize(x, scale, bias, channels_last, self.epsilon, self.axis_name)
        if not self.is_initializing():
            keep = self.momentum
            ra_mean.value = keep * ra_mean.value + (1 - keep) * mean
            ra_var.value = keep * ra_var.value + (1 - keep) * var
        return y
