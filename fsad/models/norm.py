"""BatchNorm as PyTorch's `nn.BatchNorm2d` computes it, in the Flax variable layout."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fsad.precision import accumulation_dtype


class TorchBatchNorm(nn.Module):
    """PyTorch's BatchNorm over every axis but the last (channels).

    It differs from `flax.linen.BatchNorm` where the released code's numbers depend on it:
    the batch variance is the mean of squared deviations (Flax's default
    E[x^2] - E[x]^2 cancels catastrophically on small late-stage maps: an 8-device step
    differed from a 1-device one by 5e-3), and the running variance is updated with the
    unbiased batch variance (n / (n - 1)), as PyTorch does. Statistics are reduced in
    float32, or float64 for a float64 input (`fsad.precision`), and kept in float32; the
    output has the input's dtype.

    Variables: params scale, bias [C]; batch_stats mean, var [C] (the names
    `fsad.weights` maps torchvision's weight, bias, running_mean, running_var to).
    Call: x [..., C] -> [..., C].
    """

    use_running_average: bool = False
    momentum: float = 0.1  # PyTorch's convention: new = (1 - m) * old + m * batch
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        acc = accumulation_dtype(x.dtype)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            xf = x.astype(acc)
            mean = jnp.mean(xf, axes)
            var = jnp.mean(jnp.square(xf - mean), axes)
            if not self.is_initializing():
                n = x.size // c
                m = self.momentum
                ra_mean.value = ((1 - m) * ra_mean.value + m * mean).astype(jnp.float32)
                ra_var.value = ((1 - m) * ra_var.value
                                + m * var * (n / max(n - 1, 1))).astype(jnp.float32)
        # (x - mean) first: x * mul - mean * mul cancels when |mean| >> std
        y = (x.astype(acc) - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(x.dtype)
