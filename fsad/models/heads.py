"""Scoring heads over a backbone feature map.

DevNet's scorer is here; DRA's seen/pseudo/residual/normality heads join it.
"""

from __future__ import annotations

import flax.linen as nn

from fsad.losses import topk_mean


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
