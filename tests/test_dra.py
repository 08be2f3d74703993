"""DRA: head routing, pseudo anomalies, rotation, deterministic test scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SIZE, tiny_config
from fsad.data import augment
from fsad.mesh import make_mesh
from fsad.methods import build_method
from fsad.methods.dra import HEADS, combine, head_losses, head_routing
from fsad.train import init_state, make_score_fn, put_train_data, score_images


def dra_config(**kw):
    return tiny_config("dra", batch_size=24, **kw)


def test_head_routing_on_a_hand_built_batch():
    labels = jnp.array([0, 1, 2, 0, 2, 1])
    scores = {h: jnp.arange(6.0) * 0.3 for h in HEADS}
    for loss in ("deviation", "bce", "focal"):
        grads = jax.jit(jax.grad(lambda s, loss=loss: sum(
            head_losses(s, labels, jax.random.key(0), loss).values())))(scores)
        reached = {h: set(np.flatnonzero(np.asarray(g) != 0).tolist()) for h, g in grads.items()}
        # each head's rows, every one of them (no score here sits on |dev|'s kink at 0
        # or past the margin): seen anomalies and normals; pseudo anomalies and normals;
        # the residual and normality heads every row
        assert reached["seen"] == {0, 1, 3, 5}, (loss, reached)
        assert reached["pseudo"] == {0, 2, 3, 4}, (loss, reached)
        assert reached["residual"] == reached["normality"] == set(range(6)), (loss, reached)
    routes = head_routing(labels)
    np.testing.assert_array_equal(routes["normality"][0], [1, 0, 0, 1, 0, 0])  # normal is 1
    np.testing.assert_array_equal(routes["residual"][0], [0, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(routes["seen"][1], [1, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(routes["pseudo"][1], [1, 0, 1, 1, 1, 0])
    assert float(combine({"seen": jnp.array([1.0]), "pseudo": jnp.array([2.0]),
                          "residual": jnp.array([3.0]), "normality": jnp.array([4.0])})[0]) == 2.0


def test_cutpaste_area_aspect_and_change():
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.integers(0, 256, (64, 64, 3)), jnp.uint8)
    fn = jax.jit(jax.vmap(augment.cutpaste, in_axes=(0, None)))
    out, masks = fn(jax.random.split(jax.random.key(0), 200), image)
    out, masks = np.asarray(out), np.asarray(masks)
    for o, m in zip(out, masks):
        area = m.mean()
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        h, w = len(rows), len(cols)
        assert 0.02 - 0.005 <= area <= 0.15 + 0.005
        assert m.sum() == h * w  # one rectangle
        assert 0.3 * 0.8 <= w / h <= (1 / 0.3) * 1.25  # rounding of small sides
        np.testing.assert_array_equal(o[~m], np.asarray(image)[~m])  # untouched outside
        assert np.mean(o[m] != np.asarray(image)[m]) > 0.5  # the pasted region differs


def test_rotation():
    img = jnp.asarray(np.random.default_rng(1).integers(1, 256, (9, 9, 3)), jnp.uint8)
    np.testing.assert_array_equal(augment.rotate(img, 0.0), img)
    np.testing.assert_array_equal(augment.rotate(img, 90.0), np.rot90(np.asarray(img), 1))
    r45 = np.asarray(augment.rotate(img, 45.0))
    assert r45[0, 0].sum() == 0 and r45[4, 4].tolist() == np.asarray(img)[4, 4].tolist()


def test_training_batch_labels_and_shapes(synthetic):
    method = build_method(dra_config())
    mesh = make_mesh(jax.devices()[:1])
    data = put_train_data(synthetic.images[synthetic.labels == 0][:30],
                          synthetic.images[synthetic.labels == 1][:4], mesh)
    batch = jax.jit(lambda d, k: method.sample_batch(d, k, 24, 0))(data, jax.random.key(0))
    assert batch["images"].shape == (24, SIZE, SIZE, 3) and batch["ref"].shape == (5, SIZE, SIZE, 3)
    labels = np.asarray(batch["labels"])
    assert (labels == 1).sum() == 8 and set(labels[:16]) <= {0, 2} and (labels == 2).sum() > 2


def test_test_scores_do_not_depend_on_batching(synthetic):
    config = dra_config(**{"model.n_scales": 1})  # one scale: half the compilation
    method = build_method(config)
    mesh = make_mesh()
    data = put_train_data(synthetic.images[synthetic.labels == 0][:30],
                          synthetic.images[synthetic.labels == 1][:4], mesh)
    tx = method.optimizer(20)
    state = init_state(method, jax.random.key(0), data, tx, mesh)
    assert state.extras["ref_images"].shape == (5, SIZE, SIZE, 3)
    again = init_state(method, jax.random.key(0), data, tx, mesh)
    np.testing.assert_array_equal(state.extras["ref_images"], again.extras["ref_images"])
    fn = make_score_fn(method, mesh)
    variables = {"params": state.params, "batch_stats": state.batch_stats, "extras": state.extras}
    images = synthetic.images[:40]
    a = score_images(fn, variables, images, mesh, batch_size=16)
    order = np.random.default_rng(0).permutation(40)
    b = score_images(fn, variables, images[order], mesh, batch_size=8)
    for head in ("score", *HEADS):
        np.testing.assert_allclose(a[head][order], b[head], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant,heads", [("DRA1A", {"seen"}), ("DRA3An",
                                           {"seen", "pseudo", "normality"})])
def test_ablation_variants_build_only_their_heads(variant, heads):
    method = build_method(dra_config(**{"dra.variant": variant}))
    v = jax.eval_shape(method.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
    assert set(v["params"]) == {"backbone", "heads"} and set(v["params"]["heads"]) == heads


def test_released_per_batch_reference_makes_scores_depend_on_the_batch(synthetic):
    method = build_method(dra_config(**{"dra.test_reference": "per_batch"}))
    mesh = make_mesh()
    data = put_train_data(synthetic.images[synthetic.labels == 0][:30],
                          synthetic.images[synthetic.labels == 1][:4], mesh)
    state = init_state(method, jax.random.key(0), data, method.optimizer(20), mesh)
    assert state.extras["ref_pool"].shape == (30, SIZE, SIZE, 3)
    variables = {"params": state.params, "batch_stats": state.batch_stats, "extras": state.extras}
    fn = make_score_fn(method, mesh)
    a = score_images(fn, variables, synthetic.images[:16], mesh, 8, key=jax.random.key(1))
    b = score_images(fn, variables, synthetic.images[:16], mesh, 8, key=jax.random.key(2))
    assert not np.allclose(a["residual"], b["residual"])
    np.testing.assert_allclose(a["seen"], b["seen"], rtol=1e-5)  # only the residual head reads it


def test_outlier_exposure_replaces_cutpaste(synthetic, tmp_path):
    from PIL import Image
    from fsad.experiment import load_outliers
    folder = tmp_path / "outliers" / "nested"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 50 * (i + 1), np.uint8)).save(folder / f"{i}.jpg")
    config = dra_config(**{"dra.outlier_root": str(tmp_path / "outliers")})
    outliers = load_outliers(config)
    assert outliers.shape == (3, SIZE, SIZE, 3)
    config.augment.rotate_degrees = 0.0  # keep the flat images flat
    method = build_method(config)
    data = put_train_data(synthetic.images[synthetic.labels == 0][:30],
                          synthetic.images[synthetic.labels == 1][:4], make_mesh(jax.devices()[:1]),
                          outliers)
    batch = jax.jit(lambda d, k: method.sample_batch(d, k, 24, 0))(data, jax.random.key(3))
    pseudo = np.asarray(batch["images"])[np.asarray(batch["labels"]) == 2]
    assert len(pseudo) > 0
    for im in pseudo:  # each pseudo anomaly is one of the flat outlier images
        assert len(np.unique(im)) == 1 and int(im[0, 0, 0]) in (50, 100, 150)


def test_outliers_from_an_mvtec_root_are_the_other_subsets_training_normals(tmp_path):
    """As the released loader: outlier_root/<subset>/train/good of every other subset;
    their test anomalies, masks and the trained subset's own images stay out."""
    from PIL import Image
    from fsad.data.decode import load_image_folder

    def write(rel, level, n):
        (tmp_path / rel).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), level, np.uint8)).save(tmp_path / rel / f"{i}.png")
    write("bottle/train/good", 10, 2)
    write("cable/train/good", 20, 3)
    write("cable/test/crack", 30, 1)
    write("cable/ground_truth/crack", 40, 1)
    write("zipper/train/good", 50, 1)
    got = load_image_folder(str(tmp_path), 8, skip_subset="bottle")
    assert sorted(int(im[0, 0, 0]) for im in got) == [20, 20, 20, 50]
    assert len(load_image_folder(str(tmp_path), 8)) == 6  # no subset trained: all normals


def test_dra_heads_rank_s_when_topk_abs_is_off():
    """model.topk_abs reaches DRA's heads: top-K of s rather than of |s|."""
    from fsad.methods.dra import DRAHeads
    feats = [jax.random.normal(jax.random.key(0), (2, 4, 5, 8))]
    heads = {abs_: DRAHeads(0.2, ("seen",), topk_abs=abs_) for abs_ in (True, False)}
    params = heads[True].init(jax.random.key(1), feats)
    s = np.asarray(feats[0] @ params["params"]["seen"]["conv"]["kernel"][0, 0]
                   + params["params"]["seen"]["conv"]["bias"])[..., 0].reshape(2, -1)
    for abs_, ranked in ((True, np.abs(s)), (False, s)):
        want = np.sort(ranked, axis=1)[:, -4:].mean(1)  # K = 0.2 * 20 cells
        got = heads[abs_].apply(params, feats)["seen"]
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_the_heads_name_what_they_cannot_take():
    """DRAHeads in a user's own code: an unknown head, features not a list over scales,
    the residual head without its reference maps, or with maps of another shape, are
    ValueErrors that name the fix (they were a KeyError, an IndexError, a TypeError on
    None, and a silent broadcast)."""
    from fsad.methods.dra import DRAHeads
    feats = [jnp.ones((2, 4, 4, 8)), jnp.ones((2, 2, 2, 8))]
    means = [jnp.ones((4, 4, 8)), jnp.ones((2, 2, 8))]
    key = jax.random.key(0)
    out = jax.eval_shape(lambda: DRAHeads().init_with_output(key, feats, means)[0])
    assert {h: o.shape for h, o in out.items()} == {h: (2,) for h in HEADS}
    for heads, f, m, fragment in [
            (("seen", "bogus"), feats, means, r"heads \['bogus'\] are not DRA's"),
            (HEADS, feats[0], means, r"feats is a \w+; pass a list over scales"),
            (HEADS, feats, None, r"mean map at each of the 2 scale\(s\).*not None"),
            (HEADS, feats, [means[0][:1], means[1]],
             r"ref_means\[0\] is \(1, 4, 8\), and the features at that scale are \(4, 4, 8\)")]:
        with pytest.raises(ValueError, match=fragment):
            DRAHeads(heads=heads).init(key, f, m)
    DRAHeads(heads=("seen", "normality")).init(key, feats)  # no residual: no maps needed
