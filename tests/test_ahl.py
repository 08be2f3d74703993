"""AHL: HADG tasks, the vmapped CDL step against a loop, importance weights, resume."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import compiled_programs, run_with_devices, tiny_config
from fsad.errors import UserError
from fsad.methods import ahl
from fsad.methods.dra import DRAHeads
from fsad.models.heads import TopKScorer
from fsad.models.sequence import ScoreSequenceModel

NN, NA = 30, 10
CLUSTERS = [np.arange(0, 10), np.arange(10, 20), np.arange(20, 30)]


def normal_of(idx):
    """Bank row -> the normal image it comes from (None for seen anomalies)."""
    if idx < NN:
        return idx
    if idx < NN + NA:
        return None
    return (idx - NN - NA) % NN


def family_of(idx):
    return None if idx < NN + NA else (idx - NN - NA) // NN


def test_the_feature_function_is_made_once_per_trunk_dtype_and_route():
    """The bank's feature function is one jitted function for the seeds and cells of a
    run (before, each seed made its own, which traced and lowered the trunk anew), and
    another one where the program differs."""
    made = ahl.make_feature_fn(tiny_config("ahl_dra", **{"model.dtype": "float32"}))
    assert ahl.make_feature_fn(tiny_config("ahl_dra", **{
        "model.dtype": "float32", "seed": 3, "data.setting": "hard",
        "data.known_class": "spot", "data.n_anomaly": 1})) is made
    for field, value in (("model.dtype", "bfloat16"), ("model.backbone", "efficientnet_lite0"),
                         ("model.n_scales", 1), ("model.stem", "space_to_depth"),
                         ("model.depthwise_conv", "grouped")):
        other = tiny_config("ahl_dra", **{"model.dtype": "float32", field: value})
        assert ahl.make_feature_fn(other) is not made, field


def test_task_structure():
    t = ahl.build_tasks(CLUSTERS, NN, NA, seed=0)
    assert t.num_tasks == 7
    pairs = set()
    for i in range(7):
        s = t.support_idx[i][t.support_mask[i] == 1]
        q = t.query_idx[i][t.query_mask[i] == 1]
        s_norm = {normal_of(x) for x in s if normal_of(x) is not None}
        q_norm = {normal_of(x) for x in q if normal_of(x) is not None}
        assert not s_norm & q_norm  # disjoint normals
        if i < 6:
            ci = [c for c in range(3) if s_norm <= set(CLUSTERS[c].tolist())]
            cj = [c for c in range(3) if q_norm <= set(CLUSTERS[c].tolist())]
            assert len(ci) == len(cj) == 1 and ci != cj
            pairs.add((ci[0], cj[0]))
        else:
            assert s_norm | q_norm == set(range(NN))
        s_anom = {x for x in s if NN <= x < NN + NA}
        q_anom = {x for x in q if NN <= x < NN + NA}
        assert len(s_anom) == 5 and len(q_anom & s_anom) == 2 and len(q_anom - s_anom) == 5
        fam_s = {family_of(x) for x in s} - {None}
        fam_q = {family_of(x) for x in q} - {None}
        assert fam_s == {t.families[i][0]} and fam_q == {t.families[i][1]}
        assert t.families[i][0] != t.families[i][1]
        labels = t.support_lab[i][t.support_mask[i] == 1]
        np.testing.assert_array_equal(labels == 2, [family_of(x) is not None for x in s])
        # importance coefficients: own support normals excluded, unseen anomalies weigh 1
        coef = dict(zip(t.pool_idx.tolist(), t.pool_coef[i].tolist()))
        for x in q_anom - s_anom:
            assert coef[x] == 1.0
        for x in q_anom & s_anom:
            assert coef[x] == 0.5
        for x in s:
            if x < NN and x in coef:
                assert coef[x] == 0.0
    assert pairs == {(a, b) for a in range(3) for b in range(3) if a != b}
    # the released loader's tasks: the 6 cluster pairs alone, the same as above
    pairs_only = ahl.build_tasks(CLUSTERS, NN, NA, seed=0, split_task=False)
    assert pairs_only.num_tasks == 6 and pairs_only.pool_coef.shape[0] == 6
    for i in range(6):
        for kind in ("support", "query"):
            rows = [getattr(x, f"{kind}_idx")[i][getattr(x, f"{kind}_mask")[i] == 1]
                    for x in (t, pairs_only)]
            np.testing.assert_array_equal(*rows)


def test_every_set_keeps_a_normal():
    """Each normal is made a pseudo anomaly by its own draw: with ahl.pseudo_frac near 1
    most sets had no normal left (a reviewer saw 4 of 7 support sets so at 0.99), and a
    task without normals has nothing to tell the anomalies from. Every set keeps one."""
    tasks = ahl.build_tasks(CLUSTERS, NN, NA, seed=0, pseudo_frac=0.99)
    for lab, mask in ((tasks.support_lab, tasks.support_mask),
                      (tasks.query_lab, tasks.query_mask)):
        normal = (lab == ahl.NORMAL) & (mask > 0)  # (padding aside)
        assert normal.sum(1).min() == 1  # (the draws made every other one pseudo)


def test_one_shot_anomaly_is_in_both_sets():
    t = ahl.build_tasks(CLUSTERS, NN, 1, seed=1)
    for i in range(t.num_tasks):
        assert NN in t.support_idx[i][t.support_mask[i] == 1]
        assert NN in t.query_idx[i][t.query_mask[i] == 1]


def test_too_few_clusters_is_a_clear_error():
    with pytest.raises(UserError, match="clusters"):
        ahl.build_tasks([np.arange(10)], 10, 2, seed=0)


def test_feature_health_flags_a_collapsed_trunk(caplog):
    rng = np.random.default_rng(0)
    alive = np.abs(rng.normal(size=(60, 12))) + np.repeat(np.eye(3, 12) * 5, 20, axis=0)
    healthy = ahl.feature_health(alive, ahl.cluster_normals(alive, 3, seed=0))
    assert healthy == {"dead_normal_fraction": 0.0,
                       "largest_cluster_fraction": pytest.approx(1 / 3)}
    assert "all-zero" not in caplog.text
    dead = alive.copy()
    dead[:54] = 0  # 90% of the normals mapped to zero features
    clusters = ahl.cluster_normals(dead, 3, seed=0)
    sick = ahl.feature_health(dead, clusters)
    assert sick["dead_normal_fraction"] == pytest.approx(0.9)
    assert sick["largest_cluster_fraction"] >= 0.9
    assert "all-zero features" in caplog.text


def test_auto_clustering_falls_back_to_images_on_dead_features(caplog, recwarn):
    rng = np.random.default_rng(1)
    dark = rng.integers(0, 60, (12, 32, 32, 3))
    bright = rng.integers(190, 256, (9, 32, 32, 3))
    normals = np.concatenate([dark, bright]).astype(np.uint8)
    feats = np.zeros((21, 4 * 16), np.float32)
    feats[0, 3] = 1.0  # one normal alive: k-means keeps one cluster of 3+ at most
    clusters, info = ahl.normal_clusters(feats, normals, 3, seed=0, cluster_on="features")
    assert len(clusters) < 2 and info["cluster_on"] == "features"
    with pytest.raises(ValueError, match="cluster_on"):
        ahl.build_tasks(clusters, 21, 4, seed=0)
    clusters, info = ahl.normal_clusters(feats, normals, 3, seed=0, cluster_on="auto")
    assert info["cluster_on"] == "images" and info["dead_normal_fraction"] == pytest.approx(20 / 21)
    assert "clustering the downsampled images" in caplog.text
    groups = [set(c.tolist()) for c in clusters]
    assert len(groups) >= 2  # every kept cluster is dark-only or bright-only
    assert all(g <= set(range(12)) or g <= set(range(12, 21)) for g in groups)
    assert ahl.build_tasks(clusters, 21, 4, seed=0).num_tasks == len(groups) * (len(groups) - 1) + 1
    with pytest.raises(ValueError, match="cluster_on"):
        ahl.normal_clusters(feats, normals, 3, seed=0, cluster_on="pixels")
    # fsad's warnings say it; scikit-learn's about the repeated rows is not shown as well
    assert not [w for w in recwarn if "distinct clusters" in str(w.message)]


def _devnet_head_model():
    config = tiny_config("ahl_devnet")
    feats = jnp.zeros((1, 2, 2, 16))
    params = jax.jit(TopKScorer(0.1).init)(jax.random.key(0), feats)["params"]
    hm, p = ahl.head_model(config, {"params": {"head": params}})
    rng = np.random.default_rng(0)
    bank = [jnp.asarray(rng.normal(size=(NN + NA + 3 * NN, 2, 2, 16)), jnp.float32)]
    return hm, p, bank


def _dra_head_model():
    """DRA's four heads on two scales of 16-channel features (2x2 and 1x1: the maps of
    fsad's CPU matmul route, which keeps second-order MAML quick to compile and run)."""
    config = tiny_config("ahl_dra")
    rng = np.random.default_rng(0)
    bank = [jnp.asarray(rng.normal(size=(NN + NA + 3 * NN, s, s, 16)), jnp.float32)
            for s in (2, 1)]
    ref_means = [f[:5].mean(0) for f in bank]
    heads = DRAHeads(0.1)
    v = jax.jit(heads.init)(jax.random.key(0), [f[:2] for f in bank], ref_means)
    hm, p = ahl.head_model(config, {"params": {"heads": v["params"]},
                                    "batch_stats": {"heads": v["batch_stats"]}}, ref_means)
    return hm, p, bank


TWO_CLUSTERS = [np.arange(0, 15), np.arange(15, 30)]  # 3 tasks: the loop stays short


def _meta_step_and_loop(hm, params, bank, first_order):
    """One meta-step (vmapped over the tasks) and the same update written as a Python loop
    over the tasks. -> (vmapped new params, its outputs, loop new params, loop losses,
    loop total)."""
    tasks = ahl.build_tasks(TWO_CLUSTERS, NN, NA, seed=0)
    T = tasks.num_tasks
    arrays = tasks.device_arrays()
    weights = jnp.asarray(np.random.default_rng(1).dirichlet(np.ones(T)), jnp.float32)
    key = jax.random.key(3)
    tx = optax.sgd(1.0)  # params_new = params - grad: the update shows the gradient
    step, task_loss, adapt = ahl.make_meta_step(hm, tx, 2, 0.05, first_order)
    new, _, out = step(params, tx.init(params), bank, arrays, weights,
                       jnp.asarray(tasks.pool_idx), key)

    @jax.jit
    @jax.value_and_grad
    def one_task(p, bank, t, k):  # one task's query loss after its inner steps
        k_in, k_out = jax.random.split(k)
        theta = adapt(p, bank, t["support_idx"], t["support_lab"], t["support_weight"], k_in)
        return task_loss(theta, bank, t["query_idx"], t["query_lab"], t["query_weight"], k_out)

    keys = jax.random.split(key, T)
    losses, grads = zip(*(one_task(params, bank, {k: v[i] for k, v in arrays.items()}, keys[i])
                          for i in range(T)))
    # the weighted sums in NumPy: as eager JAX ops each would compile on its own
    w_np, losses = np.asarray(weights), np.stack([np.asarray(l) for l in losses])
    total = float(w_np @ losses)
    ref_new = jax.tree.map(lambda p, *g: np.asarray(p) - sum(w * np.asarray(gi)
                                                             for w, gi in zip(w_np, g)),
                           params, *grads)
    assert out["pool_scores"].shape == (T, len(tasks.pool_idx))
    return new, out, ref_new, losses, total


@pytest.mark.parametrize("base", ["dra", "devnet"])
def test_vmapped_meta_step_equals_a_loop(base):
    """The vmapped meta-step's losses and update equal a loop over the tasks, second and
    first order. DRA's heads are bilinear in their weights (MLP, conv
    stacks), so the inner steps' Hessian is non-zero and the two orders differ. (DevNet's
    conv + top-K + deviation loss is piecewise linear in its weights: there second and
    first order coincide exactly.)"""
    hm, params, bank = _dra_head_model() if base == "dra" else _devnet_head_model()
    updates = []
    for first_order in (False, True):
        new, out, ref_new, losses, total = _meta_step_and_loop(hm, params, bank, first_order)
        np.testing.assert_allclose(out["task_losses"], losses, rtol=1e-5, atol=1e-6)
        assert float(out["loss"]) == pytest.approx(float(total), rel=1e-5)
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ref_new)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        updates.append(new)
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(*map(jax.tree.leaves, updates)))
    if base == "dra":  # second order is not first order (measured: 6e-3)
        assert diff > 1e-4, diff
    else:  # DevNet: the same update
        assert diff < 1e-6, diff


def meta_step_on_meshes(sizes: list, chunked: tuple = ()) -> dict:
    """Runs in a Python with max(sizes) forced CPU devices (conftest.run_with_devices):
    one second-order meta-step on DRA's heads (3 tasks) with the tasks spread over a mesh
    of each size, and for each size in `chunked` the same with 7 samples of a set at a
    time (key "<size>/7"). -> {key: {"task_losses", "loss", "params" (the update's
    leaves), "pool_scores", "replicated" (every output replicated on the mesh)}}."""
    from fsad.mesh import make_mesh, replicated
    hm, params, bank = _dra_head_model()
    tasks = ahl.build_tasks(TWO_CLUSTERS, NN, NA, seed=0)
    weights = jnp.asarray(np.random.default_rng(1).dirichlet(np.ones(tasks.num_tasks)),
                          jnp.float32)
    tx = optax.sgd(1.0)
    out = {}
    for n, chunk in [(n, 0) for n in sizes] + [(n, 7) for n in chunked]:
        mesh = make_mesh(jax.devices()[:n])
        step, _, _ = ahl.make_meta_step(hm, tx, 2, 0.05, False, mesh, chunk)
        args = jax.device_put((params, tx.init(params), bank, tasks.device_arrays(), weights,
                               jnp.asarray(tasks.pool_idx)), replicated(mesh))
        new, _, res = step(*args, jax.random.key(3))
        leaves = [new, res["task_losses"], res["loss"], res["pool_scores"]]
        out[f"{n}/{chunk}" if chunk else n] = {
            "task_losses": np.asarray(res["task_losses"]).tolist(),
            "loss": float(res["loss"]),
            "params": [np.asarray(a).ravel().tolist() for a in jax.tree.leaves(new)],
            "pool_scores": np.asarray(res["pool_scores"]).tolist(),
            "replicated": all(a.sharding.is_fully_replicated and len(a.sharding.device_set) == n
                              for a in jax.tree.leaves(leaves))}
    return out


def test_meta_step_spreads_the_tasks_over_the_devices():
    """The meta-step on 2 and on 8 devices (3 tasks: one copy of a task pads the mesh of
    2, five the mesh of 8) gives every task the loss and pool scores it gets on one
    device, the same loss and update up to the order of the sum, all replicated. Each
    device adapts its own tasks only: were the inner steps' gradients summed across the
    devices (JAX's varying-axis typing does that to the unsharded params in a
    `shard_map`), the tasks' losses would differ (measured: by 1e-3 of 9.8 on 2 devices).
    The sets taken 7 samples at a time (ahl.chunk_size) on 2 devices give the same."""
    got = run_with_devices(8, "test_ahl", "meta_step_on_meshes", [1, 2, 8], [2])
    one = got["1"]
    for n in ("2", "8", "2/7"):
        assert got[n]["replicated"], n
        np.testing.assert_allclose(got[n]["task_losses"], one["task_losses"], rtol=1e-6,
                                   err_msg=n)
        np.testing.assert_allclose(got[n]["pool_scores"], one["pool_scores"], rtol=1e-5,
                                   atol=1e-6, err_msg=n)
        assert got[n]["loss"] == pytest.approx(one["loss"], rel=1e-6)
        for a, b in zip(got[n]["params"], one["params"]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=n)
    assert one["replicated"]


@pytest.mark.parametrize("base", ["dra", "devnet"])
def test_fresh_heads_take_the_place_of_the_base_heads(base):
    """ahl.head_init=fresh (the `paper` and `released` variants): the heads `run_ahl`
    initialises have the base heads' tree and shapes, new values, and score the bank."""
    hm, params, bank = _dra_head_model() if base == "dra" else _devnet_head_model()
    fresh = jax.jit(hm.init)(jax.random.key(5), [b[:1] for b in bank])
    assert jax.tree.structure(fresh) == jax.tree.structure(params)
    assert [a.shape for a in jax.tree.leaves(fresh)] == [a.shape for a in jax.tree.leaves(params)]
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(fresh),
                                                     jax.tree.leaves(params)))
    scores = jax.jit(lambda p, f: hm.score(hm.apply(p, f)))(fresh, [b[:4] for b in bank])
    assert scores.shape == (4,) and bool(jnp.all(jnp.isfinite(scores)))


def test_fresh_heads_normalise_with_new_batch_norm_statistics():
    """With fresh heads the residual head's BatchNorm (after its conv) uses PyTorch's new
    statistics (mean 0, var 1), not those of the base model's trained conv; the other
    heads have no BatchNorm and score as the base model's."""
    config = tiny_config("ahl_dra")
    rng = np.random.default_rng(1)
    bank = [jnp.asarray(rng.normal(size=(6, s, s, 16)), jnp.float32) for s in (2, 1)]
    ref_means = [f[:5].mean(0) for f in bank]
    heads = DRAHeads(0.1)
    v = jax.jit(heads.init)(jax.random.key(0), bank, ref_means)
    trained = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 2.0, a.shape), a.dtype),
                           v["batch_stats"])
    base = {"params": {"heads": v["params"]}, "batch_stats": {"heads": trained}}
    hm, params = ahl.head_model(config, base, ref_means)
    fresh_hm, _ = ahl.head_model(config, base, ref_means, fresh=True)
    out, fresh_out = jax.jit(hm.apply)(params, bank), jax.jit(fresh_hm.apply)(params, bank)
    bn = v["batch_stats"]["residual"]["bn"]  # new statistics, as PyTorch's: mean 0, var 1
    assert not np.any(bn["mean"]) and np.all(bn["var"] == 1)
    want = jax.jit(heads.apply)(v, bank, ref_means)
    np.testing.assert_allclose(fresh_out["residual"], want["residual"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out["residual"], fresh_out["residual"], rtol=1e-3)
    for h in ("seen", "pseudo", "normality"):
        np.testing.assert_array_equal(out[h], fresh_out[h])


def test_padded_samples_change_nothing():
    hm, params, bank = _devnet_head_model()
    _, task_loss, _ = ahl.make_meta_step(hm, optax.sgd(1.0), 1, 0.1, False)
    task_loss = jax.jit(task_loss)
    idx = jnp.array([0, 1, 2, NN, NN + 1])
    lab = jnp.array([0, 0, 0, 1, 1])
    key = jax.random.key(7)
    base = task_loss(params, bank, idx, lab, jnp.ones(5), key)
    padded = task_loss(params, bank, jnp.concatenate([idx, jnp.array([5, NN + 2, 9])]),
                       jnp.concatenate([lab, jnp.array([0, 1, 0])]),
                       jnp.concatenate([jnp.ones(5), jnp.zeros(3)]), key)
    assert float(base) == pytest.approx(float(padded), rel=1e-6)


def test_head_scores_in_padded_batches_equal_one_batch():
    """make_head_scorer scores in batches of one size, the last padded (one program, not
    one more for the remainder): the padding changes no score."""
    hm, params, bank = _dra_head_model()
    feats = [np.asarray(f[:11]) for f in bank]
    whole = ahl.make_head_scorer(hm, 11)(hm, params, feats)
    np.testing.assert_allclose(ahl.make_head_scorer(hm, 4)(hm, params, feats), whole,
                               rtol=1e-5, atol=1e-6)
    assert whole.shape == (11,)


def test_head_functions_and_their_scorer_are_made_once_per_settings(caplog):
    """Another seed's head model (its own consts: other BatchNorm statistics and
    reference means) holds the same functions, so the programs built on them (the
    meta-step, the head scorer) are traced once per process, not per seed; other settings
    make other functions."""
    hm, params, bank = _dra_head_model()
    stats = jax.tree.map(lambda a: a + 1.0, hm.consts["batch_stats"])
    other_seed, _ = ahl.head_model(tiny_config("ahl_dra"), {
        "params": {"heads": params}, "batch_stats": {"heads": stats}},
        [f[5:10].mean(0) for f in bank])
    assert other_seed.fns == hm.fns and other_seed.init_with is hm.init_with
    feats = [np.asarray(f[:6]) for f in bank]
    first = ahl.make_head_scorer(hm, 6)(hm, params, feats)
    with compiled_programs(caplog) as compiled:
        second = ahl.make_head_scorer(other_seed, 6)(other_seed, params, feats)
    assert compiled == []
    assert not np.allclose(first, second)  # its own consts, as an argument
    config = tiny_config("ahl_dra")
    config.loss.margin = 4.0
    other_margin, _ = ahl.head_model(config, {"params": {"heads": params},
                                              "batch_stats": {"heads": stats}}, None)
    assert other_margin.losses is not hm.losses
    devnet, _, _ = _devnet_head_model()
    assert devnet.apply_with is not hm.apply_with


def test_importance_weights_favour_the_accurate_model():
    labels = np.array([0, 0, 1, 1, 1, 0])
    pred = np.stack([labels * 5.0, (1 - labels) * 5.0, np.full(6, 2.5)], axis=1)  # [P, T]
    coef = np.ones((3, 6), np.float32)
    w = ahl.importance_weights(pred, labels, coef)
    assert w.sum() == pytest.approx(1.0, abs=1e-6) and w[0] > w[2] > w[1]
    coef[0, :] = 0.0
    coef[0, 2] = 1.0  # model 0 judged on one sample it gets right
    assert ahl.importance_weights(pred, labels, coef)[0] == pytest.approx(w.max(), rel=1e-5)


def test_score_sequence_model_shapes():
    m = ScoreSequenceModel(num_tasks=7)
    v = jax.jit(m.init)(jax.random.key(0), jnp.zeros((4, 5, 7)))
    assert jax.jit(m.apply)(v, jnp.ones((3, 5, 7))).shape == (3, 7)


def test_the_sequence_model_runs_in_float64():
    """With JAX_ENABLE_X64 and model.dtype=float64 (the README's numerical checks),
    flax's float32 zero carries broke the LSTM's scan on the float64 features (a
    walkthrough's AHL traceback); float32 inputs give what they gave."""
    from jax import experimental
    enable_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else experimental.enable_x64
    with enable_x64(True):
        for torch_modules in (False, True):
            m = ScoreSequenceModel(7, torch_modules=torch_modules)
            x = jax.random.normal(jax.random.key(1), (4, 5, 7), jnp.float64)
            variables = m.init(jax.random.key(0), x)
            wide, narrow = m.apply(variables, x), m.apply(variables, x.astype(jnp.float32))
            assert wide.dtype == jnp.float64 and narrow.dtype == jnp.float32
            np.testing.assert_allclose(wide, narrow, rtol=1e-5, atol=1e-6)


def test_released_psi_init_dropout_and_initial_state():
    """The released psi's modules (`released_psi`; their outputs and Adam step against
    PyTorch's are in test_released_parity.py): PyTorch's init bounds; dropout on only
    with a key, between the LSTM layers: not after the last one (a model whose first
    layer's output is all 0 is unchanged by it), not on the input alone (a zero input
    is changed by it); the initial state matters."""
    from fsad.models.sequence import released_initial_state
    m = ScoreSequenceModel(7, hidden=6, fc=0, dropout=0.5, torch_modules=True)
    p = m.init(jax.random.key(0), jnp.zeros((1, 5, 7)))["params"]
    bound = 1 / np.sqrt(6)
    cells = [p[f"TorchLSTMCell_{i}"] for i in range(4)]
    assert all(float(jnp.abs(w).max()) <= bound for c in cells for w in c.values())
    assert cells[0]["weight_ih"].shape == (7, 24) and cells[2]["weight_ih"].shape == (12, 24)
    assert float(jnp.abs(p["out"]["kernel"]).max()) <= 1 / np.sqrt(12)
    x = jax.random.normal(jax.random.key(1), (8, 5, 7))
    plain = m.apply({"params": p}, x)
    k1, k2 = jax.random.key(2), jax.random.key(3)
    assert np.array_equal(m.apply({"params": p}, x, None, k1), m.apply({"params": p}, x, None, k1))
    assert not np.allclose(m.apply({"params": p}, x, None, k1), m.apply({"params": p}, x, None, k2))
    assert np.array_equal(plain, ScoreSequenceModel(7, 6, 0, torch_modules=True).apply(
        {"params": p}, x))
    # layer 0 silenced: its outputs are 0, and dropout (between the layers) changes nothing
    silent = {**p, **{f"TorchLSTMCell_{i}": jax.tree.map(jnp.zeros_like, cells[i])
                      for i in (0, 1)}}
    np.testing.assert_array_equal(m.apply({"params": silent}, x, None, k1),
                                  m.apply({"params": silent}, x))
    zero = jnp.zeros_like(x)  # dropout of the input would change nothing here
    assert not np.allclose(m.apply({"params": p}, zero, None, k1), m.apply({"params": p}, zero))
    state = released_initial_state(jax.random.key(4), 2, 8, 6)
    assert state[0].shape == (4, 8, 6) and float(state[0].min()) >= 0
    # the first 5 sequences' states are the same whatever follows them (a padded pool)
    for s8, s5 in zip(state, released_initial_state(jax.random.key(4), 2, 5, 6)):
        np.testing.assert_array_equal(s8[:, :5], s5)
    assert not np.allclose(m.apply({"params": p}, x, state), plain)


def test_another_seeds_meta_step_is_served_by_the_compilation_cache():
    """Two seeds' DRA heads (other BatchNorm statistics and reference means, as two
    trained base models have) give the same compiled meta-step: the second is a hit of
    the persistent compilation cache (the suite enables it), not a new compilation.
    Closed over, those arrays would be constants of the program and miss the cache."""
    from jax import monitoring
    events = []

    def listen(name, **kw):
        events.append(name)

    monitoring.register_event_listener(listen)
    try:
        config = tiny_config("ahl_dra")
        tasks = ahl.build_tasks(TWO_CLUSTERS, NN, NA, seed=0)
        _, params, bank = _dra_head_model()
        rng = np.random.default_rng(4)
        for seed in range(2):
            stats = jax.jit(DRAHeads(0.1).init)(jax.random.key(seed), [f[:2] for f in bank],
                                                [f[0] for f in bank])["batch_stats"]
            stats = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 2, a.shape), a.dtype),
                                 stats)
            refs = [jnp.asarray(rng.normal(size=f.shape[1:]), jnp.float32) for f in bank]
            hm, _ = ahl.head_model(config, {"params": {"heads": params},
                                            "batch_stats": {"heads": stats}}, refs)
            tx = optax.adam(1e-3)
            step, _, _ = ahl.make_meta_step(hm, tx, 1, 0.05, True)
            events.clear()
            out = step(params, tx.init(params), bank, tasks.device_arrays(),
                       jnp.full((tasks.num_tasks,), 1 / tasks.num_tasks),
                       jnp.asarray(tasks.pool_idx), jax.random.key(0))
            jax.block_until_ready(out)
            compiled = [e for e in events if e.startswith("/jax/compilation_cache/cache_")]
    finally:  # the rest of the suite's compilations are not collected
        unregister = getattr(monitoring, "unregister_event_listener", None)
        if unregister is None:  # not public in older JAX (0.7.0)
            from jax._src.monitoring import _unregister_event_listener_by_callback as unregister
        unregister(listen)
    assert compiled == ["/jax/compilation_cache/cache_hits"], compiled


def test_meta_training_compiles_each_step_once_and_resumes_without_a_new_program(
        tmp_path, caplog, capsys):
    """Every meta-epoch's inputs sit where the step's outputs do (replicated on the mesh),
    so the meta-step and psi's train step are one program each for the whole run. Before,
    epoch 0's fresh arrays and epoch 1's step outputs were two placements: two compiles
    of each. The jitted meta-step and psi's functions are made once per process for their
    settings (`meta_step_program`, `make_psi_fns`), so a run resumed from its checkpoint
    traces neither again (made per run, each was traced anew). Another seed's clusters
    with another shot count (4 seen anomalies, not 10) give other set widths, pool and
    bank sizes; padded to one bucket (`fsad.buckets`), its meta-step and psi's steps are
    the programs of the first run: nothing is traced or compiled."""
    from fsad.methods.ahl import importance, meta_step
    config = tiny_config("ahl_devnet")
    # T = 7 tasks and K = 2, as the end-to-end AHL run: psi's init is one program for both
    config.ahl.epochs, config.ahl.history, config.ahl.psi_steps = 4, 2, 1
    config.ahl.first_order = True  # DevNet's heads: the same update, a quicker compile
    config.checkpoint_seconds = 1e6  # a checkpoint where a run ends (stop_after) only
    hm, params, bank = _devnet_head_model()
    tasks = ahl.build_tasks(CLUSTERS, NN, NA, seed=0)
    assert tasks.num_tasks == 7
    # the programs made anew: another test of this worker may have made them already
    meta_step.meta_step_program.cache_clear()
    importance._psi_fns.cache_clear()
    names = ("step_with", "train_step", "predict")

    def compiles(bank, tasks, workdir, **kw):
        with compiled_programs(caplog) as compiled:
            _, info = ahl.run_meta_training(config, hm, params, bank, tasks,
                                            jax.random.key(0), workdir, **kw)
        return info, {n: compiled.count(n) for n in names}

    # epochs 0 and 1; psi trains from epoch index K = 2 on (a window and its next epoch)
    info, counts = compiles(bank, tasks, str(tmp_path), stop_after=2)
    assert len(info["loss"]) == 2
    assert counts == {"step_with": 1, "train_step": 0, "predict": 0}
    assert os.listdir(tmp_path / "ahl_checkpoints") == ["2"]
    # resumed: epochs 2 and 3 from the restored state, psi trained in both
    capsys.readouterr()
    info, counts = compiles(bank, tasks, str(tmp_path))
    assert "(resumed at epoch 2)" in capsys.readouterr().err  # said on the bar
    assert info["resumed_from"] == 2
    assert len(info["loss"]) == 4
    assert counts == {"step_with": 0, "train_step": 1, "predict": 1}
    assert sorted(os.listdir(tmp_path / "ahl_checkpoints")) == ["2", "4"]
    assert info["weights"][3] != info["weights"][2]  # psi's weights were used
    # another seed's tasks on 4 seen anomalies: the programs above, nothing traced anew
    other = ahl.build_tasks([np.arange(0, 12), np.arange(12, 21), np.arange(21, 30)], NN, 4,
                            seed=1)
    assert other.query_idx.shape != tasks.query_idx.shape
    assert len(other.pool_idx) != len(tasks.pool_idx)
    four_shots = [jnp.concatenate([b[:NN + 4], b[NN + NA:]]) for b in bank]
    info, counts = compiles(four_shots, other, None)
    assert len(info["loss"]) == 4 and counts == {n: 0 for n in names}


def test_tasks_padded_to_the_bucket_give_the_same_meta_step():
    """The task sets' widths, the pool and the bank padded to ROWS_BUCKET (as
    run_meta_training passes them): the same losses, update and pool scores as the
    unpadded arrays."""
    from fsad.buckets import ROWS_BUCKET, pad_to
    hm, params, bank = _devnet_head_model()
    tasks = ahl.build_tasks(TWO_CLUSTERS, NN, NA, seed=0)
    weights = jnp.asarray(np.random.default_rng(1).dirichlet(np.ones(tasks.num_tasks)),
                          jnp.float32)
    tx = optax.sgd(1.0)
    step, _, _ = ahl.make_meta_step(hm, tx, 2, 0.05, True)
    padded_bank = [pad_to(b, tasks.padded_bank_rows(ROWS_BUCKET)) for b in bank]
    P = len(tasks.pool_idx)
    arrays = tasks.device_arrays(ROWS_BUCKET)
    assert padded_bank[0].shape[0] == 192 and arrays["query_idx"].shape[1] == ROWS_BUCKET
    assert len(tasks.padded_pool_idx(ROWS_BUCKET)) == ROWS_BUCKET > P
    outs = [step(params, tx.init(params), b, t, weights, pool, jax.random.key(3))
            for b, t, pool in [(bank, tasks.device_arrays(), jnp.asarray(tasks.pool_idx)),
                               (padded_bank, arrays, tasks.padded_pool_idx(ROWS_BUCKET))]]
    (new, _, out), (new_p, _, out_p) = outs
    np.testing.assert_allclose(out_p["task_losses"], out["task_losses"], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out_p["pool_scores"])[:, :P], out["pool_scores"],
                               rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(new_p), jax.tree.leaves(new)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_ctrl_c_in_meta_training_saves_its_last_finished_epoch(tmp_path, monkeypatch):
    """Between checkpoints (a pace longer than the run), Ctrl-C during meta-epoch 3
    saves epoch 2's state, and the rerun goes on from there to the weights of an
    uninterrupted run: with the released psi, whose dropout masks and initial states
    come from keys of the epoch, not from a stream a resume would restart (and the
    released errors r_i)."""
    from fsad.config import released_psi
    from fsad.methods.ahl import meta_train as mt
    config = released_psi(tiny_config("ahl_devnet", **{"ahl.errors": "released"}))
    # K = 1: psi trains from epoch 1 on, before the interruption and after it
    config.ahl.epochs, config.ahl.history, config.ahl.psi_steps = 4, 1, 1
    config.ahl.first_order = True
    config.checkpoint_seconds = 1e6
    hm, params, bank = _devnet_head_model()
    tasks = ahl.build_tasks(CLUSTERS, NN, NA, seed=0)
    fitted = mt.fitted_meta_step

    def ctrl_c_at_the_third_call(*args):
        step, calls = fitted(*args), []

        def stepped(*a):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return step(*a)
        return stepped

    monkeypatch.setattr(mt, "fitted_meta_step", ctrl_c_at_the_third_call)
    with pytest.raises(KeyboardInterrupt):
        mt.run_meta_training(config, hm, params, bank, tasks, jax.random.key(0), str(tmp_path))
    assert os.listdir(tmp_path / "ahl_checkpoints") == ["2"]
    monkeypatch.undo()
    _, info = mt.run_meta_training(config, hm, params, bank, tasks, jax.random.key(0),
                                   str(tmp_path))
    assert len(info["loss"]) == 4 and sorted(os.listdir(tmp_path / "ahl_checkpoints")) == [
        "2", "4"]
    predictions = []  # psi's, as the released errors take them

    def released_errors(pred, *args):
        predictions.append(pred)
        return errors(pred, *args)
    errors = mt.released_errors
    monkeypatch.setattr(mt, "released_errors", released_errors)
    _, whole = mt.run_meta_training(config, hm, params, bank, tasks, jax.random.key(0), None)
    assert info["weights"] == whole["weights"] and info["loss"] == whole["loss"]
    assert info["weights"][3] != info["weights"][2]  # psi's weights were used
    # a call of psi per query set, each its own dropout masks and initial state
    T, P = tasks.num_tasks, len(tasks.pool_idx)
    assert len(predictions) == 3 and all(p.shape == (T, P, T) for p in predictions)
    assert not np.allclose(predictions[0][0], predictions[0][1])


def test_the_released_last_meta_epoch_computes_but_updates_nothing():
    """ahl.update_last_epoch=False (`:released`): the last meta-epoch's losses are as
    before, and its heads are those the epoch before left (the released optimizer.step()
    at an epoch's start applies the previous epoch's gradient: the last never lands)."""
    config = tiny_config("ahl_devnet")
    config.ahl.epochs, config.ahl.history, config.ahl.first_order = 2, 1, True
    hm, params, bank = _devnet_head_model()
    tasks = ahl.build_tasks(CLUSTERS, NN, NA, seed=0)

    def run(**kw):
        return ahl.run_meta_training(config, hm, params, bank, tasks, jax.random.key(0), None, **kw)

    after_two, every = run()
    after_one, _ = run(stop_after=1)
    config.ahl.update_last_epoch = False
    released, last_dropped = run()
    assert last_dropped["loss"] == every["loss"]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(released),
                                                     jax.tree.leaves(after_one)))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(released),
                                                         jax.tree.leaves(after_two)))


def test_scoring_takes_the_heads_of_a_finished_meta_training_only(tmp_path):
    """--mode score on an AHL run (`ahl.unified_heads_of`): the newest meta-training
    checkpoint's head params, read without a model to restore into, once every
    meta-epoch is done; before that, a UserError saying how far it got."""
    from fsad.checkpoints import checkpoint_manager, save_checkpoint
    config = tiny_config("ahl_devnet")
    config.ahl.epochs = 4
    with pytest.raises(UserError, match=r"not finished \(it has no checkpoint of 4\)"):
        ahl.unified_heads_of(config, str(tmp_path))
    mngr = checkpoint_manager(str(tmp_path / "ahl_checkpoints"), 2)
    heads = {"conv": {"kernel": jnp.arange(6.0).reshape(1, 1, 6, 1), "bias": jnp.ones(1)}}
    save_checkpoint(mngr, 2, {"epoch": jnp.int32(2), "params": jax.tree.map(jnp.zeros_like,
                                                                              heads)})
    with pytest.raises(UserError, match=r"\(it stopped after meta-epoch 2 of 4\); finish it"):
        ahl.unified_heads_of(config, str(tmp_path))
    save_checkpoint(mngr, 4, {"epoch": jnp.int32(4), "params": heads})
    mngr.close()
    got = ahl.unified_heads_of(config, str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, got, heads)


@pytest.mark.parametrize("base", ["dra", "devnet"])
def test_chunked_or_one_by_one_meta_step_equals_the_whole_vmapped_sets(base):
    """ahl.chunk_size: the second-order meta-step taking 7 samples of a set at a time (the
    sets hold 20: the last chunk is padded) gives the whole sets' losses, update and pool
    scores, up to the order of the sums (first order is the same code, its inner
    gradients cut from the graph). Each head's loss is a weighted
    mean over its samples, so a chunk's mean must count by its share of the set's
    weight: plain chunk means would be off by far more than the tolerance.
    ahl.task_batching: the tasks one after another (map: a loop in the program, where
    vmap has none) give the vmapped tasks' figures too, chunked or not."""
    hm, params, bank = _dra_head_model() if base == "dra" else _devnet_head_model()
    tasks = ahl.build_tasks(TWO_CLUSTERS, NN, NA, seed=0)
    assert tasks.support_idx.shape[1] % 7 and tasks.query_idx.shape[1] > 7
    weights = jnp.asarray(np.random.default_rng(1).dirichlet(np.ones(tasks.num_tasks)),
                          jnp.float32)
    tx = optax.sgd(1.0)
    got = {}
    for chunk, batching in ((0, "vmap"), (7, "vmap"), (0, "map"), (7, "map")):
        step, _, _ = ahl.make_meta_step(hm, tx, 2, 0.05, False, chunk=chunk,
                                        task_batching=batching)
        args = (params, tx.init(params), bank, tasks.device_arrays(), weights,
                jnp.asarray(tasks.pool_idx), jax.random.key(3))
        if not chunk:  # chunks are a scan of their own
            assert ("scan[" in str(jax.make_jaxpr(step.jitted)(*args, hm.consts))) == (
                batching == "map")
        got[chunk, batching] = step(*args)
    whole, _, out = got.pop((0, "vmap"))
    for other, _, out_o in got.values():
        np.testing.assert_allclose(out_o["task_losses"], out["task_losses"], rtol=1e-5)
        np.testing.assert_allclose(out_o["pool_scores"], out["pool_scores"], rtol=1e-5,
                                   atol=1e-6)
        for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(whole)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_the_released_loss_scales():
    """ahl.loss_scale and ahl.query_batches (`:released`: 4/3 on AHL(DevNet), 20). The
    released AHL(DevNet) loss, a seen and a pseudo deviation loss over one balanced batch
    (each with the other anomaly kind's scores replaced by their label, constants), has
    4/3 of the gradient of fsad's class-balanced loss; and the meta-step with the scales
    equals one whose inner lr is times loss_scale, its query losses and outer gradient
    times loss_scale * query_batches."""
    from fsad.config import released_ahl
    from fsad.losses import deviation_loss, sample_prior
    n = 4
    labels = jnp.asarray([ahl.NORMAL] * n + [ahl.SEEN] * n + [ahl.PSEUDO] * n)
    scores = jnp.asarray(np.random.default_rng(0).normal(2.0, 2.0, 3 * n), jnp.float32)
    prior = sample_prior(jax.random.key(0), 5000)

    def released(s):
        y = labels > 0
        aug = jnp.where(labels == ahl.SEEN, 1.0, s)
        seen = jnp.where(labels == ahl.PSEUDO, 1.0, s)
        return deviation_loss(aug, y, prior) + deviation_loss(seen, y, prior)

    def balanced(s):
        return deviation_loss(s, labels > 0, prior,
                              mask=jnp.asarray(ahl.class_balance(np.asarray(labels), "devnet")))
    np.testing.assert_allclose(jax.grad(released)(scores), 4 / 3 * jax.grad(balanced)(scores),
                               rtol=1e-5, atol=1e-7)
    assert released_ahl(tiny_config("ahl_devnet")).ahl.loss_scale == pytest.approx(4 / 3)
    assert (released_ahl(tiny_config("ahl_dra")).ahl.loss_scale,
            released_ahl(tiny_config("ahl_dra")).ahl.query_batches) == (1.0, 20)

    hm, params, bank = _dra_head_model()
    tasks = ahl.build_tasks(TWO_CLUSTERS, NN, NA, seed=0)
    weights = jnp.asarray(np.random.default_rng(1).dirichlet(np.ones(tasks.num_tasks)),
                          jnp.float32)
    tx = optax.sgd(1.0)  # params_new = params - grad
    args = (params, tx.init(params), bank, tasks.device_arrays(), weights,
            jnp.asarray(tasks.pool_idx), jax.random.key(3))
    plain, _, out = ahl.make_meta_step(hm, tx, 2, 0.05 * 1.5, False)[0](*args)
    scaled, _, out_s = ahl.make_meta_step(hm, tx, 2, 0.05, False, loss_scale=1.5,
                                          query_batches=4)[0](*args)
    np.testing.assert_allclose(out_s["task_losses"], 6 * np.asarray(out["task_losses"]),
                               rtol=1e-5)
    for a, b, p in zip(*map(jax.tree.leaves, (scaled, plain, params))):
        np.testing.assert_allclose(np.asarray(a) - p, 6 * (np.asarray(b) - p), rtol=1e-4,
                                   atol=1e-6)


def test_a_meta_step_larger_than_free_memory_takes_its_sets_in_chunks(caplog):
    """ahl.chunk_size=0 (auto): where the whole task sets do not fit the free memory (3
    tasks of 2**22 support and query samples, compiled from shapes alone: no array that
    large is made), the meta-step takes 256 samples of a set at a time, and says so. A
    chunk size that does not fit either is refused before any step, in one line."""
    from fsad.memory import free_bytes
    from fsad.mesh import one_device_mesh
    free = free_bytes(jax.devices()[:1]) or 0
    if free > 150 * 2**30:  # the whole sets' program needs 162 GiB (measured), 256 at a
        # time 0.6 GiB
        pytest.skip("this machine has more than 150 GiB free: the whole sets might fit")
    hm, params, bank = _dra_head_model()
    T, S = 3, 2**22
    tasks = {k: jax.ShapeDtypeStruct((T, S), jnp.int32 if k.endswith(("idx", "lab")) else
                                     jnp.float32)
             for k in ("support_idx", "support_lab", "support_weight", "query_idx",
                       "query_lab", "query_weight")}
    tx = optax.adam(1e-3)
    args = (params, tx.init(params), bank, tasks, jnp.full((T,), 1 / T),
            jnp.arange(40), jax.random.key(0), hm.consts)
    config = tiny_config("ahl_dra")
    config.ahl.first_order = True  # the quicker compile: chunks serve both orders alike
    with caplog.at_level("WARNING"):
        compiled = ahl.fitted_meta_step(hm, tx, config.ahl, one_device_mesh(), args)
    assert "takes 256 samples of a set at a time" in caplog.text
    assert compiled.memory_analysis().temp_size_in_bytes < free
    config.ahl.chunk_size = S
    with pytest.raises(UserError, match=r"^AHL's meta-step \(4194304 samples of a set at a "
                       r"time\) needs [0-9.]+ GiB of memory and this machine has [0-9.]+ GiB "
                       r"free; lower --config.ahl.chunk_size \(now 4194304\)$"):
        ahl.fitted_meta_step(hm, tx, config.ahl, one_device_mesh(), args)


def test_dropped_clusters_are_said(caplog):
    """k-means clusters of fewer than 3 normals are dropped: a warning names how many
    clusters, normals and tasks are left (a run otherwise shows fewer tasks unexplained)."""
    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(0, 0.1, (10, 4)), rng.normal(5, 0.1, (10, 4)),
                            rng.normal(-40, 0.1, (2, 4))]).astype(np.float32)
    images = np.zeros((22, 8, 8, 3), np.uint8)
    with caplog.at_level("WARNING"):
        clusters, _ = ahl.normal_clusters(feats, images, 3, seed=0, cluster_on="features")
    assert sorted(len(c) for c in clusters) == [10, 10]
    assert ("kept 2 of ahl.clusters=3 clusters" in caplog.text
            and "their 2 of 22 normals): 2 cluster-pair tasks instead of 6" in caplog.text)
