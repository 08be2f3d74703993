"""The released code's defaults (issue 10): pyramid, heads, init, references, sampling
(the colour jitter is in test_pil_ops.py), schedules, AHL class balance and weights,
ImageNet weights by default."""

import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SIZE, compiled_programs, tiny_config
from fsad.data.protocols import batch_counts
from fsad.errors import UserError
from fsad.mesh import make_mesh
from fsad.methods import ahl, build_method
from fsad.methods.devnet import DevNetModel
from fsad.models.heads import NormalityScorer, ResidualScorer, TopKScorer
from fsad.models.pyramid import nearest_indices, pyramid
from fsad.optim import step_decay
from fsad.train import cycle_draw, init_state, put_train_data, sample_balanced


def test_configs_default_to_the_released_code():
    import configs.devnet
    import configs.dra
    d = configs.devnet.get_config()
    assert (d.model.n_scales, d.augment.rotate_degrees, d.optim.lr, d.optim.weight_decay,
            d.optim.decay_every_epochs, d.optim.clip_norm, d.epochs, d.batch_size,
            d.model.pretrained) == (2, 180.0, 2e-4, 1e-5, 10, 1.0, 50, 48, "imagenet")
    p = configs.devnet.get_config("paper")
    assert (p.model.n_scales, p.augment.rotate_degrees, p.optim.lr, p.optim.weight_decay,
            p.optim.decay_every_epochs, p.optim.clip_norm) == (1, 0.0, 1e-3, 1e-2, 0, 0.0)
    # both papers' top-K takes the largest scores s; both released codes rank |s|
    assert d.model.topk_abs and not p.model.topk_abs
    r = configs.dra.get_config()
    assert (r.dra.residual_stride, r.dra.residual_padding, r.optim.decay_at_epoch_start,
            r.epochs, r.model.n_scales) == (1, 1, True, 30, 2)
    p = configs.dra.get_config("paper")
    assert (p.optim.lr, p.optim.weight_decay, r.model.topk_abs, p.model.topk_abs) == (
        1e-3, 1e-2, True, False)
    # both released codes test in batches of their --batch_size (dataloaders/dataloader.py)
    assert d.eval_batch_size == d.batch_size == r.eval_batch_size == r.batch_size == 48


def test_ahl_refines_base_heads_at_the_base_lr_and_its_variants_start_fresh():
    """Default: the unified heads start from the base heads and take outer Adam steps of
    the base model's lr (README "AHL"); `paper`/`released`: fresh heads at 5e-3 / 2e-3."""
    import configs.ahl_devnet
    import configs.ahl_dra
    for module in (configs.ahl_dra, configs.ahl_devnet):
        d = module.get_config()
        assert (d.ahl.head_init, d.ahl.optim.lr, d.ahl.inner_lr) == ("base", d.optim.lr, 2e-4)
        assert (d.ahl.weight_relative, d.ahl.weight_temperature,
                d.ahl.error_scale) == (True, 0.1, "minmax")
        p = module.get_config("paper")
        assert (p.ahl.head_init, p.ahl.optim.lr, p.ahl.weighting) == ("fresh", 5e-3, "paper")
        assert (p.ahl.weight_relative, p.ahl.weight_temperature,
                p.ahl.error_scale) == (False, 1.0, "raw")  # Eq. 6 and 7
        r = module.get_config("released")
        assert (r.ahl.head_init, r.ahl.optim.lr, r.ahl.optim.weight_decay,
                r.ahl.optim.decay_every_epochs, r.ahl.optim.clip_norm,
                r.ahl.optim.decay_at_epoch_start, r.ahl.weighting, r.ahl.weight_relative,
                r.ahl.error_scale, r.ahl.update_last_epoch) == (
                    "fresh", 2e-3, 1e-4, 10, 1.0, True, "released", False, "raw", False)
        assert d.ahl.update_last_epoch and p.ahl.update_last_epoch
        assert p.optim.lr == d.optim.lr  # the base model keeps its released defaults


def test_released_query_weights_sum_to_one_until_the_released_code_reads_psi():
    """The released main.py divides the summed query losses by episode_num until it reads
    psi's weights, at 0-based epoch sequence_len + 2 (`epoch > sequence_len + 1`), and
    weighs them by 0.5 + 0.5 w_i, undivided, after (`ahl.weighting=released`). fsad's psi
    gives weights for epoch K + 1 already: the paper's weighting uses them there, the
    released one from K + 2 (before, from K + 1)."""
    from fsad.methods.ahl.meta_train import query_weights, weights_in_use
    uniform, w = jnp.full((7,), 1 / 7), jnp.linspace(0.05, 0.25, 7)
    for epoch in range(6):  # K = 5: psi's first weights come after epoch 5 (0-based)
        np.testing.assert_allclose(query_weights(uniform, epoch, 5, "released"), 1 / 7)
    np.testing.assert_allclose(query_weights(w, 6, 5, "released"), 1 / 7)
    np.testing.assert_allclose(weights_in_use(w, 6, 5, "released"), 1 / 7)
    np.testing.assert_allclose(query_weights(w, 7, 5, "released"), 0.5 + 0.5 * w)
    np.testing.assert_allclose(weights_in_use(w, 7, 5, "released"), w)
    np.testing.assert_allclose(query_weights(w, 6, 5, "paper"), w)
    np.testing.assert_allclose(query_weights(uniform, 0, 5, "paper"), 1 / 7)
    # every epoch's weights sit where psi's do (the meta-step's inputs: one program)
    from fsad.mesh import one_device_mesh, replicated
    placed = jax.device_put(w, replicated(one_device_mesh()))
    for epoch, weighting in ((0, "released"), (6, "released"), (7, "released"), (6, "paper")):
        assert query_weights(placed, epoch, 5, weighting).sharding == placed.sharding


def test_step_decay_matches_where_the_released_code_steps_its_scheduler():
    """DRA steps StepLR at the start of each epoch (decays after epochs 9, 19, 29);
    DevNet at the end (after 10, 20, ...)."""
    spe = 20
    start, end = step_decay(1.0, spe, 10, 0.1, True), step_decay(1.0, spe, 10, 0.1, False)
    for epoch in range(30):
        s = epoch * spe + 7
        assert float(start(s)) == pytest.approx(0.1 ** ((epoch + 1) // 10))
        assert float(end(s)) == pytest.approx(0.1 ** (epoch // 10))
    assert float(start(9 * spe)) == pytest.approx(0.1) and float(start(9 * spe - 1)) == 1.0


def test_nearest_half_size_is_torch_interpolate():
    """PyTorch's F.interpolate(size=H // 2, mode="nearest") takes rows floor(i * H / out)."""
    for h in (448, 96, 32, 7, 15):
        out = h // 2
        expect = np.minimum(np.floor(np.arange(out) * (h / out)).astype(int), h - 1)
        np.testing.assert_array_equal(nearest_indices(h, out), expect)
    x = jnp.arange(2 * 8 * 8 * 1, dtype=jnp.float32).reshape(2, 8, 8, 1)
    full, half = pyramid(x, 2)
    np.testing.assert_array_equal(half, x[:, ::2, ::2])
    torch = pytest.importorskip("torch")
    t = torch.nn.functional.interpolate(torch.arange(15 * 15.).reshape(1, 1, 15, 15), size=7)
    np.testing.assert_array_equal(
        pyramid(jnp.arange(15 * 15.).reshape(1, 15, 15, 1), 2)[1][0, ..., 0], t[0, 0].numpy())


def test_devnet_score_is_the_mean_of_the_two_scales():
    model = DevNetModel("resnet18", n_scales=2)
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    v = jax.jit(model.init)(jax.random.key(1), x)  # compiled whole: op by op is slower
    out = jax.jit(model.apply)(v, x)
    one = jax.jit(DevNetModel("resnet18", n_scales=1).apply)
    s_full = one(v, x)["score"]
    s_half = one(v, x[:, ::2, ::2])["score"]
    np.testing.assert_allclose(out["score"], (s_full + s_half) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["scale_scores"], jnp.stack([s_full, s_half]), rtol=1e-5)


def test_residual_head_keeps_its_map_at_stride_one():
    """14x14 cells at 448 px: K = 19 (released CompositeHead); AHL's stride 3 gives 4x4."""
    feats = np.random.default_rng(0).normal(size=(2, 14, 14, 8)).astype(np.float32)
    for stride, padding, cells in ((1, 1, 14), (3, 0, 4)):
        head = ResidualScorer(0.1, stride, padding)
        # compiled: op by op, each of its many small ops would compile on its own
        v = jax.jit(head.init)(jax.random.key(1), feats, feats[0])
        _, inter = jax.jit(lambda v, f: head.apply(v, f, f[0], capture_intermediates=True))(
            v, feats)
        conv_out = inter["intermediates"]["conv"]["__call__"][0]
        assert conv_out.shape == (2, cells, cells, 8)


def test_normality_head_is_non_negative_and_abs_of_its_linear_output():
    feats = np.random.default_rng(0).normal(size=(6, 3, 3, 16)).astype(np.float32)
    head = NormalityScorer()
    v = jax.jit(head.init)(jax.random.key(2), feats)
    out = jax.jit(head.apply)(v, feats)
    p = jax.tree.map(np.asarray, v["params"])  # the reference in NumPy
    pooled = feats.mean(axis=(1, 2))
    raw = (np.maximum(pooled @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0) @ p["fc2"]["kernel"]
           + p["fc2"]["bias"])[:, 0]
    np.testing.assert_allclose(out, np.abs(raw), rtol=1e-5, atol=1e-6)
    assert (raw < 0).any()  # abs changes something for this init


def test_heads_start_from_pytorch_default_init():
    """kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)) weights; U(+-1/sqrt(fan_in)) biases."""
    c = 512
    feats = jnp.zeros((1, 4, 4, c))

    def check(w, b, fan_in):
        bound = np.float32(1 / math.sqrt(fan_in))  # the float32 bound the draw uses
        w, b = np.asarray(w).ravel(), np.asarray(b).ravel()
        assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
        assert np.std(w) == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert np.all(b != 0)  # drawn, not zero-initialised

    p = jax.jit(TopKScorer().init)(jax.random.key(0), feats)["params"]["conv"]
    check(p["kernel"], p["bias"], c)
    p = jax.jit(ResidualScorer().init)(jax.random.key(1), feats, feats[0])["params"]
    check(p["conv"]["kernel"], p["conv"]["bias"], 9 * c)
    p = jax.jit(NormalityScorer().init)(jax.random.key(2), feats)["params"]
    check(p["fc1"]["kernel"], p["fc1"]["bias"], c)
    check(p["fc2"]["kernel"], p["fc2"]["bias"], 256)


def test_cycle_draw_walks_through_permutations():
    key = jax.random.key(4)
    rows = np.concatenate([np.asarray(cycle_draw(key, s, 3, 7, 10)) for s in range(7)])
    assert rows.shape == (21,) and rows.max() < 7
    for c in range(3):  # every 7 consecutive draws are a permutation of the 7 rows
        assert sorted(rows[7 * c:7 * c + 7].tolist()) == list(range(7))
    again = np.concatenate([np.asarray(cycle_draw(key, s, 3, 7, 10)) for s in range(7)])
    np.testing.assert_array_equal(rows, again)  # a function of (key, step) only


def _flat_data(n_normal=12, n_anom=3, size=SIZE):
    """Normals of flat grey levels 40..150, anomalies flat 250."""
    mesh = make_mesh(jax.devices()[:1])
    normals = np.stack([np.full((size, size, 3), 40 + 10 * i, np.uint8) for i in range(n_normal)])
    anomalies = np.full((n_anom, size, size, 3), 250, np.uint8)
    return put_train_data(normals, anomalies, mesh), mesh


def test_dra_references_are_rotated_and_half_of_them_pseudo():
    method = build_method(tiny_config("dra", batch_size=12))
    data, _ = _flat_data()
    draw = jax.jit(lambda d, k, s: method.sample_batch(d, k, 12, s))
    refs = np.concatenate([np.asarray(draw(data, jax.random.key(0), s)["ref"]) for s in range(40)])
    assert refs.shape == (200, SIZE, SIZE, 3)
    rotated = refs[:, 0, 0].sum(-1) == 0  # a corner rotated out of the picture is black
    assert rotated.mean() > 0.8
    levels = [set(np.unique(r).tolist()) - {0} for r in refs]
    pseudo = np.array([len(lv) > 1 for lv in levels])  # a jittered patch adds grey levels
    assert 0.35 < pseudo.mean() < 0.65, pseudo.mean()


def test_a_batch_splits_as_the_released_samplers_split_it():
    """The released balanced samplers (dataloaders/utlis.py) take batch_size // 2 normals
    (DevNet) and 2 * batch_size // 3 (DRA), the rest seen anomalies: rounding the
    anomalies' share instead gave a DevNet batch of 17 one anomaly less, and a DRA batch
    of 16 too."""
    for b in range(2, 100):
        assert batch_counts(b, 1 / 2) == (b // 2, b - b // 2)
        assert batch_counts(b, 1 / 3) == (2 * b // 3, b - 2 * b // 3)
    data, _ = _flat_data()
    key = jax.random.key(0)
    _, labels = jax.jit(lambda d, k: sample_balanced(d, k, 0, 17, 1 / 2))(data, key)
    assert int(labels.sum()) == 9
    method = build_method(tiny_config("dra", batch_size=16))
    labels = jax.jit(lambda d, k: method.sample_batch(d, k, 16, 0))(data, key)["labels"]
    assert np.asarray(labels[10:]).tolist() == [1] * 6 and (np.asarray(labels[:10]) != 1).all()


def test_variants_without_the_residual_head_take_no_references():
    method = build_method(tiny_config("dra", batch_size=12, **{"dra.variant": "DRA3An"}))
    data, mesh = _flat_data()
    batch = jax.jit(lambda d, k: method.sample_batch(d, k, 12, 0))(data, jax.random.key(0))
    assert "ref" not in batch
    state = init_state(method, jax.random.key(0), data, method.optimizer(10), mesh)
    assert state.extras == {} and method.reference is None
    # traced, not run: the loss needs no batch["ref"] and returns a scalar
    loss, _ = jax.eval_shape(method.loss, state.params, state.batch_stats, batch,
                             jax.random.key(1))
    assert loss.shape == ()


def test_prior_mu_and_sigma_reach_dra_losses():
    from fsad.methods.dra import head_losses
    scores = {"seen": jnp.array([0.5, 3.0])}
    labels = jnp.array([0, 1])
    a = head_losses(scores, labels, jax.random.key(0), prior_mu=0.0, prior_sigma=1.0)
    b = head_losses(scores, labels, jax.random.key(0), prior_mu=2.0, prior_sigma=1.0)
    c = head_losses(scores, labels, jax.random.key(0), prior_mu=0.0, prior_sigma=2.0)
    assert float(a["seen"]) != pytest.approx(float(b["seen"]))
    assert float(a["seen"]) != pytest.approx(float(c["seen"]))  # sigma reaches them too


def test_cutmix_partner_is_another_image_and_textures_span_all(caplog):
    idx = ahl.other_indices(jax.random.key(0), 50)
    assert (idx != np.arange(50)).all() and len(set(idx.tolist())) > 25
    normals = np.stack([np.full((16, 16, 3), i, np.uint8) for i in range(50)])
    textures = np.stack([np.full((16, 16, 3), 200 + i, np.uint8) for i in range(2)])
    out = ahl.make_pseudo(jax.random.key(1), normals, "cutmix", textures)
    levels = set(np.unique(out).tolist())
    assert max(levels) < 64  # patches come from normals (levels 0..49, jittered), no texture
    assert len(levels) > 25  # and from all of them, not only the first len(textures)
    # in chunks (the last padded), each image's own draw: the same pseudo anomalies
    np.testing.assert_array_equal(
        ahl.make_pseudo(jax.random.key(1), normals, "cutmix", textures, chunk=16), out)
    # another seed's draws on other normals: the program already made (before, each call
    # made its own jitted function, traced and lowered anew for every seed)
    with compiled_programs(caplog) as compiled:
        ahl.make_pseudo(jax.random.key(2), normals[::-1].copy(), "cutmix", chunk=16)
    assert compiled == []


def test_class_balance_gives_each_class_its_base_share():
    labels = np.array([0] * 250 + [2] * 125 + [1] * 5)
    for base, shares in (("dra", (1 / 3, 1 / 3, 1 / 3)), ("devnet", (1 / 2, 1 / 4, 1 / 4))):
        w = ahl.class_balance(labels, base)
        got = [w[labels == c].sum() for c in (0, 2, 1)]
        assert got == pytest.approx(shares)
    w = ahl.class_balance(np.array([0] * 10 + [1] * 2), "devnet")  # no pseudo: anomalies 1/2
    assert w[10:].sum() == pytest.approx(0.5)


def test_task_losses_weigh_the_few_seen_anomalies_by_their_share():
    """A DevNet-head task of 250 normals, 125 pseudo, 5 seen: the seen anomalies carry a
    quarter of the loss, not 5/380 of it."""
    clusters = [np.arange(0, 125), np.arange(125, 250)]
    tasks = ahl.build_tasks(clusters, 250, 10, seed=0, base="devnet")
    for i in range(tasks.num_tasks):
        lab, w = tasks.support_lab[i], tasks.support_weight[i]
        assert w.sum() == pytest.approx(1.0)
        assert w[(lab == 1) & (tasks.support_mask[i] == 1)].sum() == pytest.approx(0.25)
    config = tiny_config("ahl_devnet")
    params = jax.jit(TopKScorer(0.1).init)(jax.random.key(0), jnp.zeros((1, 2, 2, 4)))["params"]
    hm, _ = ahl.head_model(config, {"params": {"head": params}})
    labels = np.array([0] * 250 + [2] * 125 + [1] * 5)
    w = jnp.asarray(ahl.class_balance(labels, "devnet"))
    # every score at the prior mean: normals sit at |dev| = 0 (zero gradient), each
    # anomaly pulls with its weight; the 5 seen together as hard as the 125 pseudo
    grad = jax.jit(jax.grad(lambda s: hm.loss({"score": s}, jnp.asarray(labels), w,
                                              jax.random.key(0))))(jnp.zeros(380))
    seen, pseudo = float(-grad[375:].sum()), float(-grad[250:375].sum())
    assert seen > 0 and seen == pytest.approx(pseudo, rel=1e-4)


def test_importance_temperature_lets_the_weights_spread():
    labels = np.array([0] * 20 + [1] * 20)
    good = labels + np.random.default_rng(0).normal(0, 0.30, 40)
    worse = labels + np.random.default_rng(1).normal(0, 0.33, 40)
    pred = np.stack([good, worse], 1)
    coef = np.ones((2, 40), np.float32)
    r = ahl.generalisation_errors(pred, labels, coef)
    rel = (r[1] - r[0]) / r.mean()
    w = ahl.importance_weights(pred, labels, coef, temperature=0.1)
    assert w[0] / w[1] == pytest.approx(math.exp(rel / 0.1), rel=1e-4)
    assert ahl.weight_spread(w) > 1.5  # the better model clearly favoured
    flat = ahl.importance_weights(pred, labels, coef, temperature=100.0)
    assert ahl.weight_spread(flat) < 1.01
    # the paper's Eq. 7: softmax(-r), near-equal weights for errors this close
    eq7 = ahl.importance_weights(pred, labels, coef, temperature=1.0, relative=False)
    np.testing.assert_allclose(eq7, np.exp(-r) / np.exp(-r).sum(), rtol=1e-6)
    assert ahl.weight_spread(eq7) < 1.05


def test_the_papers_errors_take_the_scores_as_they_are():
    """Eq. 6 (and the released get_reward) squares raw score minus label; fsad's default
    min-max scales the scores first. On deviation-scale scores (normals near 0, anomalies
    at 5 and more) the raw errors are tens, and Eq. 7's softmax(-r) favours one model
    where the scaled errors leave the weights near 1/T."""
    rng = np.random.default_rng(0)
    labels = np.array([0] * 30 + [1] * 10)
    pred = np.stack([np.where(labels == 1, 6.0, 0.0) + rng.normal(0, s, 40)
                     for s in (1.0, 1.2, 1.5)], 1)  # [P, T]: the first model the best
    coef = np.ones((3, 40))
    coef[1, :5] = 0.0  # model 1 judged on the other 35
    raw = ahl.generalisation_errors(pred, labels, coef, "raw")
    for t in range(3):  # the slow reference: Eq. 6 sample by sample
        kept = [j for j in range(40) if coef[t, j] > 0]
        assert raw[t] == pytest.approx(
            sum((pred[j, t] - labels[j]) ** 2 for j in kept) / len(kept), rel=1e-12)
    scaled = (pred - pred.min()) / (pred.max() - pred.min())
    np.testing.assert_allclose(ahl.generalisation_errors(pred, labels, coef),
                               ahl.generalisation_errors(scaled, labels, coef, "raw"))
    eq7 = ahl.importance_weights(pred, labels, coef, 1.0, False, "raw")
    np.testing.assert_allclose(eq7, np.exp(-raw) / np.exp(-raw).sum(), rtol=1e-6)
    assert eq7[0] > 0.5 and ahl.weight_spread(eq7) > 5
    assert ahl.weight_spread(ahl.importance_weights(pred, labels, coef, 1.0, False)) < 1.1
    with pytest.raises(ValueError, match="error_scale"):
        ahl.generalisation_errors(pred, labels, coef, "scaled")


def test_released_errors_are_the_released_get_reward():
    """`ahl.errors=released` (`:released`) against a transliteration of the released
    main.py: for each model k, get_reward on every query set (psi's predictions for that
    set, its labels 0 normal, 1 seen, 2 pseudo), its class sums and counts added up over
    the sets, reward = -(0.5 r_n / n_n + 0.5 r_p / n_p + r_a / n_a), w = softmax(reward).
    The query sets share samples (fsad's pool is their union), each with psi's own
    predictions (a call per set); one set has no pseudo anomaly, which the released
    code allows for."""
    rng = np.random.default_rng(0)
    P, T = 30, 4
    classes = np.array([0] * 14 + [1] * 6 + [2] * 10)
    pred = rng.normal(size=(T, P, T)) * 2 + (classes > 0)[:, None] * 3  # [Q, P, T]
    sets = [rng.choice(P, 12, replace=False) for _ in range(T)]
    sets[1] = np.array([0, 1, 2, 3, 14, 15, 16])  # normals and seen anomalies only
    in_query = np.zeros((T, P))
    for q, rows in enumerate(sets):
        in_query[q, rows] = 1

    def get_reward(pred_score, ground_score, k):  # main.py's, per query set
        def mse(c, target):
            kept = [pred_score[i][k] for i in range(len(ground_score)) if ground_score[i] == c]
            return (np.mean([(v - target) ** 2 for v in kept]) if kept else 0.0), len(kept)
        (re_n, n_n), (re_a, n_a), (re_p, n_p) = mse(0, 0), mse(1, 1), mse(2, 1)
        return re_n, re_p, re_a, n_n, n_a, n_p

    reward = []
    for k in range(T):
        r_n = r_a = r_p = n_n = n_a = n_p = 0
        for q, rows in enumerate(sets):
            re_n, re_p, re_a, c_n, c_a, c_p = get_reward(pred[q][rows], classes[rows], k)
            r_n, r_a, r_p = r_n + re_n, r_a + re_a, r_p + re_p
            n_n, n_a, n_p = n_n + c_n, n_a + c_a, n_p + c_p
        reward.append(-(0.5 * (r_n / n_n) + 0.5 * (r_p / n_p) + 1 * (r_a / n_a)))
    r = ahl.released_errors(pred, classes, in_query)
    np.testing.assert_allclose(r, -np.array(reward), rtol=1e-12)
    e = np.exp(reward)
    np.testing.assert_allclose(ahl.weights_from_errors(r, 1.0, False), e / e.sum(), rtol=1e-6)
    # one prediction for every set: the same as each set given it
    np.testing.assert_allclose(ahl.released_errors(pred[0], classes, in_query),
                               ahl.released_errors(pred[[0] * T], classes, in_query),
                               rtol=1e-12)
    # the pool's classes and query sets as `Tasks` gives them to meta_train
    tasks = ahl.build_tasks([np.arange(0, 6), np.arange(6, 12), np.arange(12, 20)], 20, 4, 0)
    got = tasks.pool_classes()
    for q in range(tasks.num_tasks):
        real = tasks.query_mask[q] > 0
        for idx, lab in zip(tasks.query_idx[q][real], tasks.query_lab[q][real]):
            p = int(np.flatnonzero(tasks.pool_idx == idx)[0])
            assert got[p] == lab and tasks.pool_in_query_sets()[q, p] == 1
    assert tasks.pool_in_query_sets().sum() == tasks.query_mask.sum()
    assert set(got.tolist()) == {0, 1, 2}


def test_ahl_reference_means_work_with_the_per_batch_reference():
    """AHL on a DRA base trained with test_reference=per_batch raised KeyError."""
    config = tiny_config("ahl_dra", **{"dra.test_reference": "per_batch"})
    method = build_method(config)
    data, mesh = _flat_data()
    state = init_state(method, jax.random.key(0), data, method.optimizer(10), mesh)
    variables = {"params": state.params, "batch_stats": state.batch_stats,
                 "extras": state.extras}
    means = ahl.reference_means(config, method, variables, seed=0)
    assert len(means) == 2 and all(m.shape == (1, 1, 512) for m in means)
    again = ahl.reference_means(config, method, variables, seed=0)
    for a, b in zip(means, again):
        np.testing.assert_array_equal(a, b)  # one seeded draw


def test_imagenet_weights_that_cannot_be_had_stop_with_the_three_ways(monkeypatch, tmp_path):
    from fsad import weights
    cfg = tiny_config().model
    cfg.pretrained = "imagenet"
    monkeypatch.setitem(weights.TORCHVISION_IMAGENET, "resnet18",
                        ("http://127.0.0.1:9/resnet18-f37072fd.pth", "f37072fd"))
    with pytest.raises(UserError) as err:
        weights.pretrained_variables(cfg, cache_dir=str(tmp_path))
    msg = str(err.value)
    assert "cannot download" in msg and "lite0" in msg and "pretrained=none" in msg
    assert "pretrained=PATH" in msg
    # a URL without a sha256 is looked for in its digest's folder, which the advice names
    cfg.pretrained = "http://127.0.0.1:9/model.pth"
    with pytest.raises(UserError) as err:
        weights.pretrained_variables(cfg, cache_dir=str(tmp_path))
    folder = os.path.dirname(weights.download_path(cfg.pretrained, None, str(tmp_path)))
    assert f"put the file into {folder} or" in str(err.value) and folder != str(tmp_path)
    cfg.pretrained = "none"
    assert weights.pretrained_variables(cfg) == (None, "random init (resnet18)")


def test_a_long_cpu_run_says_so(caplog):
    """warn_if_long_on_cpu warns past an hour's ETA on a CPU, naming the GPU and :quick
    (fit calls it once a seed, after its third step)."""
    from fsad.train import warn_if_long_on_cpu
    with caplog.at_level(logging.WARNING):
        assert not warn_if_long_on_cpu(600.0, 100)
        assert warn_if_long_on_cpu(48 * 3600.0, 1000)
    assert "meant for a GPU" in caplog.text and ":quick" in caplog.text
    assert caplog.text.count("meant for a GPU") == 1


def test_imagenet_weights_from_a_local_copy_without_torch(tmp_path):
    """A torchvision resnet18 file in the weights cache (written without torch, as
    torch.save would) is used by model.pretrained=imagenet: no download, no PyTorch."""
    import collections

    from test_pth import Storage, Tensor, write_handmade
    from test_resnet_weights import torchvision_state_dict

    from fsad import weights
    sd = torchvision_state_dict("resnet18")
    obj = collections.OrderedDict()
    for i, (k, v) in enumerate(sd.items()):
        v = np.asarray(v)
        kind = "LongStorage" if v.dtype == np.int64 else "FloatStorage"
        strides = [int(np.prod(v.shape[j + 1:])) for j in range(v.ndim)]
        obj[k] = Tensor(Storage(str(i), kind, v.ravel()), 0, v.shape, strides)
    path = tmp_path / "resnet18-f37072fd.pth"
    write_handmade(str(path), obj)
    cfg = tiny_config().model
    cfg.pretrained = "imagenet"
    cfg.pretrained_sha256 = weights.sha256_of(str(path))  # the real file's would be f37072fd...
    variables, init = weights.pretrained_variables(cfg, cache_dir=str(tmp_path))
    assert init == "ImageNet (resnet18-f37072fd.pth), resnet18"
    np.testing.assert_array_equal(variables["params"]["backbone"]["conv1"]["kernel"],
                                  sd["conv1.weight"].transpose(2, 3, 1, 0))
    cfg.pretrained_sha256 = "0" * 64
    with pytest.raises(UserError, match="sha256"):
        weights.pretrained_variables(cfg, cache_dir=str(tmp_path))


def test_head_losses_are_weighted_means_whatever_the_weights_sum_to():
    """AHL's DRA class weights route 2/3 of a task's weight to the seen head: its loss is
    still the weighted mean over the rows it sees (the released plain mean over them)."""
    from fsad.methods.dra import head_losses
    labels = jnp.array([0, 0, 2, 2, 1, 1])
    w = jnp.asarray(ahl.class_balance(np.asarray(labels), "dra"))
    scores = {"seen": jnp.array([0.2, -0.4, 9.0, 9.0, 3.0, 1.0])}
    prior = jax.random.normal(jax.random.fold_in(jax.random.key(0), 0), (5000,))
    dev = (scores["seen"] - prior.mean()) / prior.std(ddof=1)
    per = np.where(np.asarray(labels) == 1, np.maximum(5 - dev, 0), np.abs(dev))
    routed = np.asarray(labels) != 2
    want = per[routed].mean()  # normals and seen weigh 1/3 each: equal per-row weights
    got = head_losses(scores, labels, jax.random.key(0), sample_weight=w)["seen"]
    assert float(got) == pytest.approx(want, rel=1e-5)
