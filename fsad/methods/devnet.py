"""DevNet (spec §5): ResNet or EfficientNet-Lite0 trunk, 1x1-conv top-K MIL scorer,
deviation loss; by default the released code's two-scale image pyramid and rotation."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fsad.errors import UserError
from fsad.losses import deviation_loss, sample_prior
from fsad.models.backbone import depthwise_route, make_trunk, stem_route
from fsad.models.heads import TopKScorer
from fsad.models.pyramid import pyramid
from fsad.models.resnet import normalize_uint8
from fsad.optim import optimizer_from_config
from fsad.precision import apply_in, compute_dtype
from fsad.train import Method, rotate_batch, sample_balanced


VARIANTS = ("MIL-DS", "DS", "Patch-DS", "Rep")


class DevNetModel(nn.Module):
    """phi(x) = mean over pyramid scales of the top-K mean of 1x1-conv scores over the
    trunk's map (one trunk and one scorer for every scale, the released `SemiADNet`).

    `variant` selects DevNet-TPAMI's ablations (Table 5): "MIL-DS" (default: top-K
    MIL), "DS" (no MIL: the mean of the score map, the released code's `--topk 0`),
    "Patch-DS" (the same mean at test; the loss is on every cell, see `devnet_loss`),
    "Rep" (no score layer: the loss is on the average-pooled representation against a
    multivariate prior, and phi is that representation's mean over its channels, which
    orders images as the mean of their per-channel deviations does).

    Call:
      x: [B, H, W, 3] normalised float -> {"score": [B], "scale_scores": [S, B],
      "score_map": [B, h, w] (the full-scale map; not for Rep),
      "cell_scores": [S] of [B, h_s * w_s] (every cell's score; not for Rep),
      "representation": [B, C] (Rep only: the pooled map, mean over scales)}.
    """

    backbone: str = "resnet18"
    topk: float = 0.1
    use_abs: bool = True
    n_scales: int = 2
    variant: str = "MIL-DS"
    depthwise: str = "auto"  # the trunk's depthwise route (`make_trunk`)
    stem: str = "conv"  # a ResNet trunk's stem route (`make_trunk`)

    @nn.compact
    def __call__(self, x, train: bool = False):
        trunk = make_trunk(self.backbone, name="backbone", depthwise=self.depthwise,
                           stem=self.stem)
        if self.variant == "Rep":
            reps = [trunk(images, train).astype(jnp.float32).mean(axis=(1, 2))
                    for images in pyramid(x, self.n_scales)]
            rep = jnp.mean(jnp.stack(reps), axis=0)
            scale_scores = jnp.stack([r.mean(axis=-1) for r in reps])
            return {"score": rep.mean(axis=-1), "scale_scores": scale_scores,
                    "representation": rep}
        head = TopKScorer(self.topk, self.use_abs, name="head")
        scores, maps = [], []
        for images in pyramid(x, self.n_scales):
            s, m = head(trunk(images, train))
            scores.append(s if self.variant == "MIL-DS" else m.mean(axis=(1, 2)))
            maps.append(m)
        scale_scores = jnp.stack(scores)
        return {"score": scale_scores.mean(0), "scale_scores": scale_scores,
                "score_map": maps[0], "cell_scores": [m.reshape(m.shape[0], -1) for m in maps]}


def devnet_loss(out: dict, labels: jax.Array, key: jax.Array, variant: str = "MIL-DS",
                prior_size: int = 5000, mu: float = 0.0, sigma: float = 1.0,
                margin: float = 5.0) -> jax.Array:
    """The deviation loss of a DevNet variant on `DevNetModel`'s outputs.

    MIL-DS and DS: on the image score phi. Patch-DS: on every cell of every scale's map,
    each cell with its image's label, mean over scales. Rep: on the [B, C]
    representation against a [prior_size, C] multivariate prior N(mu, sigma^2 I).

    Args:
      out: `DevNetModel` outputs; labels: [B] {0, 1}; key: fresh prior samples.
    Returns:
      scalar float32.
    """
    if variant == "Rep":
        rep = out["representation"]
        prior = sample_prior(key, prior_size, mu, sigma, dims=rep.shape[-1])
        return deviation_loss(rep, labels, prior, margin)
    prior = sample_prior(key, prior_size, mu, sigma)
    if variant == "Patch-DS":
        return jnp.mean(jnp.stack([deviation_loss(c, labels, prior, margin)
                                   for c in out["cell_scores"]]))
    return deviation_loss(out["score"], labels, prior, margin)


def check_devnet_config(d) -> None:
    """UserError for an unknown `devnet.variant`."""
    if d.variant not in VARIANTS:
        raise UserError(f"devnet.variant={d.variant!r} is not a DevNet variant; use one of "
                        f"{', '.join(VARIANTS)} (DevNet-TPAMI Table 5; MIL-DS is DevNet)")


def devnet_variant(config) -> str:
    """A config's `devnet.variant`; "MIL-DS" (DevNet itself) for a config without the
    field (one made before it existed, or another method's)."""
    return config.devnet.variant if "devnet" in config else "MIL-DS"


def devnet(config) -> Method:
    """The DevNet method from a config (fields model.*, augment.*, loss.*, optim.*,
    anomaly_fraction)."""
    variant = devnet_variant(config)
    model = DevNetModel(config.model.backbone, config.model.topk, config.model.topk_abs,
                        config.model.n_scales, variant, depthwise_route(config),
                        stem_route(config))
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
        value = devnet_loss(out, batch["labels"], key, variant, lc.prior_size, lc.prior_mu,
                            lc.prior_sigma, lc.margin)
        return value, ({}, mutated.get("batch_stats", {}))

    def score(variables, images):
        out = apply_in(model, dtype, variables["params"], variables["batch_stats"], images,
                       train=False)
        return {"score": out["score"]}

    def optimizer(steps_per_epoch):
        return optimizer_from_config(config.optim, steps_per_epoch)

    return Method("devnet", init, sample_batch, loss, score, optimizer)
