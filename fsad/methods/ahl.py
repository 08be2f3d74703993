"""AHL (Zhu et al., CVPR 2024): anomaly heterogeneity learning on a DRA or DevNet base.

Pipeline (spec §7), after the base model is trained and its trunk frozen:

1. Features: the trunk's maps at every pyramid scale for training normals,
   seen anomalies, three pseudo-anomaly families of every training normal
   (CutMix, CutPaste, Perlin-mask blends) and the test set: one *bank*.
2. HADG: k-means (C clusters) on normal features; one task per ordered pair of
   clusters (support normals from one, query normals from the other) plus one
   task on all normals split 50/50; seen anomalies split so that the query holds
   "virtual unseen" ones; each task turns about half of its normals into pseudo
   anomalies, support and query from two different families.
3. CDL: every epoch, T base models start from the unified head weights, take
   `inner_steps` SGD steps on their support set (differentiably: MAML second
   order, or first order by switch), are scored on their query set, and the
   unified heads take one Adam step on sum_i w_i L_i. The T tasks are one vmapped
   program over padded, masked index arrays, spread over the run's devices.
4. Importance: a BiLSTM psi predicts each sample's next-epoch scores under the T
   models from the previous K epochs; r_i weighs the squared error of the
   predicted (min-max scaled) scores against the labels, and w = softmax(-r).

The bank layout (rows): normals [0, Nn), seen anomalies [Nn, Nn+Na), then
family f's pseudo anomaly of normal k at Nn + Na + f * Nn + k.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P
from sklearn.cluster import KMeans

from fsad.data.augment import cutmix, cutpaste, perlin_blend
from fsad.errors import UserError
from fsad.hosts import is_primary, progress, put
from fsad.losses import deviation_loss, sample_prior
from fsad.memory import check_fits, free_bytes, gib, hint_on_oom, program_bytes
from fsad.methods.dra import DRAHeads, VARIANTS, combine, head_losses, head_weights
from fsad.models.backbone import trunk_features
from fsad.models.heads import TopKScorer
from fsad.models.resnet import normalize_uint8
from fsad.models.sequence import ScoreSequenceModel
from fsad.optim import optimizer_from_config
from fsad.precision import compute_dtype
from fsad.quick_compile import quick_jit
from fsad.train import (DATA_AXIS, checkpoint_manager, one_device_mesh, replicated,
                        restore_latest, save_checkpoint, score_images)

FAMILIES = ("cutmix", "cutpaste", "perlin")
NORMAL, SEEN, PSEUDO = 0, 1, 2


# ---------------------------------------------------------------- features

def n_scales_of(config) -> int:
    """Pyramid scales of the base model (both bases run the released two-scale pyramid)."""
    return config.model.n_scales


def make_feature_fn(config):
    """Jitted (variables, images uint8 [B,H,W,3]) -> {"s0": [B,h,w,C], "s1": ...}: the
    frozen trunk's float32 maps at every pyramid scale."""
    dtype = compute_dtype(config.model.get("dtype", "auto"))

    def features(variables, images):
        maps = trunk_features(config.model.backbone, variables, normalize_uint8(images),
                              n_scales_of(config), dtype)
        return {f"s{i}": m for i, m in enumerate(maps)}

    return jax.jit(features)


def other_indices(key: jax.Array, n: int) -> np.ndarray:
    """For each of n images a uniformly drawn other one: i + U{1, n - 1} (mod n), the
    image itself only when it is alone. -> [n] int."""
    return (np.arange(n) + np.asarray(jax.random.randint(key, (n,), 1, max(n, 2)))) % n


def make_pseudo(key: jax.Array, normals: np.ndarray, family: str,
                textures: np.ndarray | None = None, chunk: int = 64) -> np.ndarray:
    """One pseudo anomaly of the given family per normal image. [N,H,W,3] uint8 -> same.

    CutMix pastes from another normal, never the image itself (the released AHL
    CutMix); the Perlin blend takes its texture from `textures` (a texture folder,
    any of its images) or, without one, from another normal.
    """
    n = len(normals)
    k_other, k_tex, k_aug = jax.random.split(key, 3)
    other = other_indices(k_other, n)
    if family == "perlin" and textures is not None and len(textures):
        sources = textures
        partner = np.asarray(jax.random.randint(k_tex, (n,), 0, len(textures)))
    else:
        sources, partner = normals, other
    fn = {"cutmix": jax.vmap(lambda k, a, b: cutmix(k, a, b)[0]),
          "cutpaste": jax.vmap(lambda k, a, b: cutpaste(k, a)[0]),
          "perlin": jax.vmap(lambda k, a, b: perlin_blend(k, a, b)[0])}[family]
    fn = jax.jit(fn)
    keys = jax.random.split(k_aug, n)
    out = []
    for s in range(0, n, chunk):
        # every chunk padded to `chunk` rows (repeats of its last): one compiled program
        # per family and image size, whatever the number of normals
        rows = np.minimum(np.arange(s, s + chunk), n - 1)
        out.append(np.asarray(fn(keys[rows], normals[rows], sources[partner[rows]]))[:n - s])
    return np.concatenate(out)


def build_bank(config, variables, normals, anomalies, test_images, mesh, key,
               textures=None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Features of the training bank and of the test set, per scale.

    Returns:
      (bank [scales] of [Nn + Na + 3 Nn, h, w, C], test [scales] of [Nt, h, w, C]).
    """
    fn = make_feature_fn(config)
    pseudo = [make_pseudo(jax.random.fold_in(key, f), normals, fam, textures)
              for f, fam in enumerate(FAMILIES)]
    images = np.concatenate([normals, anomalies, *pseudo])
    bs = config.eval_batch_size
    bank = score_images(fn, variables, images, mesh, bs, desc="AHL features")
    test = score_images(fn, variables, test_images, mesh, bs, desc="AHL test features")
    keys = sorted(bank)
    return [bank[k] for k in keys], [test[k] for k in keys]


# ---------------------------------------------------------------- HADG

@dataclasses.dataclass
class Tasks:
    """T tasks as padded index arrays into the bank.

    support_idx/support_lab/support_mask/support_weight: [T, S]; query_*: [T, Q]
    (labels 0/1/2, mask 0 on padding; weight: the class-balanced weight of each sample,
    0 on padding, summing to 1 per task, see `class_balance`). families: [T, 2]
    (support, query) family ids.
    pool_idx: [P] the samples the importance model tracks (every query sample);
    pool_lab: [P] {0, 1}; pool_coef: [T, P] c_j per model (0 where excluded:
    that model's own support normals).
    """

    support_idx: np.ndarray
    support_lab: np.ndarray
    support_mask: np.ndarray
    support_weight: np.ndarray
    query_idx: np.ndarray
    query_lab: np.ndarray
    query_mask: np.ndarray
    query_weight: np.ndarray
    families: np.ndarray
    pool_idx: np.ndarray
    pool_lab: np.ndarray
    pool_coef: np.ndarray

    @property
    def num_tasks(self) -> int:
        return len(self.support_idx)

    def device_arrays(self) -> dict:
        return {k: jnp.asarray(getattr(self, k)) for k in
                ("support_idx", "support_lab", "support_weight", "query_idx", "query_lab",
                 "query_weight")}


def _pad(rows: list[np.ndarray], fill: int = 0) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), fill, np.int32)
    mask = np.zeros((len(rows), width), np.float32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return out, mask


def _pad_float(rows: list[np.ndarray], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), np.float32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def cluster_normals(normal_flat: np.ndarray, n_clusters: int, seed: int,
                    min_size: int = 3) -> list[np.ndarray]:
    """k-means clusters of normal indices, clusters smaller than min_size dropped."""
    km = KMeans(n_clusters, random_state=seed, n_init=10).fit(normal_flat)
    clusters = [np.flatnonzero(km.labels_ == c) for c in range(n_clusters)]
    return [c for c in clusters if len(c) >= min_size]


CLUSTER_ON = ("auto", "features", "images")


def image_descriptors(images: np.ndarray, side: int = 16, chunk: int = 256) -> np.ndarray:
    """Area-downsampled pixels, the representation k-means falls back to.

    images: [N, H, W, 3] uint8 -> [N, side * side * 3] float32 in [0, 1].
    """
    out = []
    for s in range(0, len(images), chunk):
        x = jnp.asarray(images[s:s + chunk], jnp.float32) / 255.0
        small = jax.image.resize(x, (len(x), side, side, 3), "linear", antialias=True)
        out.append(np.asarray(small).reshape(len(x), -1))
    return np.concatenate(out)


def normal_clusters(normal_flat: np.ndarray, normals: np.ndarray, n_clusters: int, seed: int,
                    cluster_on: str = "auto") -> tuple[list[np.ndarray], dict]:
    """HADG step 1: k-means clusters of the normal images (kept clusters of 3 or more).

    cluster_on: "features" clusters the frozen trunk's flattened features (spec §7);
    "images" clusters downsampled pixels; "auto" clusters the features and falls back
    to the pixels, with a warning, when fewer than 2 clusters survive (a trunk that
    maps nearly every normal to all-zero features leaves one cluster).

    Args:
      normal_flat: [Nn, D] flattened features; normals: [Nn, H, W, 3] uint8 images.
    Returns:
      (clusters, info: feature_health's fields + "cluster_on": what was clustered).
    """
    if cluster_on not in CLUSTER_ON:
        raise UserError(f"ahl.cluster_on={cluster_on!r} is not a clustering input; use one "
                        f"of {', '.join(CLUSTER_ON)}")
    clusters = [] if cluster_on == "images" else cluster_normals(normal_flat, n_clusters, seed)
    info = {**feature_health(normal_flat, clusters), "cluster_on": "features"}
    if cluster_on == "images" or (cluster_on == "auto" and len(clusters) < 2):
        if cluster_on == "auto":
            logging.warning("AHL: k-means on the frozen features left %d cluster(s) of 3 or "
                            "more normals; clustering the downsampled images instead "
                            "(ahl.cluster_on=auto; recorded as cluster_on=images)", len(clusters))
        clusters = cluster_normals(image_descriptors(normals), n_clusters, seed)
        info["cluster_on"] = "images"
    return clusters, info


def feature_health(normal_flat: np.ndarray, clusters: list[np.ndarray],
                   dead_limit: float = 0.5, largest_limit: float = 0.9) -> dict:
    """How much the frozen trunk leaves for k-means to separate; warns when little.

    A base trunk can learn to map most normal images to all-zero features (ReLU
    after a strongly negative BN shift: a DevNet optimum, the normal score is 0).
    k-means then finds one giant cluster and a few outliers, and every HADG task
    is built around a handful of images.

    Args:
      normal_flat: [Nn, D] flattened normal features; clusters: the kept clusters.
    Returns:
      {"dead_normal_fraction": share of normals whose features are all zero,
       "largest_cluster_fraction": largest kept cluster / Nn}.
    """
    dead = float(np.mean(~np.any(normal_flat != 0, axis=1)))
    largest = max((len(c) for c in clusters), default=0) / max(len(normal_flat), 1)
    if dead > dead_limit or largest > largest_limit:
        logging.warning(
            "AHL: the frozen trunk gives %.0f%% of the normal images all-zero features and "
            "the largest k-means cluster holds %.0f%% of them, so the tasks differ little "
            "and AHL has little to learn from. Train the base model with a lower lr or "
            "weight decay, or use AHL on DRA, whose heads keep the features alive.",
            100 * dead, 100 * largest)
    return {"dead_normal_fraction": dead, "largest_cluster_fraction": largest}


# Each class's share of a task's loss, as the base method's balanced training batches
# give it (spec §7 step 5): DRA draws a third normal, a third pseudo, a third seen
# anomalies; DevNet half normal, half anomalies (the released AHL code sums a seen and a
# pseudo deviation loss over batches of a third each, so each anomaly kind weighs 1/4).
CLASS_SHARES = {"dra": {NORMAL: 1 / 3, PSEUDO: 1 / 3, SEEN: 1 / 3},
                "devnet": {NORMAL: 1 / 2, PSEUDO: 1 / 4, SEEN: 1 / 4}}


def class_balance(labels: np.ndarray, base: str) -> np.ndarray:
    """Per-sample weights that give each class present its base method's share.

    Args:
      labels: [N] in {0 normal, 1 seen, 2 pseudo}; base: "dra" or "devnet".
    Returns:
      [N] float32 summing to 1: class c's samples share CLASS_SHARES[base][c] equally
      (shares renormalised over the classes present; DevNet's anomaly half goes to
      whichever anomaly kinds are present).
    """
    shares = dict(CLASS_SHARES[base])
    present = {c for c in shares if np.any(labels == c)}
    if base == "devnet" and present & {SEEN, PSEUDO} != {SEEN, PSEUDO}:
        for c in present & {SEEN, PSEUDO}:
            shares[c] = 1 / 2
    total = sum(shares[c] for c in present)
    w = np.zeros(len(labels), np.float32)
    for c in present:
        members = labels == c
        w[members] = shares[c] / total / members.sum()
    return w


def build_tasks(clusters: list[np.ndarray], n_normal: int, n_anomaly: int, seed: int,
                pseudo_frac: float = 0.5, c_unseen: float = 1.0, c_other: float = 0.5,
                base: str = "dra") -> Tasks:
    """HADG tasks from normal clusters (spec §7).

    Args:
      clusters: lists of normal indices (bank rows [0, n_normal)).
      n_normal, n_anomaly: bank layout sizes.
      base: "dra" or "devnet", whose class balance the task losses keep.
    Raises:
      UserError: fewer than 2 usable clusters.
    """
    if len(clusters) < 2:
        raise UserError(f"k-means left {len(clusters)} cluster(s) with 3 or more normals and "
                        f"AHL needs 2; use more normal images, fewer clusters "
                        f"(--config.ahl.clusters) or --config.ahl.cluster_on=auto")
    rng = np.random.default_rng(seed)
    anomalies = np.arange(n_normal, n_normal + n_anomaly)
    normal_sets = [(clusters[i], clusters[j]) for i in range(len(clusters))
                   for j in range(len(clusters)) if i != j]
    perm = rng.permutation(n_normal)
    normal_sets.append((np.sort(perm[:n_normal // 2]), np.sort(perm[n_normal // 2:])))

    def with_pseudo(normals, family):
        flip = rng.uniform(size=len(normals)) < pseudo_frac
        idx = np.where(flip, n_normal + n_anomaly + family * n_normal + normals, normals)
        return idx, np.where(flip, PSEUDO, NORMAL)

    sup_rows, sup_labs, qry_rows, qry_labs, fams, support_normals = [], [], [], [], [], []
    for sup_n, qry_n in normal_sets:
        fam_s, fam_q = rng.choice(len(FAMILIES), 2, replace=False)
        a = rng.permutation(anomalies)
        if n_anomaly > 1:
            half = n_anomaly // 2
            sup_a = a[:half]
            qry_a = np.concatenate([sup_a[:2], a[half:]])  # 2 seen + the virtual unseen half
        else:
            sup_a = qry_a = a
        s_idx, s_lab = with_pseudo(sup_n, fam_s)
        q_idx, q_lab = with_pseudo(qry_n, fam_q)
        sup_rows.append(np.concatenate([s_idx, sup_a]))
        sup_labs.append(np.concatenate([s_lab, np.full(len(sup_a), SEEN)]))
        qry_rows.append(np.concatenate([q_idx, qry_a]))
        qry_labs.append(np.concatenate([q_lab, np.full(len(qry_a), SEEN)]))
        fams.append((fam_s, fam_q))
        support_normals.append(set(sup_n.tolist()))
    s_idx, s_mask = _pad(sup_rows)
    s_lab, _ = _pad(sup_labs)
    q_idx, q_mask = _pad(qry_rows)
    q_lab, _ = _pad(qry_labs)
    s_w = _pad_float([class_balance(lab, base) for lab in sup_labs], s_idx.shape[1])
    q_w = _pad_float([class_balance(lab, base) for lab in qry_labs], q_idx.shape[1])
    # the importance pool: every query sample; c_j per model
    pool = np.unique(np.concatenate(qry_rows))
    is_anom = pool >= n_normal
    pool_lab = is_anom.astype(np.int32)
    coef = np.zeros((len(normal_sets), len(pool)), np.float32)
    for i, rows in enumerate(sup_rows):
        in_support = np.isin(pool, rows)
        coef[i] = np.where(is_anom, np.where(in_support, c_other, c_unseen),
                           np.where(in_support, 0.0, c_other))
        coef[i, np.isin(pool, list(support_normals[i]))] = 0.0  # X_n,i excluded
    return Tasks(s_idx, s_lab, s_mask, s_w, q_idx, q_lab, q_mask, q_w, np.array(fams), pool,
                 pool_lab, coef)


# ---------------------------------------------------------------- heads on features

@dataclasses.dataclass(frozen=True)
class HeadModel:
    """The base method's heads as functions of bank features.

    apply_with(params, feats [scales] of [B,h,w,C], consts) -> {head: [B]}
    losses(head_scores, labels [B], weight [B], key) -> {head: scalar}, each the mean
      over the samples weighted by `weights`; `loss` is their sum
    weights(labels [B], weight [B]) -> {head: [B]} each sample's weight in that head's
      loss (its routing to the head times weight)
    score(head_scores) -> [B] anomaly score
    init(key, feats) -> fresh head params (PyTorch's default initialisation)
    consts: this seed's arrays that the heads read and do not learn (DRA: the residual
      head's BatchNorm statistics and the reference mean maps; None for DevNet). The
      compiled steps take them as arguments: closed over, they would be constants of
      the program, which would then differ from seed to seed and be compiled anew for
      each (the persistent compilation cache could not serve it).
    """

    apply_with: callable
    losses: callable
    weights: callable
    score: callable
    init: callable
    consts: object = None

    def apply(self, params, feats):
        """apply_with this seed's consts."""
        return self.apply_with(params, feats, self.consts)

    def loss(self, head_scores, labels, weight, key):
        """The sum of the heads' losses: scalar."""
        return sum(self.losses(head_scores, labels, weight, key).values())


HEAD_INITS = ("base", "fresh")


def fresh_batch_stats(batch_stats):
    """PyTorch's new BatchNorm buffers for a tree of Flax BN statistics: mean 0, var 1."""
    return flax.traverse_util.unflatten_dict({
        k: (jnp.ones_like(v) if k[-1] == "var" else jnp.zeros_like(v))
        for k, v in flax.traverse_util.flatten_dict(batch_stats).items()})


def dra_heads(config) -> DRAHeads:
    """The DRA heads that AHL meta-trains on bank features, as config's DRA builds them.
    On CPU the residual conv runs as slices and a matmul at every map size: XLA's CPU
    convolution made the second-order meta-step 5-7x slower (fsad/models/cpu_conv.py)."""
    return DRAHeads(config.model.topk, VARIANTS[config.dra.variant],
                    config.dra.residual_stride, config.dra.residual_padding, cpu_matmul=True,
                    topk_abs=config.model.topk_abs)


def head_model(config, base_variables, ref_means=None,
               fresh: bool = False) -> tuple[HeadModel, dict]:
    """Builds the base method's heads and their trained params (the initial theta_g).

    ref_means: DRA's reference mean maps per scale (from the test reference set).
    fresh: heads to be initialised afresh (ahl.head_init=fresh): the residual head's
    BatchNorm, which normalises its conv's output, then uses new statistics (mean 0, var
    1, as PyTorch's new BatchNorm) instead of those of the base model's trained conv.
    Both bases score every pyramid scale and average, as their base models do.
    """
    lc = config.loss
    if config.ahl.base == "dra":
        heads = dra_heads(config)
        bstats = base_variables.get("batch_stats", {}).get("heads", {})
        if fresh:
            bstats = fresh_batch_stats(bstats)

        def apply_with(params, feats, consts):
            # BN in the residual head in eval mode: the base model's statistics, or new
            # ones for fresh heads
            stats = consts["batch_stats"]
            v = {"params": params, "batch_stats": stats} if stats else {"params": params}
            return heads.apply(v, feats, consts["ref_means"], train=False)

        def losses(scores, labels, weight, key):
            return head_losses(scores, labels, key, config.dra.loss, lc.prior_size, lc.margin,
                               sample_weight=weight, prior_mu=lc.prior_mu,
                               prior_sigma=lc.prior_sigma)

        def init(key, feats):
            return heads.init(key, feats, ref_means)["params"]

        return (HeadModel(apply_with, losses, head_weights, combine, init,
                          {"batch_stats": bstats, "ref_means": ref_means}),
                base_variables["params"]["heads"])
    scorer = TopKScorer(config.model.topk, config.model.topk_abs)

    def apply_devnet(params, feats, consts):
        per_scale = [scorer.apply({"params": params}, f)[0] for f in feats]
        return {"score": jnp.mean(jnp.stack(per_scale), axis=0)}

    def losses_devnet(scores, labels, weight, key):
        prior = sample_prior(key, lc.prior_size, lc.prior_mu, lc.prior_sigma)
        return {"score": deviation_loss(scores["score"], labels > 0, prior, lc.margin, weight)}

    def init_devnet(key, feats):
        return scorer.init(key, feats[0])["params"]

    return (HeadModel(apply_devnet, losses_devnet, lambda labels, w: {"score": w},
                      lambda s: s["score"], init_devnet),
            base_variables["params"]["head"])


# ---------------------------------------------------------------- CDL

def make_meta_step(hm: HeadModel, tx, inner_steps: int, inner_lr: float, first_order: bool,
                   mesh=None, chunk: int = 0):
    """The jitted CDL epoch step.

    step(params, opt_state, bank [scales] of [M,h,w,C], tasks dict of [T, .],
         weights [T], pool_idx [P], key) ->
      (params, opt_state, {"loss", "task_losses" [T], "pool_scores" [T, P]})
    tasks holds support_/query_ idx, lab and weight (class-balanced, 0 on padding).
    The compiled program takes hm.consts as an argument (see HeadModel): every seed's
    step is the same program. `step.jitted` is that program, step's arguments then
    hm.consts (for ahead-of-time lowering: ``step.jitted.lower(..., key, hm.consts)``).
    task_loss and adapt (one task's pieces, for tests) read hm.consts too.

    mesh: the devices the T tasks are spread over (default: the first local device).
    Each device adapts its share of the tasks (`shard_map`; the tasks are padded to a
    multiple of the mesh's size with copies of the first ones at outer weight 0) and the
    outer gradient and loss are summed across devices. Inputs and outputs are replicated
    on the mesh. Every mesh gives the same task losses; the sum's order, and so the last
    bits of the update, depend on the mesh's size.

    chunk: 0 takes each task's support or query set in one pass, whose memory grows with
    the set (every task's samples, activations and their second-order graph at once: 12.6
    GiB for ELPV's 1,131 normals at 96 px with Lite0). N > 0 takes N samples of a set at a
    time (`chunked_sum`), each chunk's gradient recomputed in the backward pass rather
    than kept, so memory is bounded by the chunk and the result is the whole set's, up to
    the order of the sums.
    """
    if mesh is None:
        mesh = one_device_mesh()

    def whole_set_loss(params, bank, idx, lab, weight, key, consts):
        feats = [f[idx] for f in bank]
        return hm.loss(hm.apply_with(params, feats, consts), lab, weight, key)

    def set_loss_and_grad(params, bank, idx, lab, weight, key, consts, with_grad: bool):
        """A set's loss, or its gradient, in one pass or chunk by chunk: each head's
        weighted mean over the set is the sum over chunks of the chunk's mean times the
        chunk's share of the head's total weight (the prior draws are the same in every
        chunk: the same key)."""
        if not chunk or idx.shape[0] <= chunk:
            fn = jax.grad(whole_set_loss) if with_grad else whole_set_loss
            return fn(params, bank, idx, lab, weight, key, consts)
        totals = {h: jnp.sum(w) for h, w in hm.weights(lab, weight).items()}

        def chunk_loss(p, i, l, w):
            losses = hm.losses(hm.apply_with(p, [f[i] for f in bank], consts), l, w, key)
            shares = hm.weights(l, w)
            return sum(loss * jnp.sum(shares[h]) / jnp.where(totals[h] > 0, totals[h], 1.0)
                       for h, loss in losses.items())

        return chunked_sum(jax.grad(chunk_loss) if with_grad else chunk_loss, params,
                           (idx, lab, weight), chunk)

    def task_loss_with(params, bank, idx, lab, weight, key, consts):
        return set_loss_and_grad(params, bank, idx, lab, weight, key, consts, False)

    def adapt_with(params, bank, idx, lab, weight, key, consts):
        for k in range(inner_steps):
            g = set_loss_and_grad(params, bank, idx, lab, weight, jax.random.fold_in(key, k),
                                  consts, True)
            if first_order:
                g = jax.lax.stop_gradient(g)
            params = jax.tree.map(lambda p, gi: p - inner_lr * gi, params, g)
        return params

    def per_task(params_g, bank, task, key, consts):
        k_in, k_out = jax.random.split(key)
        theta = adapt_with(params_g, bank, task["support_idx"], task["support_lab"],
                           task["support_weight"], k_in, consts)
        q = task_loss_with(theta, bank, task["query_idx"], task["query_lab"],
                           task["query_weight"], k_out, consts)
        return q, theta

    def outer(params_g, bank, tasks, weights, keys, consts):
        losses, thetas = jax.vmap(per_task, in_axes=(None, None, 0, 0, None))(
            params_g, bank, tasks, keys, consts)
        return jnp.sum(weights * losses), (losses, thetas)

    def pool_scores_of(theta, bank, pool_idx, consts):
        """[P] scores of the pool under one adapted model, `chunk` samples at a time."""
        def score(i):
            return hm.score(hm.apply_with(theta, [f[i] for f in bank], consts))
        if not chunk or len(pool_idx) <= chunk:
            return score(pool_idx)
        return jax.lax.map(score, chunk_rows(pool_idx, chunk)).reshape(-1)[:len(pool_idx)]

    def on_device(params, bank, tasks, weights, keys, pool_idx, consts):
        """One device's share of the tasks -> the loss and outer gradient summed over the
        devices, every task's loss [Tp] and pool scores [Tp, P]."""
        (loss, (losses, thetas)), grads = jax.value_and_grad(outer, has_aux=True)(
            params, bank, tasks, weights, keys, consts)
        pool_scores = jax.vmap(lambda th: pool_scores_of(th, bank, pool_idx, consts))(
            jax.lax.stop_gradient(thetas))
        return (jax.lax.psum(loss, DATA_AXIS), jax.lax.psum(grads, DATA_AXIS),
                jax.lax.all_gather(losses, DATA_AXIS, tiled=True),
                jax.lax.all_gather(pool_scores, DATA_AXIS, tiled=True))

    # check_vma=False: `params` is the same on every device, and JAX's varying-axis
    # checks would make each inner step's gradient with respect to it a sum over the
    # devices, adapting every task on the tasks of the other devices too
    sharded = jax.shard_map(on_device, mesh=mesh, check_vma=False,
                            in_specs=(P(), P(), P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS), P(),
                                      P()),
                            out_specs=(P(), P(), P(), P()))

    @jax.jit
    def step_with(params, opt_state, bank, tasks, weights, pool_idx, key, consts):
        n = weights.shape[0]
        keys = jax.random.split(key, n)
        # padded to a multiple of the devices: copies of the first tasks, outer weight 0
        rows = np.arange(-(-n // mesh.size) * mesh.size) % n
        padded = [jax.tree.map(lambda a: a[rows], x) for x in (tasks, keys)]
        weights_p = jnp.where(jnp.arange(len(rows)) < n, weights[rows], 0.0)
        loss, grads, losses, pool_scores = sharded(params, bank, padded[0], weights_p,
                                                   padded[1], pool_idx, consts)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "task_losses": losses[:n],
                                   "pool_scores": pool_scores[:n]}

    def step(params, opt_state, bank, tasks, weights, pool_idx, key):
        return step_with(params, opt_state, bank, tasks, weights, pool_idx, key, hm.consts)

    step.jitted = step_with

    def task_loss(params, bank, idx, lab, weight, key):
        return task_loss_with(params, bank, idx, lab, weight, key, hm.consts)

    def adapt(params, bank, idx, lab, weight, key):
        return adapt_with(params, bank, idx, lab, weight, key, hm.consts)

    return step, task_loss, adapt


def chunk_rows(a: jax.Array, chunk: int) -> jax.Array:
    """[N] -> [ceil(N / chunk), chunk]: the rows of `chunk` samples, the last padded with
    zeros."""
    return jnp.pad(a, (0, -a.shape[0] % chunk)).reshape(-1, chunk)


def chunked_sum(fn, params, samples: tuple, chunk: int):
    """sum over chunks of fn(params, *chunk's samples): a pytree (a loss, or a gradient).

    samples: arrays [N] (indices, labels, weights) cut into chunks of `chunk`, the last
    one padded with zeros (weight 0: padding adds nothing). A `lax.scan` over the chunks
    whose body is rematerialised (`jax.checkpoint`): differentiated (the outer gradient
    of MAML through an inner gradient), each chunk is recomputed in the backward pass
    instead of being kept, so memory holds one chunk's activations at a time.
    """
    rows = [chunk_rows(a, chunk) for a in samples]
    body = jax.checkpoint(lambda p, xs: fn(p, *xs))
    first = jax.eval_shape(body, params, [r[0] for r in rows])
    zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), first)

    def add(total, xs):
        return jax.tree.map(jnp.add, total, body(params, xs)), None

    return jax.lax.scan(add, zero, rows)[0]


# ---------------------------------------------------------------- importance

def generalisation_errors(predicted: np.ndarray, labels: np.ndarray,
                          coef: np.ndarray) -> np.ndarray:
    """r_i = sum_j c_ij (s'_ji - y_j)^2 / |{j: c_ij > 0}| (spec §7).

    Args:
      predicted: [P, T] predicted scores of the T models; min-max scaled jointly to
        [0, 1] first (scores live on the deviation scale, labels in {0, 1}).
      labels: [P] {0, 1}; coef: [T, P] c_j per model (0 = excluded).
    Returns:
      r: [T] float64.
    """
    p = np.asarray(predicted, np.float64)
    p = (p - p.min()) / max(p.max() - p.min(), 1e-12)
    err = (p.T - labels[None].astype(np.float64)) ** 2  # [T, P]
    return (coef * err).sum(1) / np.maximum((coef > 0).sum(1), 1)


def importance_weights(predicted: np.ndarray, labels: np.ndarray, coef: np.ndarray,
                       temperature: float = 0.1, relative: bool = True) -> np.ndarray:
    """w = softmax(-(r / mean(r)) / temperature), r from `generalisation_errors`; with
    relative=False, softmax(-r / temperature) (temperature 1: the paper's Eq. 7).

    The paper's softmax(-r) on squared errors of [0, 1]-scaled scores leaves w within a
    few percent of 1/T whatever the tasks' quality (the r_i differ by ~0.01). Dividing
    r by its mean makes the weights scale-free: a model whose error is `temperature`
    (10% by default) above another's gets e^-1 of its weight.

    Returns:
      w: [T] float32, summing to 1.
    """
    r = generalisation_errors(predicted, labels, coef)
    if relative:
        r = r / max(float(r.mean()), 1e-12)
    z = -r / temperature
    e = np.exp(z - z.max())
    return (e / e.sum()).astype(np.float32)


def weight_spread(w) -> float:
    """max(w) / min(w): 1 means equal weights."""
    w = np.asarray(w, np.float64)
    return float(w.max() / max(w.min(), 1e-30))


def make_psi_fns(num_tasks: int, hidden: int, fc: int, lr: float):
    """(init(key, K) -> (params, opt_state), train_step, predict) for psi."""
    model = ScoreSequenceModel(num_tasks, hidden, fc)
    tx = optax.adam(lr)

    @functools.partial(quick_jit, static_argnums=1)  # called once
    def init(key, k):
        params = model.init(key, jnp.zeros((1, k, num_tasks)))["params"]
        return params, tx.init(params)

    @jax.jit
    def train_step(params, opt_state, seqs, targets):
        def loss_fn(p):
            return jnp.mean((model.apply({"params": p}, seqs) - targets) ** 2)
        loss, g = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def predict(params, seqs):
        return model.apply({"params": params}, seqs)

    return init, train_step, predict


@flax.struct.dataclass
class MetaState:
    """What a meta-training checkpoint keeps. history: [epochs, P, T] pool scores;
    weights: [T] for the next epoch; weights_log: [epochs, T] the weights each epoch
    used; losses: [epochs] its L_cdl."""

    epoch: jax.Array
    params: dict
    opt_state: tuple
    psi_params: dict
    psi_opt: tuple
    history: jax.Array
    weights: jax.Array
    weights_log: jax.Array
    losses: jax.Array


CHUNK_SIZES = (256, 64, 16)  # what ahl.chunk_size=0 tries where the whole sets do not fit


def fitted_meta_step(hm: HeadModel, tx, a, mesh, args: tuple):
    """The meta-step compiled for args (`make_meta_step`'s step.jitted arguments), checked
    against the free memory of the mesh's devices before its first call.

    a: config.ahl. chunk_size N > 0: N samples of a set at a time; 0: the whole sets where
    that program fits, else the largest of CHUNK_SIZES that does (logged). On several
    hosts 0 means the whole sets: each host would judge its own free memory, and hosts
    that compiled different programs would wait on each other's collectives for ever.
    Raises UserError when none fits, naming the memory it needs and what to lower.
    """
    devices = list(mesh.devices.flat)
    several_hosts = jax.process_count() > 1
    chunks = [a.chunk_size] if a.chunk_size else [0] if several_hosts else [0, *CHUNK_SIZES]
    fix = (f"lower --config.ahl.chunk_size (now {a.chunk_size})" if a.chunk_size else
           "set --config.ahl.chunk_size (e.g. 64: the same result in less memory)"
           if several_hosts else "lower --config.data.img_size")
    if not a.first_order:
        fix += " or train with first-order MAML (--config.ahl.first_order=True)"
    for n, chunk in enumerate(chunks):
        step, _, _ = make_meta_step(hm, tx, a.inner_steps, a.inner_lr, a.first_order, mesh,
                                    chunk)
        what = "AHL's meta-step" + (f" ({chunk} samples of a set at a time)" if chunk else
                                    " (whole task sets)")
        with hint_on_oom(f"compiling {what}", fix):
            compiled = step.jitted.lower(*args).compile()
        need, free = program_bytes(compiled), free_bytes(devices)
        if need is None or free is None or need <= free or n == len(chunks) - 1:
            check_fits(compiled, devices, what, fix)
            if chunk and not a.chunk_size:
                logging.warning("AHL: the meta-step on whole task sets does not fit the free "
                                "memory; it takes %d samples of a set at a time (%s, the "
                                "same result)", chunk, gib(need))
            return compiled


def meta_train(config, hm: HeadModel, params_g, bank, tasks: Tasks, key, workdir: str | None,
               stop_after: int | None = None, mesh=None) -> tuple[dict, dict]:
    """Runs CDL with importance weights for config.ahl.epochs epochs (resumable).

    stop_after: end after this epoch (checkpointed), as an interruption would.
    mesh: where the state, bank and tasks live, replicated, and the devices the meta-step
      spreads the tasks over (default: the first local device). Every epoch's inputs
      have the same placement, so the meta-step and psi's steps compile once: a fresh
      array (uncommitted) and a step's output (committed to the mesh) would otherwise be
      two programs.

    Returns:
      (unified head params, info: {"weights" [epochs, T] the weights each epoch used,
       "weight_spread" [epochs] max/min of those, "loss" [epochs], "epoch_seconds"}).
    """
    a = config.ahl
    T, K, E = tasks.num_tasks, a.history, a.epochs
    tx = optimizer_from_config(a.optim, 1)
    if mesh is None:
        mesh = one_device_mesh()
    psi_init, psi_train, psi_predict = make_psi_fns(T, a.psi_hidden, a.psi_fc, a.psi_lr)
    k_psi, k_meta = jax.random.split(key)
    psi_params, psi_opt = psi_init(k_psi, K)
    state = MetaState(jnp.int32(0), params_g, tx.init(params_g), psi_params, psi_opt,
                      jnp.zeros((E, len(tasks.pool_idx), T), jnp.float32),
                      jnp.full((T,), 1.0 / T, jnp.float32), jnp.zeros((E, T), jnp.float32),
                      jnp.zeros((E,), jnp.float32))
    on_mesh = functools.partial(put, sharding=replicated(mesh))
    state = on_mesh(state)  # restore_latest keeps these shardings
    mngr = checkpoint_manager(os.path.join(workdir, "ahl_checkpoints"), 2) if workdir else None
    if mngr is not None:
        state = restore_latest(mngr, state)
    # straight from the host arrays to the mesh (the bank is the largest input), not
    # through the default device first
    bank_dev = on_mesh(list(bank))
    task_arrays = on_mesh(tasks.device_arrays())
    pool_idx = on_mesh(tasks.pool_idx)
    step = fitted_meta_step(hm, tx, a, mesh, (
        state.params, state.opt_state, bank_dev, task_arrays, state.weights, pool_idx,
        jax.random.fold_in(k_meta, 0), hm.consts))
    times = []
    with progress(total=E, initial=int(state.epoch), desc="AHL meta-training",
                  unit="epoch") as bar:
        for epoch in range(int(state.epoch), min(E, stop_after or E)):
            t0 = time.time()
            w = state.weights
            qw = 0.5 + 0.5 * w if a.weighting == "released" else w
            params, opt_state, out = step(state.params, state.opt_state, bank_dev, task_arrays,
                                          qw, pool_idx, jax.random.fold_in(k_meta, epoch),
                                          hm.consts)
            loss = float(out["loss"])
            if not np.isfinite(loss):
                raise UserError(f"AHL meta-training diverged: the loss became {loss} at epoch "
                                f"{epoch + 1}; lower --config.ahl.optim.lr or "
                                f"--config.ahl.inner_lr")
            history = state.history.at[epoch].set(out["pool_scores"].T)
            psi_params, psi_opt, w_next = state.psi_params, state.psi_opt, w
            if epoch + 1 > K:  # a (K epochs -> next epoch) pair exists: train psi, predict
                # psi learns online: the newest window each epoch (fixed shapes, one compile)
                seqs = history[epoch - K:epoch].transpose(1, 0, 2)  # [P, K, T]
                targets = history[epoch]  # [P, T]
                for _ in range(a.psi_steps):
                    psi_params, psi_opt, _ = psi_train(psi_params, psi_opt, seqs, targets)
                pred = psi_predict(psi_params, history[epoch + 1 - K:epoch + 1].transpose(1, 0, 2))
                w_next = jnp.asarray(importance_weights(np.asarray(pred), tasks.pool_lab,
                                                        tasks.pool_coef, a.weight_temperature,
                                                        a.weight_relative))
            state = on_mesh(MetaState(jnp.int32(epoch + 1), params, opt_state, psi_params,
                                      psi_opt, history, w_next,
                                      state.weights_log.at[epoch].set(w),
                                      state.losses.at[epoch].set(loss)))
            times.append(time.time() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if mngr is not None:
                save_checkpoint(mngr, epoch + 1, state)
    if mngr is not None:
        mngr.close()
    done = int(state.epoch)
    weights = np.asarray(state.weights_log)[:done]
    return state.params, {"weights": weights.tolist(),
                          "weight_spread": [weight_spread(w) for w in weights],
                          "loss": np.asarray(state.losses)[:done].tolist(),
                          "epoch_seconds": float(np.median(times)) if times else None}


# ---------------------------------------------------------------- the whole stage

def load_or_build_bank(config, base_variables, normals, anomalies, test_images, mesh, key,
                       workdir: str, textures=None):
    """`build_bank`, cached in workdir/ahl_features.npz (written atomically, by the
    primary process of a multi-host run)."""
    cache = os.path.join(workdir, "ahl_features.npz")
    if os.path.exists(cache):
        with np.load(cache) as f:
            n = int(f["n_scales"])
            return [f[f"bank{i}"] for i in range(n)], [f[f"test{i}"] for i in range(n)]
    bank, test = build_bank(config, base_variables, normals, anomalies, test_images, mesh,
                            key, textures)
    if is_primary():
        tmp = cache + ".tmp.npz"
        np.savez(tmp, n_scales=len(bank), **{f"bank{i}": b for i, b in enumerate(bank)},
                 **{f"test{i}": t for i, t in enumerate(test)})
        os.replace(tmp, cache)
    return bank, test


def reference_means(config, method, base_variables, seed: int):
    """DRA's reference mean maps per scale, from the base model's test reference set
    (the fixed set; with test_reference=per_batch one seeded draw from its pool), or
    None for a base without a residual head."""
    if method.reference is None:
        return None
    ref = jax.jit(method.reference)({**base_variables, "key": jax.random.key(seed + 30_000)})
    feats = make_feature_fn(config)(base_variables, ref)
    return [feats[k].mean(0) for k in sorted(feats)]


def head_models(config, method, base_variables, seed: int) -> tuple[HeadModel, HeadModel,
                                                                    dict]:
    """(the head model the unified heads are meta-trained and scored with: the base
    heads', or fresh heads' per ahl.head_init; the base heads' model; their trained
    params), on this seed's reference means. Training (`run_ahl`) and scoring new images
    (`score_unified`) both build them here, so they cannot differ."""
    refs = reference_means(config, method, base_variables, seed)
    base_hm, base_params = head_model(config, base_variables, refs)
    hm = base_hm if config.ahl.head_init == "base" else \
        head_model(config, base_variables, refs, fresh=True)[0]
    return hm, base_hm, base_params


def make_head_scorer(base_hm: HeadModel, batch_size: int):
    """-> scores_of(head model, head params, feats [scales] of [N,h,w,C]) -> [N] anomaly
    scores, in batches. One compiled function serves the base and the unified heads:
    fresh heads differ from the base heads only in their consts (new BatchNorm
    statistics), which are its argument."""
    fn = jax.jit(lambda p, feats, consts: base_hm.score(base_hm.apply_with(p, feats, consts)))

    def scores_of(hm: HeadModel, params, feats) -> np.ndarray:
        return np.concatenate([np.asarray(fn(params, [f[s:s + batch_size] for f in feats],
                                             hm.consts))
                               for s in range(0, len(feats[0]), batch_size)])
    return scores_of


def unified_heads_of(config, seed_dir: str) -> dict:
    """The unified head params a finished meta-training left in seed_dir/ahl_checkpoints
    (its newest checkpoint, restored in the structure it was saved with)."""
    folder, state = os.path.join(seed_dir, "ahl_checkpoints"), None
    if os.path.isdir(folder):
        mngr = checkpoint_manager(folder, 2)
        state = restore_latest(mngr)  # the newest readable one
        mngr.close()
    done = int(state["epoch"]) if state is not None else 0
    if done < config.ahl.epochs:
        where = f"it stopped after meta-epoch {done}" if done else "it has no checkpoint"
        raise UserError(f"AHL's meta-training in {seed_dir} is not finished ({where} of "
                        f"{config.ahl.epochs}); finish it with --mode train and the same "
                        f"config, then score")
    return state["params"]


def score_unified(config, method, base_variables, images: np.ndarray, mesh,
                  seed_dir: str, seed: int) -> np.ndarray:
    """New images scored as the AHL evaluation scores its test set: the trained base
    trunk's features, then the unified heads of seed_dir's finished meta-training.

    Args:
      method: the base model's `fsad.train.Method`; base_variables: its trained variables
        (after `method.prepare_eval`), as `ahl_stage` receives them.
      images: [N, H, W, 3] uint8.
    Returns:
      [N] anomaly scores.
    """
    params = unified_heads_of(config, seed_dir)
    hm, base_hm, _ = head_models(config, method, base_variables, seed)
    feats = score_images(make_feature_fn(config), base_variables, images, mesh,
                         config.eval_batch_size, desc="AHL features")
    return make_head_scorer(base_hm, config.eval_batch_size)(
        hm, params, [feats[k] for k in sorted(feats)])


def run_ahl(config, method, base_variables, normals, anomalies, test_images, mesh, seed: int,
            workdir: str, textures=None) -> dict:
    """Features (cached in workdir), HADG, CDL; returns test scores and AHL info.

    Args:
      method: the base model's `fsad.train.Method` (its test reference set for DRA).
    Returns:
      {"scores": [Nt] unified-model anomaly scores, "base_scores": [Nt] the base heads'
       scores on the same features, "tasks": T, "families": ..., "weights": ...}.
    """
    a = config.ahl
    if a.head_init not in HEAD_INITS:
        raise UserError(f"ahl.head_init={a.head_init!r}; use base (start from the trained "
                        f"base heads) or fresh (PyTorch's default init, the released code)")
    t0 = time.time()
    key = jax.random.key(seed + 20_000)
    k_bank, k_meta, k_init = jax.random.split(key, 3)
    bank, test = load_or_build_bank(config, base_variables, normals, anomalies, test_images,
                                    mesh, k_bank, workdir, textures)
    t_feat = time.time() - t0
    n_normal, n_anomaly = len(normals), len(anomalies)
    flat = bank[0][:n_normal].reshape(n_normal, -1)
    clusters, health = normal_clusters(flat, normals, a.clusters, seed, a.cluster_on)
    tasks = build_tasks(clusters, n_normal, n_anomaly, seed, a.pseudo_frac, base=a.base)
    hm, base_hm, base_params = head_models(config, method, base_variables, seed)
    params_g = base_params if a.head_init == "base" else \
        quick_jit(hm.init)(k_init, [b[:1] for b in bank])
    params, info = meta_train(config, hm, params_g, bank, tasks, k_meta, workdir, mesh=mesh)
    scores_of = make_head_scorer(base_hm, config.eval_batch_size)
    logging.info("AHL: %d tasks, features %.1fs", tasks.num_tasks, t_feat)
    return {"scores": scores_of(hm, params, test),
            "base_scores": scores_of(base_hm, base_params, test),
            "tasks": tasks.num_tasks, "head_init": a.head_init,
            "cluster_sizes": [len(c) for c in clusters], **health,
            "families": [[FAMILIES[i] for i in f] for f in tasks.families.tolist()],
            "feature_seconds": t_feat, **info, "ahl_seconds": time.time() - t0}


def ahl_stage(runner, data, split, variables, scores: dict, metrics: dict, seed: int,
              seed_dir: str) -> tuple[dict, dict]:
    """AHL as its method's stage after base training (fsad.experiment.run_seed): meta-train
    the unified heads on the frozen base trunk, then report AHL's test metrics beside the
    base model's.

    Returns:
      (scores {"score": AHL's [Nt], "base_score": the base model's [Nt]}, metrics with
       AHL's auroc/aupr, base_auroc/base_aupr, base_auroc_same_features, pixel metrics of
       the base network, and "ahl": the stage's record).
    """
    from fsad.data.decode import load_image_folder
    from fsad.evaluate import image_metrics
    config = runner.config
    textures = load_image_folder(config.ahl.texture_root, config.data.img_size)
    info = run_ahl(config, runner.method, variables, data.images[split.train_normal],
                   data.images[split.train_anomaly], data.images[split.test], runner.mesh,
                   seed, seed_dir, textures)
    labels = data.labels[split.test]
    same = image_metrics(labels, info.pop("base_scores"))
    new_scores = {"score": info.pop("scores"), "base_score": scores["score"]}
    new_metrics = {**image_metrics(labels, new_scores["score"]),
                   **{f"base_{k}": v for k, v in metrics.items() if k in ("auroc", "aupr")},
                   "base_auroc_same_features": same["auroc"],
                   **{k: v for k, v in metrics.items() if k.startswith("pixel_")},
                   "ahl": info}
    return new_scores, new_metrics
