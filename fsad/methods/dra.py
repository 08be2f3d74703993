"""DRA (Ding et al., CVPR 2022): four disentangled heads on one trunk (spec §6).

Heads: seen (1x1 conv + top-K), pseudo (same, own weights), latent residual
(reference mean map minus input map, conv 3x3/3, BN, ReLU, 1x1, top-K) and
normality (pool, 512-256-1, target 1 for normal images). The whole model runs
at two scales (input and nearest half size) and each head's score is the mean
over scales. Score = seen + pseudo + residual - normality.

Labels in a training batch: 0 normal, 1 seen anomaly, 2 pseudo anomaly.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fsad.data.augment import cutpaste, random_rotation
from fsad.losses import binary_cross_entropy, deviation_loss, focal_loss, sample_prior
from fsad.models.heads import NormalityScorer, ResidualScorer, TopKScorer
from fsad.models.backbone import make_trunk
from fsad.models.resnet import normalize_uint8
from fsad.optim import optimizer_from_config
from fsad.train import Method

HEADS = ("seen", "pseudo", "residual", "normality")
VARIANTS = {
    "DRA1A": ("seen",),
    "DRA2A": ("seen", "pseudo"),
    "DRA3Ar": ("seen", "pseudo", "residual"),
    "DRA3An": ("seen", "pseudo", "normality"),
    "DRA": HEADS,
}
NORMAL, SEEN, PSEUDO = 0, 1, 2


def half_nearest(x: jax.Array) -> jax.Array:
    """PyTorch `F.interpolate(x, size=H // 2)` (nearest) for even H: every other pixel."""
    return x[:, ::2, ::2]


class DRAHeads(nn.Module):
    """The four heads over trunk features at every pyramid scale; each head's score is
    the mean over scales.

    Call:
      feats: list over scales of [B, h_s, w_s, C]; ref_means: list of [h_s, w_s, C]
      (mean map of the reference set at that scale) -> {head: [B]}.
    """

    topk: float = 0.1
    heads: tuple = HEADS
    residual_stride: int = 3

    @nn.compact
    def __call__(self, feats, ref_means, train: bool = False):
        modules = {
            "seen": TopKScorer(self.topk, True, name="seen"),
            "pseudo": TopKScorer(self.topk, True, name="pseudo"),
            "residual": ResidualScorer(self.topk, self.residual_stride, name="residual"),
            "normality": NormalityScorer(name="normality"),
        }
        per_scale = {h: [] for h in self.heads}
        for f, ref_mean in zip(feats, ref_means):
            for h in self.heads:
                if h in ("seen", "pseudo"):
                    per_scale[h].append(modules[h](f)[0])
                elif h == "residual":
                    per_scale[h].append(modules[h](f, ref_mean, train))
                else:
                    per_scale[h].append(modules[h](f))
        return {h: jnp.mean(jnp.stack(v), axis=0) for h, v in per_scale.items()}


def pyramid(images: jax.Array, n_scales: int) -> list:
    """[B, H, W, 3] -> the list of scales (input, then nearest halvings)."""
    out = [images]
    for _ in range(1, n_scales):
        out.append(half_nearest(out[-1]))
    return out


class DRAModel(nn.Module):
    """Call: x [B, H, W, 3], ref [R, H, W, 3] (both normalised) -> {head: [B]}.

    The reference images go through the trunk in the same forward pass as x.
    """

    backbone: str = "resnet18"
    topk: float = 0.1
    heads: tuple = HEADS
    n_scales: int = 2
    residual_stride: int = 3

    @nn.compact
    def __call__(self, x, ref, train: bool = False):
        trunk = make_trunk(self.backbone, name="backbone")
        n_ref = ref.shape[0]
        feats, ref_means = [], []
        for images in pyramid(jnp.concatenate([ref, x]), self.n_scales):
            f = trunk(images, train)
            feats.append(f[n_ref:])
            ref_means.append(f[:n_ref].mean(0))
        return DRAHeads(self.topk, self.heads, self.residual_stride, name="heads")(
            feats, ref_means, train)


def combine(head_scores: dict) -> jax.Array:
    """Score = seen + pseudo + residual - normality (the heads present). -> [B]."""
    total = 0.0
    for h, s in head_scores.items():
        total = total - s if h == "normality" else total + s
    return total


def head_routing(labels: jax.Array) -> dict:
    """Which samples each head's loss sees, and its targets (released DRA code).

    Args:
      labels: [B] in {0 normal, 1 seen, 2 pseudo}.
    Returns:
      {head: (targets [B] {0,1}, mask [B] {0,1})}.
    """
    ones = jnp.ones_like(labels)
    return {
        "seen": (labels == SEEN, labels != PSEUDO),       # pseudo anomalies left out
        "pseudo": (labels == PSEUDO, labels != SEEN),     # seen anomalies left out
        "residual": (labels != NORMAL, ones),             # every anomaly is 1
        "normality": (labels == NORMAL, ones),            # scores normality: normal is 1
    }


def head_losses(head_scores: dict, labels: jax.Array, key: jax.Array, loss: str = "deviation",
                prior_size: int = 5000, margin: float = 5.0,
                sample_mask: jax.Array | None = None) -> dict:
    """Each head's loss on the samples routed to it; fresh prior samples per head.

    Args:
      head_scores: {head: [B]}; labels: [B] {0, 1, 2}; key: PRNG key.
      loss: "deviation", "bce" or "focal".
      sample_mask: optional [B] {0, 1}; padded samples (0) reach no head.
    Returns:
      {head: scalar}.
    """
    routes = head_routing(labels)
    out = {}
    for i, (h, s) in enumerate(sorted(head_scores.items())):
        target, mask = routes[h]
        if sample_mask is not None:
            mask = mask * sample_mask
        if loss == "deviation":
            prior = sample_prior(jax.random.fold_in(key, i), prior_size)
            out[h] = deviation_loss(s, target, prior, margin, mask)
        elif loss == "bce":
            out[h] = binary_cross_entropy(s, target, mask)
        elif loss == "focal":
            out[h] = focal_loss(s, target, mask=mask)
        else:
            raise ValueError(f"unknown loss {loss!r}; use deviation, bce or focal")
    return out


def dra(config) -> Method:
    """The DRA method from a config (fields model.*, dra.*, loss.*, optim.*)."""
    d = config.dra
    if d.test_reference not in ("fixed", "per_batch"):
        raise ValueError(f"dra.test_reference must be fixed or per_batch, got {d.test_reference!r}")
    if d.variant not in VARIANTS:
        raise ValueError(f"unknown DRA variant {d.variant!r}; choose one of {sorted(VARIANTS)}")
    heads = VARIANTS[d.variant]
    model = DRAModel(config.model.backbone, config.model.topk, heads, d.n_scales,
                     d.residual_stride)
    use_outliers = bool(d.outlier_root)

    def init(key, images):
        ref = jnp.zeros((d.n_ref, *images.shape[1:]), images.dtype)
        return dict(model.init(key, images, ref, train=False))

    def init_extras(key, data):
        """The fixed, seeded test reference set (n_ref training normals); with
        test_reference="per_batch", the pool of training normals it is drawn from."""
        if d.test_reference == "per_batch":
            return {"ref_pool": data.images[:int(data.n_normal)]}
        idx = jax.random.choice(key, data.n_normal, (d.n_ref,), replace=False)
        return {"ref_images": data.images[idx]}

    def sample_batch(data, key, batch_size):
        n_anom = int(round(batch_size * config.anomaly_fraction))
        n_norm = batch_size - n_anom
        k_n, k_a, k_p, k_flip, k_ref, k_rot = jax.random.split(key, 6)
        idx_n = jax.random.randint(k_n, (n_norm,), 0, data.n_normal)
        idx_a = jax.random.randint(k_a, (n_anom,), data.n_normal, data.n_normal + data.n_anomaly)
        normals = data.images[idx_n]
        if use_outliers:
            pick = jax.random.randint(k_p, (n_norm,), 0, jnp.maximum(data.n_outlier, 1))
            pseudo = data.outliers[pick]
        else:
            pseudo = jax.vmap(lambda k, im: cutpaste(k, im)[0])(jax.random.split(k_p, n_norm),
                                                                normals)
        flip = jax.random.uniform(k_flip, (n_norm,)) < d.pseudo_prob
        normals = jnp.where(flip[:, None, None, None], pseudo, normals)
        images = jnp.concatenate([normals, data.images[idx_a]])
        labels = jnp.concatenate([jnp.where(flip, PSEUDO, NORMAL),
                                  jnp.full((n_anom,), SEEN)]).astype(jnp.int32)
        ref = data.images[jax.random.randint(k_ref, (d.n_ref,), 0, data.n_normal)]
        if d.rotate:
            k_b, k_r = jax.random.split(k_rot)
            rot = jax.vmap(lambda k, im: random_rotation(k, im, d.rotate_degrees))
            images = rot(jax.random.split(k_b, batch_size), images)
            ref = rot(jax.random.split(k_r, d.n_ref), ref)
        return {"images": images, "labels": labels, "ref": ref}

    def loss(params, batch_stats, batch, key):
        scores, mutated = model.apply({"params": params, "batch_stats": batch_stats},
                                      normalize_uint8(batch["images"]),
                                      normalize_uint8(batch["ref"]), train=True,
                                      mutable=["batch_stats"])
        per_head = head_losses(scores, batch["labels"], key, d.loss, config.loss.prior_size,
                               config.loss.margin)
        total = sum(per_head.values())
        return total, ({f"loss_{h}": v for h, v in per_head.items()}, mutated["batch_stats"])

    def score(variables, images):
        v = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        extras = variables["extras"]
        if "ref_pool" in extras:  # the released code: a fresh reference set per test batch
            pool = extras["ref_pool"]
            ref = pool[jax.random.randint(variables["key"], (d.n_ref,), 0, pool.shape[0])]
        else:
            ref = extras["ref_images"]
        ref = normalize_uint8(ref)
        heads_out = model.apply(v, images, ref, train=False)
        # each head's contribution to the anomaly score: normality enters negated
        parts = {h: -s if h == "normality" else s for h, s in heads_out.items()}
        return {"score": combine(heads_out), **parts}

    def optimizer(steps_per_epoch):
        return optimizer_from_config(config.optim, steps_per_epoch)

    return Method("dra", init, sample_batch, loss, score, optimizer, init_extras,
                  random_scores=d.test_reference == "per_batch")
