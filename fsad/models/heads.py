"""Scoring heads over a backbone feature map.

DevNet's scorer is here; DRA's seen/pseudo/residual/normality heads join it.
"""

from __future__ import annotations

import flax.linen as nn

from fsad.losses import topk_mean
from fsad.models.cpu_conv import matmul_conv


class TopKScorer(nn.Module):
    """1x1 conv to a score map, then the top-K mean (DevNet Eq. 6).

    Call:
      feats: [B, h, w, C] -> (scores [B], score_map [B, h, w]).
    """

    topk: float = 0.1
    use_abs: bool = True

    @nn.compact
    def __call__(self, feats):
        score_map = nn.Conv(1, (1, 1), name="conv")(feats)[..., 0]
        return topk_mean(score_map, self.topk, self.use_abs), score_map


class ResidualScorer(nn.Module):
    """DRA latent-residual head: (reference map - input map) -> conv 3x3 stride 3 -> BN ->
    ReLU -> 1x1 conv -> top-K mean.

    Call:
      feats: [B, h, w, C]; ref_mean: [h, w, C] mean map of the reference set -> [B].
    """

    topk: float = 0.1
    stride: int = 3

    @nn.compact
    def __call__(self, feats, ref_mean, train: bool = False):
        x = ref_mean[None] - feats
        c = feats.shape[-1]
        x = nn.Conv(c, (3, 3), strides=(self.stride, self.stride), padding=((1, 1), (1, 1)),
                    conv_general_dilated=matmul_conv, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(x)
        x = nn.relu(x)
        score_map = nn.Conv(1, (1, 1), name="score")(x)[..., 0]
        return topk_mean(score_map, self.topk, True)


class NormalityScorer(nn.Module):
    """DRA normality head: global average pool -> FC 512->256 -> ReLU -> FC 256->1. [B,h,w,C] -> [B]."""

    hidden: int = 256

    @nn.compact
    def __call__(self, feats):
        x = feats.mean(axis=(1, 2))
        x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
        return nn.Dense(1, name="fc2")(x)[:, 0]
