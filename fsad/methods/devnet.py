"""DevNet (spec §5): ResNet or EfficientNet-Lite0 trunk, 1x1-conv top-K MIL scorer,
deviation loss."""

from __future__ import annotations

import flax.linen as nn

from fsad.losses import deviation_loss, sample_prior
from fsad.models.heads import TopKScorer
from fsad.models.backbone import make_trunk
from fsad.models.resnet import normalize_uint8
from fsad.optim import optimizer_from_config
from fsad.train import Method, sample_balanced


class DevNetModel(nn.Module):
    """phi(x) = top-K mean of 1x1-conv scores over the backbone map.

    Call:
      x: [B, H, W, 3] normalised float -> {"score": [B], "score_map": [B, h, w]}.
    """

    backbone: str = "resnet18"
    topk: float = 0.1
    use_abs: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        feats = make_trunk(self.backbone, name="backbone")(x, train)
        score, score_map = TopKScorer(self.topk, self.use_abs, name="head")(feats)
        return {"score": score, "score_map": score_map}


def devnet(config) -> Method:
    """The DevNet method from a config (fields model.*, loss.*, optim.*, anomaly_fraction)."""
    model = DevNetModel(config.model.backbone, config.model.topk, config.model.topk_abs)
    lc = config.loss

    def init(key, images):
        return dict(model.init(key, images, train=False))

    def sample_batch(data, key, batch_size):
        images, labels = sample_balanced(data, key, batch_size, config.anomaly_fraction)
        return {"images": images, "labels": labels}

    def loss(params, batch_stats, batch, key):
        out, mutated = model.apply({"params": params, "batch_stats": batch_stats},
                                   normalize_uint8(batch["images"]), train=True,
                                   mutable=["batch_stats"])
        prior = sample_prior(key, lc.prior_size, lc.prior_mu, lc.prior_sigma)
        value = deviation_loss(out["score"], batch["labels"], prior, lc.margin)
        return value, ({}, mutated["batch_stats"])

    def score(variables, images):
        v = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        return {"score": model.apply(v, images, train=False)["score"]}

    def optimizer(steps_per_epoch):
        return optimizer_from_config(config.optim, steps_per_epoch)

    return Method("devnet", init, sample_batch, loss, score, optimizer)
