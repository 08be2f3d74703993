"""DevNet (spec §5): ResNet or EfficientNet-Lite0 trunk, 1x1-conv top-K MIL scorer,
deviation loss; by default the released code's two-scale image pyramid and rotation."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fsad.losses import deviation_loss, sample_prior
from fsad.models.backbone import make_trunk
from fsad.models.heads import TopKScorer
from fsad.models.pyramid import pyramid
from fsad.models.resnet import normalize_uint8
from fsad.optim import optimizer_from_config
from fsad.precision import apply_in, compute_dtype
from fsad.train import Method, rotate_batch, sample_balanced


class DevNetModel(nn.Module):
    """phi(x) = mean over pyramid scales of the top-K mean of 1x1-conv scores over the
    trunk's map (one trunk and one scorer for every scale, the released `SemiADNet`).

    Call:
      x: [B, H, W, 3] normalised float -> {"score": [B], "scale_scores": [S, B],
      "score_map": [B, h, w] (the full-scale map)}.
    """

    backbone: str = "resnet18"
    topk: float = 0.1
    use_abs: bool = True
    n_scales: int = 2

    @nn.compact
    def __call__(self, x, train: bool = False):
        trunk = make_trunk(self.backbone, name="backbone")
        head = TopKScorer(self.topk, self.use_abs, name="head")
        scores, maps = [], []
        for images in pyramid(x, self.n_scales):
            s, m = head(trunk(images, train))
            scores.append(s)
            maps.append(m)
        scale_scores = jnp.stack(scores)
        return {"score": scale_scores.mean(0), "scale_scores": scale_scores,
                "score_map": maps[0]}


def devnet(config) -> Method:
    """The DevNet method from a config (fields model.*, augment.*, loss.*, optim.*,
    anomaly_fraction)."""
    model = DevNetModel(config.model.backbone, config.model.topk, config.model.topk_abs,
                        config.model.n_scales)
    dtype = compute_dtype(config.model.get("dtype", "auto"))
    lc = config.loss

    def init(key, images):
        return dict(model.init(key, images, train=False))

    def sample_batch(data, key, batch_size, step):
        k_draw, k_aug = jax.random.split(key)
        images, labels = sample_balanced(data, k_draw, step, batch_size,
                                         config.anomaly_fraction)
        images = rotate_batch(jax.random.fold_in(k_aug, step), images,
                              config.augment.rotate_degrees)
        return {"images": images, "labels": labels}

    def loss(params, batch_stats, batch, key):
        out, mutated = apply_in(model, dtype, params, batch_stats,
                                normalize_uint8(batch["images"]), train=True,
                                mutable=["batch_stats"])
        prior = sample_prior(key, lc.prior_size, lc.prior_mu, lc.prior_sigma)
        value = deviation_loss(out["score"], batch["labels"], prior, lc.margin)
        return value, ({}, mutated["batch_stats"])

    def score(variables, images):
        out = apply_in(model, dtype, variables["params"], variables["batch_stats"], images,
                       train=False)
        return {"score": out["score"]}

    def optimizer(steps_per_epoch):
        return optimizer_from_config(config.optim, steps_per_epoch)

    return Method("devnet", init, sample_batch, loss, score, optimizer)
