"""DRA (Ding et al., CVPR 2022): four disentangled heads on one trunk (spec §6).

Heads (the released code's): seen (1x1 conv + top-K), pseudo (same, own weights),
latent residual (reference mean map minus input map, conv 3x3 stride 1 padding 1,
BN, ReLU, 1x1, top-K of |s|) and normality (pool, C-256-1, |.|; target 1 for
normal images). The whole model runs at two scales (input and nearest half size)
and each head's score is the mean over scales. Score = seen + pseudo + residual -
normality.

Training pipeline (released): normal slots become pseudo anomalies with
probability 0.5 (CutPaste of the image, or an outlier-exposure image), then every
image is rotated; the reference images are normals drawn from their own stream
through the same pipeline, so they too are rotated and sometimes pseudo.

Labels in a training batch: 0 normal, 1 seen anomaly, 2 pseudo anomaly.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fsad.data.augment import cutpaste
from fsad.data.protocols import batch_counts
from fsad.errors import UserError
from fsad.losses import binary_cross_entropy, deviation_loss, focal_loss, sample_prior
from fsad.models.backbone import depthwise_route, make_trunk, stem_route, trunk_features
from fsad.models.heads import NormalityScorer, ResidualScorer, TopKScorer
from fsad.models.pyramid import pyramid
from fsad.models.resnet import normalize_uint8
from fsad.optim import optimizer_from_config
from fsad.precision import apply_in, compute_dtype
from fsad.train import Method, cycle_draw, rotate_batch

HEADS = ("seen", "pseudo", "residual", "normality")
VARIANTS = {
    "DRA1A": ("seen",),
    "DRA2A": ("seen", "pseudo"),
    "DRA3Ar": ("seen", "pseudo", "residual"),
    "DRA3An": ("seen", "pseudo", "normality"),
    "DRA": HEADS,
}
NORMAL, SEEN, PSEUDO = 0, 1, 2
LOSSES = ("deviation", "bce", "focal")
TEST_REFERENCES = ("fixed", "per_batch")


def check_head_inputs(heads, feats, ref_means) -> None:
    """Raises ValueError, naming the fix, for what DRAHeads cannot take: an unknown head,
    feats not a list over scales, or the residual head without reference maps (or with
    maps of other shapes than the features': they broadcast without a word)."""
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        raise ValueError(f"heads {unknown} are not DRA's; use some of {HEADS}")
    if not isinstance(feats, (list, tuple)):
        raise ValueError(f"feats is a {type(feats).__name__}; pass a list over scales of "
                         f"[B, h, w, C] maps ([feats] for one scale)")
    if "residual" not in heads:
        return
    if ref_means is None or len(ref_means) != len(feats):
        raise ValueError(f"the residual head takes the reference set's mean map at each of "
                         f"the {len(feats)} scale(s) ([h, w, C] each, `reference_means`), "
                         f"not {None if ref_means is None else len(ref_means)}; or leave "
                         f"'residual' out of heads")
    for s, (f, r) in enumerate(zip(feats, ref_means)):
        if tuple(r.shape) != tuple(f.shape[1:]):
            raise ValueError(f"ref_means[{s}] is {tuple(r.shape)}, and the features at that "
                             f"scale are {tuple(f.shape[1:])} per image: each reference map "
                             f"has its scale's [h, w, C]")


class DRAHeads(nn.Module):
    """The heads over trunk features at every pyramid scale; each head's score is the
    mean over scales.

    Call:
      feats: list over scales of [B, h_s, w_s, C]; ref_means: list of [h_s, w_s, C]
      (mean map of the reference set at that scale), or None without a residual head
      -> {head: [B]}.
    cpu_matmul: the residual head's conv as slices and a matmul on CPU at every map
    size (`ResidualScorer`; AHL's meta-step on bank features).
    """

    topk: float = 0.1
    heads: tuple = HEADS
    residual_stride: int = 1
    residual_padding: int = 1
    cpu_matmul: bool = False
    topk_abs: bool = True

    @nn.compact
    def __call__(self, feats, ref_means=None, train: bool = False):
        check_head_inputs(self.heads, feats, ref_means)
        modules = {
            "seen": TopKScorer(self.topk, self.topk_abs, name="seen"),
            "pseudo": TopKScorer(self.topk, self.topk_abs, name="pseudo"),
            "residual": ResidualScorer(self.topk, self.residual_stride, self.residual_padding,
                                       self.cpu_matmul, self.topk_abs, name="residual"),
            "normality": NormalityScorer(name="normality"),
        }
        per_scale = {h: [] for h in self.heads}
        for s, f in enumerate(feats):
            for h in self.heads:
                if h in ("seen", "pseudo"):
                    per_scale[h].append(modules[h](f)[0])
                elif h == "residual":
                    per_scale[h].append(modules[h](f, ref_means[s], train))
                else:
                    per_scale[h].append(modules[h](f))
        return {h: jnp.mean(jnp.stack(v), axis=0) for h, v in per_scale.items()}


class DRAModel(nn.Module):
    """Call: x [B, H, W, 3], ref [R, H, W, 3] or None (both normalised) -> {head: [B]}.

    The reference images go through the trunk in the same forward pass as x (so in
    training they share its BatchNorm statistics, as in the released code); a model
    without the residual head takes none.
    """

    backbone: str = "resnet18"
    topk: float = 0.1
    heads: tuple = HEADS
    n_scales: int = 2
    residual_stride: int = 1
    residual_padding: int = 1
    topk_abs: bool = True
    depthwise: str = "auto"  # the trunk's depthwise route (`make_trunk`)
    stem: str = "conv"  # a ResNet trunk's stem route (`make_trunk`)

    @nn.compact
    def __call__(self, x, ref=None, train: bool = False, ref_means=None):
        """ref_means: the reference mean maps per scale, computed beforehand (evaluation
        with a fixed reference set: `reference_means`); then ref is not needed."""
        trunk = make_trunk(self.backbone, name="backbone", depthwise=self.depthwise,
                           stem=self.stem)
        n_ref = 0 if ref is None or ref_means is not None else ref.shape[0]
        both = jnp.concatenate([ref, x]) if n_ref else x
        feats, means = [], []
        for images in pyramid(both, self.n_scales):
            f = trunk(images, train)
            feats.append(f[n_ref:])
            means.append(f[:n_ref].mean(0) if n_ref else None)
        if ref_means is not None:
            means = [m.astype(feats[0].dtype) for m in ref_means]
        heads = DRAHeads(self.topk, self.heads, self.residual_stride, self.residual_padding,
                         topk_abs=self.topk_abs, name="heads")
        return heads(feats, means if (n_ref or ref_means is not None) else None, train)


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


def head_weights(labels: jax.Array, sample_weight: jax.Array | None = None,
                 dtype=jnp.float32) -> dict:
    """Each sample's weight in each head's loss (`head_losses`): its routing mask
    (`head_routing`, as dtype) times sample_weight. A head's loss is the mean over the
    samples weighted so.

    Args:
      labels: [B] {0, 1, 2}; sample_weight: optional [B] >= 0.
    Returns:
      {head: [B]} (dtype, or promoted with sample_weight's).
    """
    return {h: _weighted(mask, sample_weight, dtype)
            for h, (_, mask) in head_routing(labels).items()}


def _weighted(mask: jax.Array, sample_weight: jax.Array | None, dtype) -> jax.Array:
    """A head's routing mask [B] as dtype, times sample_weight [B] where given."""
    mask = mask.astype(dtype)
    return mask if sample_weight is None else mask * sample_weight


def head_losses(head_scores: dict, labels: jax.Array, key: jax.Array, loss: str = "deviation",
                prior_size: int = 5000, margin: float = 5.0,
                sample_weight: jax.Array | None = None, prior_mu: float = 0.0,
                prior_sigma: float = 1.0) -> dict:
    """Each head's loss on the samples routed to it; fresh prior samples per head.

    Args:
      head_scores: {head: [B]}; labels: [B] {0, 1, 2}; key: PRNG key.
      loss: "deviation", "bce" or "focal".
      sample_weight: optional [B] >= 0; a head's loss is the weighted mean over the
        samples routed to it (padding has weight 0; AHL's class balance sets the rest).
      prior_mu, prior_sigma: the Gaussian prior of the deviation loss.
    Returns:
      {head: scalar}.
    """
    routes = head_routing(labels)
    out = {}
    for i, (h, s) in enumerate(sorted(head_scores.items())):
        target, mask = routes[h]
        mask = _weighted(mask, sample_weight, s.dtype)  # as head_weights gives it
        if loss == "deviation":
            prior = sample_prior(jax.random.fold_in(key, i), prior_size, prior_mu, prior_sigma)
            out[h] = deviation_loss(s, target, prior, margin, mask)
        elif loss == "bce":
            out[h] = binary_cross_entropy(s, target, mask)
        elif loss == "focal":
            out[h] = focal_loss(s, target, mask=mask)
        else:
            raise UserError(f"dra.loss={loss!r} is not a loss; use one of {', '.join(LOSSES)}")
    return out


def check_dra_config(d) -> None:
    """Raises UserError for an unknown variant, loss or test-reference mode, or a residual
    conv's stride or padding its 3x3 kernel cannot take (stride 0 was a ZeroDivisionError
    in the first step)."""
    if d.variant not in VARIANTS:
        raise UserError(f"dra.variant={d.variant!r} is not a DRA variant; use one of "
                        f"{', '.join(VARIANTS)}")
    if d.loss not in LOSSES:
        raise UserError(f"dra.loss={d.loss!r} is not a loss; use one of {', '.join(LOSSES)}")
    if d.test_reference not in TEST_REFERENCES:
        raise UserError(f"dra.test_reference={d.test_reference!r}; use fixed or per_batch")
    if not (1 <= d.residual_stride <= 3 and 0 <= d.residual_padding <= 1):
        raise UserError(f"dra.residual_stride={d.residual_stride}, dra.residual_padding="
                        f"{d.residual_padding}: the residual head's 3x3 conv takes stride 1 "
                        f"to 3 and padding 0 or 1 (released: 1 and 1; AHL's: 3 and 0)")


def dra(config) -> Method:
    """The DRA method from a config (fields model.*, augment.*, dra.*, loss.*, optim.*)."""
    d = config.dra
    check_dra_config(d)
    heads = VARIANTS[d.variant]
    uses_ref = "residual" in heads
    model = DRAModel(config.model.backbone, config.model.topk, heads, config.model.n_scales,
                     d.residual_stride, d.residual_padding, config.model.topk_abs,
                     depthwise_route(config), stem_route(config))
    use_outliers = bool(d.outlier_root)
    lc = config.loss
    dtype = compute_dtype(config.model.get("dtype", "auto"))

    def pipeline(key, images, outliers, n_outlier):
        """The released training transform of normal images: each becomes, with
        probability pseudo_prob, a pseudo anomaly (CutPaste of itself, or an outlier
        image), then every image is rotated. [N,H,W,3] uint8 -> (same, is_pseudo [N])."""
        k_p, k_flip, k_rot = jax.random.split(key, 3)
        n = images.shape[0]
        if use_outliers:
            pick = jax.random.randint(k_p, (n,), 0, jnp.maximum(n_outlier, 1))
            pseudo = outliers[pick]
        else:
            pseudo = jax.vmap(lambda k, im: cutpaste(k, im)[0])(jax.random.split(k_p, n), images)
        flip = jax.random.uniform(k_flip, (n,)) < d.pseudo_prob
        images = jnp.where(flip[:, None, None, None], pseudo, images)
        return rotate_batch(k_rot, images, config.augment.rotate_degrees), flip

    def init(key, images):
        ref = jnp.zeros((d.n_ref, *images.shape[1:]), images.dtype) if uses_ref else None
        return dict(model.init(key, images, ref, train=False))

    def init_extras(key, data):
        """The test reference set: with test_reference="fixed" one seeded draw of n_ref
        training normals through the training pipeline, kept in the checkpoint; with
        "per_batch", the pool it is drawn from at every test batch (the released code)."""
        if not uses_ref:
            return {}
        if d.test_reference == "per_batch":
            return {"ref_pool": data.images[:int(data.n_normal)],
                    "ref_outliers": data.outliers[:max(int(data.n_outlier), 1)]}
        k_idx, k_pipe = jax.random.split(key)
        idx = jax.random.choice(k_idx, data.n_normal, (d.n_ref,), replace=False)
        # compiled as one program (op by op, its CutPaste and rotation compile for ~10 s)
        ref, _ = jax.jit(pipeline)(k_pipe, data.images[idx], data.outliers, data.n_outlier)
        return {"ref_images": ref}

    def sample_batch(data, key, batch_size, step):
        n_norm, n_anom = batch_counts(batch_size, config.anomaly_fraction)
        k_n, k_a, k_r, k_aug = jax.random.split(key, 4)
        cap = data.images.shape[0]
        idx_n = cycle_draw(k_n, step, n_norm, data.n_normal, cap)
        idx_a = data.n_normal + cycle_draw(k_a, step, n_anom, data.n_anomaly, cap)
        k_step = jax.random.fold_in(k_aug, step)
        k_pn, k_pr, k_rot = jax.random.split(k_step, 3)
        normals, flip = pipeline(k_pn, data.images[idx_n], data.outliers, data.n_outlier)
        anomalies = rotate_batch(k_rot, data.images[idx_a], config.augment.rotate_degrees)
        labels = jnp.concatenate([jnp.where(flip, PSEUDO, NORMAL),
                                  jnp.full((n_anom,), SEEN)]).astype(jnp.int32)
        batch = {"images": jnp.concatenate([normals, anomalies]), "labels": labels}
        if uses_ref:  # the released reference loader: its own stream over the normals
            idx_r = cycle_draw(k_r, step, d.n_ref, data.n_normal, cap)
            batch["ref"], _ = pipeline(k_pr, data.images[idx_r], data.outliers,
                                       data.n_outlier)
        return batch

    def loss(params, batch_stats, batch, key):
        ref = normalize_uint8(batch["ref"]) if uses_ref else None
        scores, mutated = apply_in(model, dtype, params, batch_stats,
                                   normalize_uint8(batch["images"]), ref, train=True,
                                   mutable=["batch_stats"])
        per_head = head_losses(scores, batch["labels"], key, d.loss, lc.prior_size, lc.margin,
                               prior_mu=lc.prior_mu, prior_sigma=lc.prior_sigma)
        total = sum(per_head.values())
        metrics = {f"loss_{h}": v for h, v in per_head.items()}
        return total, (metrics, mutated.get("batch_stats", {}))

    def test_reference(variables):
        """[n_ref, H, W, 3] uint8: the fixed set, or a fresh pipelined draw from the pool
        with variables["key"] (test_reference="per_batch")."""
        extras = variables["extras"]
        if "ref_pool" not in extras:
            return extras["ref_images"]
        pool, outliers = extras["ref_pool"], extras["ref_outliers"]
        k_idx, k_pipe = jax.random.split(variables["key"])
        idx = jax.random.randint(k_idx, (d.n_ref,), 0, pool.shape[0])
        ref, _ = pipeline(k_pipe, pool[idx], outliers, outliers.shape[0])
        return ref

    def prepare_eval(variables):
        """The fixed reference set's per-scale mean maps, computed once per evaluation
        instead of in every test batch (per_batch references are drawn per batch)."""
        if not uses_ref or "ref_pool" in variables["extras"]:
            return variables
        ref = normalize_uint8(variables["extras"]["ref_images"])
        feats = trunk_features(config.model.backbone, variables, ref, config.model.n_scales,
                               dtype, depthwise_route(config), stem_route(config))
        return {**variables, "ref_means": [f.mean(0) for f in feats]}

    def score(variables, images):
        ref = ref_means = None
        if uses_ref:
            ref_means = variables.get("ref_means")
            if ref_means is None:
                ref = normalize_uint8(test_reference(variables))
        heads_out = apply_in(model, dtype, variables["params"], variables["batch_stats"],
                             images, ref, train=False, ref_means=ref_means)
        # each head's contribution to the anomaly score: normality enters negated
        parts = {h: -s if h == "normality" else s for h, s in heads_out.items()}
        return {"score": combine(heads_out), **parts}

    def optimizer(steps_per_epoch):
        return optimizer_from_config(config.optim, steps_per_epoch)

    return Method("dra", init, sample_batch, loss, score, optimizer, init_extras,
                  random_scores=uses_ref and d.test_reference == "per_batch",
                  reference=test_reference if uses_ref else None,
                  prepare_eval=jax.jit(prepare_eval))
