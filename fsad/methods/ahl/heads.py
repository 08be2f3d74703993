"""The base method's heads as functions of bank features (`HeadModel`): what AHL's
meta-step adapts and its unified model scores with, for a DRA or a DevNet base."""

from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from fsad.losses import deviation_loss, sample_prior
from fsad.mesh import padded_batches
from fsad.methods.ahl.bank import make_feature_fn
from fsad.methods.dra import DRAHeads, VARIANTS, combine, head_losses, head_weights
from fsad.models.heads import TopKScorer

@dataclasses.dataclass(frozen=True)
class HeadModel:
    """The base method's heads as functions of bank features.

    apply_with(params, feats [scales] of [B,h,w,C], consts) -> {head: [B]}
    losses(head_scores, labels [B], weight [B], key) -> {head: scalar}, each the mean
      over the samples weighted by `weights`; `loss` is their sum
    weights(labels [B], weight [B]) -> {head: [B]} each sample's weight in that head's
      loss (its routing to the head times weight)
    score(head_scores) -> [B] anomaly score
    init_with(key, feats, consts) -> fresh head params (PyTorch's default
      initialisation); `init(key, feats)` reads this seed's consts
    consts: this seed's arrays that the heads read and do not learn (DRA: the residual
      head's BatchNorm statistics and the reference mean maps; None for DevNet). The
      compiled steps take them as arguments: closed over, they would be constants of
      the program, which would then differ from seed to seed and be compiled anew for
      each (the persistent compilation cache could not serve it).

    The functions are made once per process for the config values they read
    (`head_model`): the head models of every seed, and of settings that agree on those
    values, hold the same function objects, so the jitted programs built on them
    (`fsad.methods.ahl.meta_step`'s `meta_step_program`, `make_head_scorer`) are traced
    once per process and input shapes, not per seed.
    """

    apply_with: callable
    losses: callable
    weights: callable
    score: callable
    init_with: callable
    consts: object = None

    def apply(self, params, feats):
        """apply_with this seed's consts."""
        return self.apply_with(params, feats, self.consts)

    def init(self, key, feats):
        """init_with this seed's consts."""
        return self.init_with(key, feats, self.consts)

    @property
    def fns(self) -> tuple:
        """(apply_with, losses, weights, score): what a compiled program of these heads
        reads besides its arguments; hashable, a key of the programs made once."""
        return self.apply_with, self.losses, self.weights, self.score

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
    prior = (lc.prior_size, lc.margin, lc.prior_mu, lc.prior_sigma)
    if config.ahl.base == "dra":
        bstats = base_variables.get("batch_stats", {}).get("heads", {})
        if fresh:
            bstats = fresh_batch_stats(bstats)
        fns = _dra_head_fns(dra_heads(config), config.dra.loss, *prior)
        return (HeadModel(*fns, {"batch_stats": bstats, "ref_means": ref_means}),
                base_variables["params"]["heads"])
    fns = _devnet_head_fns(TopKScorer(config.model.topk, config.model.topk_abs), *prior)
    return HeadModel(*fns), base_variables["params"]["head"]


@functools.lru_cache(maxsize=None)
def _dra_head_fns(heads: DRAHeads, loss: str, prior_size: int, margin: float,
                  prior_mu: float, prior_sigma: float) -> tuple:
    """HeadModel's functions for a DRA base, made once per settings (a Flax module is
    a hashable dataclass of its fields)."""

    def apply_with(params, feats, consts):
        # BN in the residual head in eval mode: the base model's statistics, or new ones
        # for fresh heads
        stats = consts["batch_stats"]
        v = {"params": params, "batch_stats": stats} if stats else {"params": params}
        return heads.apply(v, feats, consts["ref_means"], train=False)

    def losses(scores, labels, weight, key):
        return head_losses(scores, labels, key, loss, prior_size, margin,
                           sample_weight=weight, prior_mu=prior_mu, prior_sigma=prior_sigma)

    def init_with(key, feats, consts):
        return heads.init(key, feats, consts["ref_means"])["params"]

    return apply_with, losses, head_weights, combine, init_with


@functools.lru_cache(maxsize=None)
def _devnet_head_fns(scorer: TopKScorer, prior_size: int, margin: float, prior_mu: float,
                     prior_sigma: float) -> tuple:
    """HeadModel's functions for a DevNet base, made once per settings."""

    def apply_with(params, feats, consts):
        per_scale = [scorer.apply({"params": params}, f)[0] for f in feats]
        return {"score": jnp.mean(jnp.stack(per_scale), axis=0)}

    def losses(scores, labels, weight, key):
        prior = sample_prior(key, prior_size, prior_mu, prior_sigma)
        return {"score": deviation_loss(scores["score"], labels > 0, prior, margin, weight)}

    def weights(labels, weight):
        return {"score": weight}

    def score(head_scores):
        return head_scores["score"]

    def init_with(key, feats, consts):
        return scorer.init(key, feats[0])["params"]

    return apply_with, losses, weights, score, init_with


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
    scores, in batches of one size, however few the rows (the last padded: one program,
    so an image scored alone gets its numbers among others). One compiled function
    serves the base and the unified heads: fresh heads differ from the base heads only in
    their consts (new BatchNorm statistics), which are its argument."""
    fn = _head_score_program(base_hm.apply_with, base_hm.score)

    def scores_of(hm: HeadModel, params, feats) -> np.ndarray:
        rows = np.arange(len(feats[0]))
        return np.concatenate([
            np.asarray(fn(params, [f[batch] for f in feats], hm.consts))[:n]
            for _, batch, n in padded_batches(rows, batch_size, "AHL scores")])
    return scores_of


@functools.lru_cache(maxsize=None)
def _head_score_program(apply_with, score):
    """jit of (params, feats, consts) -> [N] scores, made once per head functions (so
    traced once per process: `HeadModel`)."""
    return jax.jit(lambda p, feats, consts: score(apply_with(p, feats, consts)))
