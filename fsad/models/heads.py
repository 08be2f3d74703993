"""Scoring heads over a backbone feature map: DevNet's scorer and DRA's four heads.

Every head starts from PyTorch's default initialisation (kaiming-uniform with
a = sqrt(5) for weights, U(+-1/sqrt(fan_in)) for biases), as the released code's
nn.Conv2d / nn.Linear layers do, so that training starts where it starts.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fsad.losses import topk_mean
from fsad.models.cpu_conv import cpu_matmul_conv, matmul_conv
from fsad.models.resnet import torch_batch_norm

# kaiming_uniform_(a=sqrt(5)): bound = sqrt(6 / ((1 + a^2) fan_in)) = 1 / sqrt(fan_in)
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    """PyTorch's default bias init for a layer of `fan_in` inputs: U(-1/sqrt(fan_in), ...)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_conv(features: int, kernel: int, in_channels: int, name: str, stride: int = 1,
               padding: int = 0, cpu_matmul: bool = False) -> nn.Conv:
    """nn.Conv2d(in_channels, features, kernel, stride, padding) with its default init.
    3x3 and larger convs go through `matmul_conv` (a faster CPU route where it wins), or
    with cpu_matmul through `cpu_matmul_conv` (that route on CPU at every map size)."""
    route = cpu_matmul_conv if cpu_matmul else matmul_conv
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((padding, padding), (padding, padding)),
                   kernel_init=torch_kernel_init,
                   bias_init=torch_bias_init(in_channels * kernel * kernel),
                   conv_general_dilated=route if kernel > 1 else None, name=name)


def torch_dense(features: int, in_features: int, name: str) -> nn.Dense:
    """nn.Linear(in_features, features) with its default init."""
    return nn.Dense(features, kernel_init=torch_kernel_init,
                    bias_init=torch_bias_init(in_features), name=name)


class TopKScorer(nn.Module):
    """1x1 conv to a score map, then the top-K mean (DevNet Eq. 6; DRA's seen and
    pseudo heads, the released `PlainHead`).

    Call:
      feats: [B, h, w, C] -> (scores [B], score_map [B, h, w]).
    """

    topk: float = 0.1
    use_abs: bool = True

    @nn.compact
    def __call__(self, feats):
        score_map = torch_conv(1, 1, feats.shape[-1], "conv")(feats)[..., 0]
        score_map = score_map.astype(jnp.float32)  # scores and losses in float32
        return topk_mean(score_map, self.topk, self.use_abs), score_map


class ResidualScorer(nn.Module):
    """DRA latent-residual head (the released `CompositeHead`): (reference mean map -
    input map) -> conv 3x3 (stride 1, padding 1 by default) -> BN -> ReLU -> 1x1 conv ->
    top-K mean of |s|.

    Call:
      feats: [B, h, w, C]; ref_mean: [h, w, C] mean map of the reference set -> [B].
    cpu_matmul: the 3x3 conv as slices and a matmul on CPU at every map size
    (`fsad.models.cpu_conv.cpu_matmul_conv`; AHL's meta-step).
    """

    topk: float = 0.1
    stride: int = 1
    padding: int = 1
    cpu_matmul: bool = False
    use_abs: bool = True

    @nn.compact
    def __call__(self, feats, ref_mean, train: bool = False):
        x = ref_mean[None] - feats
        c = feats.shape[-1]
        x = torch_conv(c, 3, c, "conv", self.stride, self.padding, self.cpu_matmul)(x)
        x = torch_batch_norm(train, "bn")(x)
        x = nn.relu(x)
        score_map = torch_conv(1, 1, c, "score")(x)[..., 0].astype(jnp.float32)
        return topk_mean(score_map, self.topk, self.use_abs)


class NormalityScorer(nn.Module):
    """DRA normality head (the released `HolisticHead`): global average pool -> FC
    C->256 -> ReLU -> FC 256->1 -> |.|. [B, h, w, C] -> [B], non-negative."""

    hidden: int = 256

    @nn.compact
    def __call__(self, feats):
        x = feats.mean(axis=(1, 2))
        x = nn.relu(torch_dense(self.hidden, x.shape[-1], "fc1")(x))
        return jnp.abs(torch_dense(1, self.hidden, "fc2")(x)[:, 0]).astype(jnp.float32)
