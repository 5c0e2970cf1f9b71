"""BatchNorm with flax's variables and semantics, its per-channel sums written as matrix products.

Batch statistics and their gradients are sums over every axis but the channel one. XLA:CPU's classic runtime
(jax 0.6.2, the default install on Linux x86-64) runs such reductions several times more slowly than products of
rows of ones with the activations, and less exactly when compiled without LLVM's optimisations (RESULTS.md); the
products cost about the same as the reductions on jax 0.10. The variance is two-pass, E[(x - mean)^2], more exact
than flax's default E[x^2] - E[x]^2, which cancels digits.
"""
import functools

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
    mean = _mean(x, channels_last, axis_name)
    centred = x - _per_channel(mean, x, channels_last)
    var = _mean(centred * centred, channels_last, axis_name)
    inv = lax.rsqrt(var + epsilon)
    return (_scale_shift(centred, inv * scale, bias, channels_last), mean, var), (centred, inv, scale)


def _normalize_backward(channels_last, epsilon, axis_name, residuals, cotangents):
    """dx = scale * inv * (g - mean(g) - xhat * mean(g * xhat)), xhat = (x - mean) * inv, the means over the
    global batch; plus the paths through the returned statistics (the running averages), d mean / dx = 1 / n and
    d var / dx = 2 (x - mean) / n."""
    centred, inv, scale = residuals
    g, g_mean, g_var = cotangents
    c = scale.shape[0]
    sum_g, sum_gc = channel_sums(g, channels_last), channel_sums(g * centred, channels_last)
    dscale, dbias = sum_gc * inv, sum_g
    count = g.size // c
    if axis_name is not None:
        (sum_g, sum_gc, g_mean, g_var), count = (lax.psum((sum_g, sum_gc, g_mean, g_var), axis_name),
                                                 count * lax.psum(1, axis_name))
    k = scale * inv
    shift, offset = _per_channel(sum_g / count, g, channels_last), _per_channel(g_mean / count, g, channels_last)
    slope = _per_channel((2 * g_var - sum_gc * inv * inv * k) / count, g, channels_last)
    dx = (g - shift) * _per_channel(k, g, channels_last) + centred * slope + offset
    return dx.astype(g.dtype), dscale, dbias


batch_normalize.defvjp(_normalize, _normalize_backward)


class BatchNorm(nn.Module):
    """`flax.linen.BatchNorm`'s variables (params scale, bias; batch_stats mean, var) and running-average update,
    with `batch_normalize`'s statistics; `axis` is the channel axis, the first or the last."""

    use_running_average: bool = False
    axis: int = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x):
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
        y, mean, var = batch_normalize(x, scale, bias, channels_last, self.epsilon, self.axis_name)
        if not self.is_initializing():
            keep = self.momentum
            ra_mean.value = keep * ra_mean.value + (1 - keep) * mean
            ra_var.value = keep * ra_var.value + (1 - keep) * var
        return y
