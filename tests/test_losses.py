import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fsad import losses


def test_prior_shape_and_moments():
    r = losses.sample_prior(jax.random.key(0))
    assert r.shape == (5000,)
    assert abs(float(r.mean())) < 0.05 and abs(float(r.std()) - 1) < 0.05
    r2 = losses.sample_prior(jax.random.key(0), 100, mu=3.0, sigma=0.5)
    assert abs(float(r2.mean()) - 3.0) < 0.2 and abs(float(r2.std()) - 0.5) < 0.1
    assert not np.allclose(r, losses.sample_prior(jax.random.key(1)))


def test_deviation_loss_hand_computed():
    prior = jnp.array([-1.0, 0.0, 1.0])  # mean 0, unbiased std 1
    scores = jnp.array([0.5, -2.0, 3.0, 6.0])
    labels = jnp.array([0, 0, 1, 1])
    # normals: |0.5|, |-2| ; anomalies: max(0, 5-3)=2, max(0, 5-6)=0
    expected = (0.5 + 2.0 + 2.0 + 0.0) / 4
    assert float(losses.deviation_loss(scores, labels, prior)) == pytest.approx(expected)
    mask = jnp.array([1, 0, 1, 0])
    assert float(losses.deviation_loss(scores, labels, prior, mask=mask)) == pytest.approx(1.25)


def _np_dev_loss(scores, labels, prior, margin=5.0):
    dev = (scores - prior.mean()) / prior.std(ddof=1)
    return np.mean((1 - labels) * np.abs(dev) + labels * np.maximum(margin - dev, 0))


def test_deviation_loss_matches_numpy_and_gradient():
    rng = np.random.default_rng(0)
    prior = rng.normal(size=5000)
    scores = rng.normal(size=16) * 3
    labels = (rng.uniform(size=16) < 0.5).astype(np.float64)
    got = losses.deviation_loss(jnp.asarray(scores), jnp.asarray(labels), jnp.asarray(prior))
    assert float(got) == pytest.approx(_np_dev_loss(scores, labels, prior), rel=1e-5)
    grad = jax.grad(losses.deviation_loss)(jnp.asarray(scores, jnp.float32),
                                           jnp.asarray(labels), jnp.asarray(prior, jnp.float32))
    dev = (scores - prior.mean()) / prior.std(ddof=1)
    sd = prior.std(ddof=1)
    ref = np.where(labels == 1, -(dev < 5.0).astype(float), np.sign(dev)) / sd / len(scores)
    np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("use_abs", [True, False])
def test_topk_mean_matches_numpy(use_abs):
    rng = np.random.default_rng(1)
    smap = rng.normal(size=(4, 7, 7)).astype(np.float32)
    k = max(1, int(49 * 0.1))
    assert losses.topk_count(49, 0.1) == 4 == k
    flat = smap.reshape(4, -1)
    vals = np.abs(flat) if use_abs else flat
    ref = np.sort(vals, axis=1)[:, -k:].mean(axis=1)
    np.testing.assert_allclose(losses.topk_mean(jnp.asarray(smap), 0.1, use_abs), ref, rtol=1e-6)


def test_topk_gradient_flows_only_to_top_cells():
    smap = jnp.arange(16.0).reshape(1, 4, 4) - 10.5  # |s| largest: -10.5, -9.5; then 4.5
    g = jax.grad(lambda s: losses.topk_mean(s, 0.125).sum())(smap)  # K = 2
    assert int(np.sum(np.asarray(g) != 0)) == 2
    assert float(g[0, 0, 0]) == pytest.approx(-0.5) and float(g[0, 0, 1]) == pytest.approx(-0.5)
    g_raw = jax.grad(lambda s: losses.topk_mean(s, 0.125, use_abs=False).sum())(smap)
    assert float(g_raw[0, 3, 3]) == pytest.approx(0.5) and float(g_raw[0, 3, 2]) == 0.5


def test_topk_count_small_maps():
    assert losses.topk_count(1) == 1 and losses.topk_count(9) == 1 and losses.topk_count(196) == 19
    # the released int(n * topk) where the float product falls just below an integer
    # (fsad took floor(n * topk + 1e-9) = 29 before: a review's finding)
    assert 100 * 0.29 < 29 and losses.topk_count(100, 0.29) == 28


def test_p_value_matches_scipy():
    s = np.array([-1.0, 0.0, 1.96, 4.0])
    np.testing.assert_allclose(losses.gaussian_p_value(jnp.asarray(s)), stats.norm.sf(s),
                               rtol=1e-5, atol=1e-7)


def test_bce_and_focal_match_reference():
    x = jnp.array([-3.0, 0.0, 2.0])
    y = jnp.array([0, 1, 1])
    p = 1 / (1 + np.exp(-np.asarray(x)))
    bce = -(np.asarray(y) * np.log(p) + (1 - np.asarray(y)) * np.log(1 - p))
    assert float(losses.binary_cross_entropy(x, y)) == pytest.approx(bce.mean(), rel=1e-5)
    pt = np.where(np.asarray(y) == 1, p, 1 - p)
    assert float(losses.focal_loss(x, y)) == pytest.approx(((1 - pt) ** 2 * bce).mean(), rel=1e-5)


def test_wrong_shapes_and_values_are_refused_not_broadcast():
    """[B, 1] labels against [B] scores broadcast to a [B, B] loss, silently, before; a
    [B, 1] score map (a Dense(1) head) takes [B] labels, as [B] scores do. A prior of one
    sample has no std, and a top-K fraction must be known when tracing, in (0, 1]."""
    key = jax.random.key(0)
    scores = jax.random.normal(key, (8,))
    labels = jnp.array([0, 0, 0, 0, 0, 0, 1, 1])
    prior = losses.sample_prior(key, 100)
    loss = losses.deviation_loss(scores, labels, prior)
    np.testing.assert_allclose(losses.deviation_loss(scores[:, None], labels, prior), loss,
                               rtol=1e-6)
    for fn, args in ((losses.deviation_loss, (prior,)), (losses.binary_cross_entropy, ()),
                     (losses.focal_loss, ())):
        with pytest.raises(ValueError, match=r"labels of shape \(8, 1\) .* shape \(8,\)"):
            fn(scores, labels[:, None], *args)
        with pytest.raises(ValueError, match=r"mask of shape \(4,\)"):
            fn(scores, labels, *args, mask=jnp.ones(4))
        np.testing.assert_allclose(fn(scores[:, None], labels, *args),
                                   fn(scores, labels, *args), rtol=1e-6)
    with pytest.raises(ValueError, match="needs at least 2"):
        losses.sample_prior(key, 1)
    for sigma in (0.0, -1.0, np.float32(0.0)):  # the deviation loss was NaN
        with pytest.raises(ValueError, match=f"sigma={sigma}; .* needs a sigma above 0"):
            losses.sample_prior(key, 10, sigma=sigma)
    maps = jnp.ones((2, 4, 4))
    for bad in (0.0, -1.0, 2.0):
        with pytest.raises(ValueError, match=f"fraction={bad} is not in"):
            losses.topk_mean(maps, bad)
    for shape in ((4, 4), (2, 4, 4, 3), (2, 1, 4, 4, 1)):  # (4, 4) gave 4 row scores
        with pytest.raises(ValueError, match=rf"not shape \({shape[0]}, .*score_map\[None\]"):
            losses.topk_mean(jnp.ones(shape))
    np.testing.assert_allclose(losses.topk_mean(maps[..., None]), losses.topk_mean(maps))
    with pytest.raises(TypeError, match="static_argnums=1"):
        jax.jit(losses.topk_mean)(maps, 0.1)
    np.testing.assert_allclose(jax.jit(losses.topk_mean, static_argnums=1)(maps, 0.1), 1.0)
