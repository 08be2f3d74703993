"""Prior sampling, deviation loss and top-K multiple-instance scoring (spec §3-§4).

Every function here is a plain function of arrays, usable in any JAX training
loop without the rest of fsad::

    from fsad.losses import sample_prior, deviation_loss, topk_mean
    ref = sample_prior(key)                       # [5000]
    loss = deviation_loss(scores, labels, ref)    # scalar
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

PRIOR_SIZE = 5000
MARGIN = 5.0


def sample_prior(key: jax.Array, num: int = PRIOR_SIZE, mu: float = 0.0,
                 sigma: float = 1.0, dims: int | None = None) -> jax.Array:
    """Draws the Gaussian reference scores r_1..r_l of DevNet (Eq. 4).

    Args:
      key: PRNG key; a fresh key every step gives fresh prior samples.
      num: l, the number of samples (5000 in the papers).
      mu, sigma: parameters of the prior N(mu, sigma^2).
      dims: None for scalar scores; d for a multivariate prior N(mu, sigma^2 I_d)
        (DevNet's Rep ablation, which puts the loss on a d-dim representation).
    Returns:
      r: [num] float32, or [num, dims].

    Raises:
      ValueError: num < 2 (the deviation takes the samples' std, with ddof=1), or a
        sigma given as a number that is not above 0 (the loss was NaN).
    """
    if num < 2:
        raise ValueError(f"sample_prior: num={num}; the deviation divides by the std of "
                         f"the samples (ddof=1), which needs at least 2 (5000 in the papers)")
    if isinstance(sigma, numbers.Real) and not sigma > 0:  # (NumPy's scalars too)
        raise ValueError(f"sample_prior: sigma={sigma}; the deviation divides by the std of "
                         f"the samples, which needs a sigma above 0 (1 in the papers)")
    shape = (num,) if dims is None else (num, dims)
    return mu + sigma * jax.random.normal(key, shape, jnp.float32)


def deviation(scores: jax.Array, prior: jax.Array) -> jax.Array:
    """Z-score of anomaly scores against the prior samples (Eq. 5).

    The standard deviation is the unbiased one (ddof=1), as `torch.std` in the
    released code.

    Args:
      scores: [B, ...] float, phi(x) ([B], or per patch [B, P], or against a
        multivariate prior a representation [B, d]).
      prior: [l] float reference samples, or [l, d] (each dimension its own mean
        and std).
    Returns:
      dev: scores' shape, float.
    """
    return (scores - jnp.mean(prior, axis=0)) / jnp.std(prior, axis=0, ddof=1)


def _labels_per_sample(fn: str, values: jax.Array, labels: jax.Array,
                       mask: jax.Array | None) -> jax.Array:
    """labels [B] as values' dtype, shaped [B, 1, ...] to broadcast over values [B, ...].

    Raises:
      ValueError: labels (or mask) are not [B], one per sample: [B, 1] labels would
        broadcast against [B] scores to a [B, B] loss, silently.
    """
    for name, a in (("labels", labels), ("mask", mask)):
        if a is not None and a.shape != values.shape[:1]:
            raise ValueError(f"{fn}: {name} of shape {tuple(a.shape)} for scores of shape "
                             f"{tuple(values.shape)}; give one per sample, shape "
                             f"({values.shape[0]},) (e.g. {name}.reshape(-1))")
    return labels.astype(values.dtype).reshape(labels.shape + (1,) * (values.ndim - 1))


def _per_sample_mean(values: jax.Array) -> jax.Array:
    """[B, ...] -> [B]: each sample's mean over its trailing axes."""
    return values.reshape(values.shape[0], -1).mean(axis=1)


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of values weighted by mask ({0, 1}, or any weights >= 0); 0 when all weights
    are 0. (Dividing by max(sum, 1) would shrink a mean whose weights sum below 1, as
    AHL's class-balanced weights routed to one head do.)"""
    if mask is None:
        return jnp.mean(values)
    mask = mask.astype(values.dtype)
    total = jnp.sum(mask)
    return jnp.sum(values * mask) / jnp.where(total > 0, total, 1.0)


def deviation_loss(scores: jax.Array, labels: jax.Array, prior: jax.Array,
                   margin: float = MARGIN, mask: jax.Array | None = None) -> jax.Array:
    """Contrastive deviation loss (DevNet Eq. 8).

    loss = (1 - y) |dev| + y max(0, a - dev), averaged over the batch.

    Args:
      scores: [B] float anomaly scores; or [B, ...] (DevNet's Patch-DS ablation: every
        patch of an image with the image's label; Rep: a representation against a
        [l, d] prior), each sample's loss the mean over its trailing axes.
      labels: [B] {0, 1}; 1 marks an anomaly (the values are not checked: other values
        weigh the two terms, e.g. DRA's pseudo label 2; map them to {0, 1} first).
      prior: [l] (or [l, d]) reference samples from `sample_prior`.
      margin: a, the confidence margin (5 in the papers).
      mask: optional [B] {0, 1}; samples with 0 do not count (padding, routing).
    Returns:
      scalar float32.

    Raises:
      ValueError: labels or mask not [B].
    """
    y = _labels_per_sample("deviation_loss", scores, labels, mask)
    dev = deviation(scores, prior)
    per_cell = (1.0 - y) * jnp.abs(dev) + y * jnp.maximum(margin - dev, 0.0)
    return _masked_mean(_per_sample_mean(per_cell), mask)


def binary_cross_entropy(logits: jax.Array, labels: jax.Array,
                         mask: jax.Array | None = None) -> jax.Array:
    """Sigmoid BCE on raw scores (DRA ablation loss). Shapes as `deviation_loss`:
    logits [B] or [B, ...], labels and mask [B]."""
    y = _labels_per_sample("binary_cross_entropy", logits, labels, mask)
    # softplus, not max(x,0)+log1p(exp(-|x|)): the latter has a zero gradient at x = 0
    per_cell = jax.nn.softplus(logits) - logits * y
    return _masked_mean(_per_sample_mean(per_cell), mask)


def focal_loss(logits: jax.Array, labels: jax.Array, gamma: float = 2.0,
               mask: jax.Array | None = None) -> jax.Array:
    """Sigmoid focal loss (Lin et al.) on raw scores. Shapes as `binary_cross_entropy`."""
    y = _labels_per_sample("focal_loss", logits, labels, mask)
    bce = jax.nn.softplus(logits) - logits * y
    p = jax.nn.sigmoid(logits)
    p_t = y * p + (1 - y) * (1 - p)
    return _masked_mean(_per_sample_mean((1 - p_t) ** gamma * bce), mask)


def topk_count(num_cells: int, fraction: float = 0.1) -> int:
    """K = max(1, floor(fraction * h'w')) (DevNet Eq. 6), as the released code computes
    it, `int(n * topk)` on Python floats: one short of the exact product where its float
    rounds below an integer (0.29 of 100 cells: 28.999999999999996, so 28), never at the
    defaults (0.1, or any fraction of whole per cent on 7x7 or 14x14 maps).

    fraction: a Python float in (0, 1], fixed when a function is traced (under jax.jit,
    a static argument: `jax.jit(topk_mean, static_argnums=1)`).

    Raises:
      TypeError: fraction is a traced value; ValueError: it is not in (0, 1].
    """
    if isinstance(fraction, jax.core.Tracer):
        raise TypeError("topk fraction is traced; K must be known when the function is "
                        "traced: make it static (jax.jit(topk_mean, static_argnums=1)) or "
                        "close over it")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"topk fraction={fraction} is not in (0, 1]; e.g. 0.1 takes the "
                         f"top 10% of the cells")
    return max(1, int(num_cells * fraction))


def topk_mean(score_map: jax.Array, fraction: float = 0.1, use_abs: bool = True) -> jax.Array:
    """Top-K multiple-instance image score (DevNet Eq. 6).

    Args:
      score_map: [B, H, W] (or [B, H, W, 1]) per-cell scores s.
      fraction: K as a fraction of the H*W cells: a Python float in (0, 1]
        (`topk_count`; static under jax.jit).
      use_abs: rank and average |s| as the released code does (default);
        False uses s as in the paper formula.
    Returns:
      scores: [B] float.
    Raises:
      ValueError: a map of another rank, or of several channels (one image's [H, W] map
        gave H scores, one per row).
    """
    if not (score_map.ndim == 3 or score_map.ndim == 4 and score_map.shape[-1] == 1):
        raise ValueError(f"topk_mean takes [B, H, W] (or [B, H, W, 1]) score maps, one score "
                         f"per cell, not shape {tuple(score_map.shape)}; one image's [H, W] "
                         f"map is score_map[None], and cells flattened to [B, N] are "
                         f"score_map[:, :, None]")
    flat = score_map.reshape(score_map.shape[0], -1)
    if use_abs:
        flat = jnp.abs(flat)
    k = topk_count(flat.shape[1], fraction)
    top, _ = jax.lax.top_k(flat, k)
    return jnp.mean(top, axis=1)


def gaussian_p_value(scores: jax.Array, mu: float = 0.0, sigma: float = 1.0) -> jax.Array:
    """One-sided p-value 1 - Phi((score - mu) / sigma) under the prior (Proposition 1).

    Args:
      scores: [B] float.
    Returns:
      p: [B] float in [0, 1].
    """
    z = (scores - mu) / sigma
    return 0.5 * jax.scipy.special.erfc(z / jnp.sqrt(2.0))
