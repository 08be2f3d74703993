"""DevNet's ablations (spec §5, DevNet-TPAMI Table 5) by `devnet.variant`: DS, Patch-DS
and Rep against slow references, and reachable from the config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fsad.errors import UserError
from fsad.losses import sample_prior
from fsad.methods import build_method
from fsad.methods.devnet import DevNetModel, devnet_loss
from fsad.models.resnet import normalize_uint8
from fsad.validate import check_config


def slow_deviation_loss(cells, labels, prior, margin=5.0):
    """Per image, the mean over its cells of (1 - y)|dev| + y max(0, a - dev), each
    dimension of a [l, d] prior with its own mean and std; then the batch mean."""
    prior = np.asarray(prior, np.float64)
    mu, sd = prior.mean(0), prior.std(0, ddof=1)
    per_image = []
    for row, y in zip(np.asarray(cells, np.float64), labels):
        losses = []
        for j, s in enumerate(row):
            m, d = (mu[j], sd[j]) if prior.ndim == 2 else (mu, sd)
            dev = (s - m) / d
            losses.append(abs(dev) if y == 0 else max(margin - dev, 0.0))
        per_image.append(np.mean(losses))
    return np.mean(per_image)


def test_ds_scores_the_mean_of_the_map_and_rep_has_no_score_layer():
    """DS (the released `--topk 0`): the mean of every cell's score, which top-K over all
    cells of s (not |s|) also gives; Rep: no 1x1 scorer, the pooled trunk map's mean."""
    x = jax.random.normal(jax.random.key(1), (3, 96, 96, 3))  # 3x3 and 2x2 maps
    ds = DevNetModel("resnet18", 0.1, True, 2, "DS")
    every_cell = DevNetModel("resnet18", 1.0, False, 2, "MIL-DS")
    variables = jax.jit(ds.init)(jax.random.key(0), x[:1])
    # a negative bias, so that some cells score below 0 (|s| and s then rank apart)
    variables["params"]["head"]["conv"]["bias"] = jnp.array([-0.3])

    out_ds, out_all = jax.jit(lambda v: (ds.apply(v, x), every_cell.apply(v, x)))(variables)
    np.testing.assert_allclose(out_ds["score"], out_all["score"], rtol=1e-5, atol=1e-6)
    cells = [np.asarray(c) for c in out_ds["cell_scores"]]
    assert [c.shape for c in cells] == [(3, 9), (3, 4)]
    np.testing.assert_allclose(out_ds["score"], (cells[0].mean(1) + cells[1].mean(1)) / 2,
                               rtol=1e-5)
    assert np.any(cells[0] < 0)
    # MIL-DS on the same maps: the largest |s| (K = 1 of 9 and of 4 cells), not the mean
    mil = (np.abs(cells[0]).max(1) + np.abs(cells[1]).max(1)) / 2
    assert np.all(np.abs(mil - np.asarray(out_ds["score"])) > 1e-3)

    rep = DevNetModel("resnet18", 0.1, True, 2, "Rep")
    params = jax.eval_shape(rep.init, jax.random.key(0), x[:1])["params"]
    assert "head" not in params and "backbone" in params
    out = jax.eval_shape(rep.apply, variables | {"params": params}, x)
    assert out["representation"].shape == (3, 512) and out["score"].shape == (3,)


def test_patch_ds_puts_the_loss_on_every_cell():
    key = jax.random.key(3)
    labels = np.array([0, 1, 0, 1])
    cells = [jax.random.normal(jax.random.key(4), (4, 9)) * 3,
             jax.random.normal(jax.random.key(5), (4, 4)) * 3]
    loss = devnet_loss({"cell_scores": cells, "score": None}, jnp.asarray(labels), key,
                       "Patch-DS", prior_size=500)
    prior = sample_prior(key, 500)
    want = np.mean([slow_deviation_loss(c, labels, prior) for c in cells])
    assert float(loss) == pytest.approx(want, rel=1e-5)
    # not the image-score loss of DS (the mean of each map first)
    score = (cells[0].mean(1) + cells[1].mean(1)) / 2
    ds = devnet_loss({"score": score}, jnp.asarray(labels), key, "DS", prior_size=500)
    assert abs(float(ds) - want) > 0.1


def test_rep_puts_the_loss_on_the_representation_against_a_multivariate_prior():
    key = jax.random.key(6)
    labels = np.array([1, 0, 0, 1, 0])
    rep = jax.random.uniform(jax.random.key(7), (5, 12), maxval=6.0)
    loss = devnet_loss({"representation": rep}, jnp.asarray(labels), key, "Rep",
                       prior_size=400, mu=0.5, sigma=2.0)
    prior = sample_prior(key, 400, 0.5, 2.0, dims=12)
    assert prior.shape == (400, 12)
    want = slow_deviation_loss(rep, labels, prior)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    grad = jax.grad(lambda r: devnet_loss({"representation": r}, jnp.asarray(labels), key,
                                          "Rep", prior_size=400))(rep)
    assert grad.shape == (5, 12) and np.all(np.isfinite(grad)) and np.any(grad != 0)


@pytest.mark.parametrize("variant", ["DS", "Patch-DS", "Rep"])
def test_the_variants_are_config_fields(variant):
    config = tiny_config("devnet", **{"devnet.variant": variant})
    check_config(config)
    method = build_method(config)
    images = jnp.zeros((4, 32, 32, 3), jnp.uint8)
    variables = jax.eval_shape(method.init, jax.random.key(0), images.astype(jnp.float32))
    batch = {"images": images, "labels": jnp.array([0, 1, 0, 1])}
    value, _ = jax.eval_shape(method.loss, variables["params"], variables["batch_stats"],
                              batch, jax.random.key(1))
    assert value.shape == ()
    assert ("head" in variables["params"]) == (variant != "Rep")


def test_the_config_variant_reaches_the_score_and_the_loss():
    """DS and Patch-DS add or drop no parameter, so a config that ignored devnet.variant
    would pass the test above: on one set of weights and one batch, DS scores the map's
    mean, not MIL-DS's top-K, Patch-DS scores as DS does (the mean at test), and the
    three losses differ (the image score's, the mean's, every cell's)."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (4, 32, 32, 3)), jnp.uint8)
    batch = {"images": images, "labels": jnp.array([0, 1, 0, 1])}
    methods = {v: build_method(tiny_config("devnet", **{"devnet.variant": v}))
               for v in ("MIL-DS", "DS", "Patch-DS")}
    variables = jax.jit(methods["MIL-DS"].init)(jax.random.key(0),
                                                images.astype(jnp.float32))
    x = normalize_uint8(images)
    score, loss = {}, {}
    for v, m in methods.items():
        score[v] = np.asarray(jax.jit(m.score)(variables, x)["score"])
        loss[v] = float(jax.jit(m.loss)(variables["params"], variables["batch_stats"], batch,
                                        jax.random.key(1))[0])
    np.testing.assert_allclose(score["Patch-DS"], score["DS"], rtol=1e-6)
    assert np.abs(score["DS"] - score["MIL-DS"]).min() > 1e-4, score
    assert len({round(v, 5) for v in loss.values()}) == 3, loss


def test_unknown_variants_and_ahl_on_an_ablation_are_refused():
    with pytest.raises(UserError, match="devnet.variant='MIL' is not a DevNet variant"):
        check_config(tiny_config("devnet", **{"devnet.variant": "MIL"}))
    with pytest.raises(UserError, match="use --config.devnet.variant=MIL-DS with AHL"):
        check_config(tiny_config("ahl_devnet", **{"devnet.variant": "Rep"}))
