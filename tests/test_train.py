"""The shared loop: sharded step == single-device step, on-device sampling, resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import SIZE, tiny_config
from fsad.methods import build_method
from fsad.train import (fit, init_state, make_mesh, make_train_step, put_train_data,
                        sample_balanced)


def _setup(devices, synthetic, tx=None, **overrides):
    config = tiny_config(**{"data.img_size": synthetic.images.shape[1], **overrides})
    method = build_method(config)
    mesh = make_mesh(devices)
    tx = tx or method.optimizer(config.steps_per_epoch)
    normal = synthetic.images[synthetic.labels == 0][:40]
    anomaly = synthetic.images[synthetic.labels == 1][:5]
    data = put_train_data(normal, anomaly, mesh)
    state = init_state(method, jax.random.key(0), data, tx, mesh)
    return method, mesh, tx, state, data


def _rel_err(a, b):
    """Norm-wise relative error, the measure that suits float reductions."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12)


def test_eight_devices_match_one(tmp_path):
    """One step, plain SGD: the sharded forward/backward and global BatchNorm statistics
    match one device. (Adam's first step is lr * sign(g), which would turn reduction-order
    noise in near-zero gradients into lr-sized differences.) 64 px and one pyramid scale so
    that BatchNorm's last stage normalises over 64 values, not 16 single pixels (the half
    scale's 1x1 map) that magnify float noise; no rotation, whose nearest-pixel rounding
    can pick another pixel when the sharded program fuses its float arithmetic otherwise."""
    assert jax.device_count() == 8, "conftest forces 8 CPU devices"
    from fsad.data import read_folder
    from fsad.data.synthetic import write_synthetic_dataset
    syn = read_folder(write_synthetic_dataset(str(tmp_path / "s64"), size=64, n_train=40,
                                              n_test_good=4, n_per_class=2), 64, "")
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        method, mesh, tx, state, data = _setup(devices, syn, optax.sgd(0.05),
                                               **{"model.n_scales": 1,
                                                  "augment.rotate_degrees": 0.0})
        init = jax.device_get(state.params)
        step = make_train_step(method, tx, mesh, 16)
        state, metrics = step(state, data, jax.random.key(10))
        update = jax.tree.map(lambda new, old: np.asarray(new) - old, jax.device_get(state.params),
                              init)
        results.append((update, jax.device_get(state.batch_stats), float(metrics["loss"])))
        if len(devices) == 8:
            leaf = jax.tree.leaves(state.params)[0]
            assert len(leaf.sharding.device_set) == 8  # replicated over the mesh
    (u1, b1, l1), (u8, b8, l8) = results
    assert l1 == pytest.approx(l8, rel=1e-5)
    errs = [_rel_err(a, b) for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u8))]
    print(f"update rel. err: max {max(errs):.2e}, median {np.median(errs):.2e}")
    # measured: max 4.7e-5, median 1.7e-5 (float32 reduction order over 8 devices)
    assert max(errs) < 1e-3, max(errs)
    assert float(np.median(errs)) < 5e-5
    for a, b in zip(jax.tree.leaves(b1), jax.tree.leaves(b8)):
        assert _rel_err(a, b) < 1e-5


def test_batch_not_divisible_is_refused(synthetic):
    method, mesh, tx, state, data = _setup(jax.devices(), synthetic)
    with pytest.raises(ValueError, match="multiple of 8"):
        make_train_step(method, tx, mesh, 12)


def test_sample_balanced_draws_from_the_right_rows():
    mesh = make_mesh(jax.devices()[:1])
    normal = np.zeros((7, 4, 4, 3), np.uint8)
    anomaly = np.full((3, 4, 4, 3), 255, np.uint8)
    data = put_train_data(normal, anomaly, mesh)
    images, labels = jax.jit(lambda d, k: sample_balanced(d, k, 0, 48, 1 / 3))(
        data, jax.random.key(0))
    assert images.shape == (48, 4, 4, 3) and int(labels.sum()) == 16
    np.testing.assert_array_equal(np.asarray(images).max(axis=(1, 2, 3)), 255 * labels)


def test_resume_equals_uninterrupted(synthetic, tmp_path):
    method, mesh, tx, state0, data = _setup(jax.devices()[:1], synthetic)
    key = jax.random.key(5)
    init = jax.device_get(state0)
    full, _ = fit(method, jax.device_put(init), tx, data, mesh, key, 16, 2, 3, None)
    work = str(tmp_path / "run")
    half, info = fit(method, jax.device_put(init), tx, data, mesh, key, 16, 1, 3, work)
    assert int(half.step) == 3 and info["resumed_from"] == 0
    resumed, info = fit(method, jax.device_put(init), tx, data, mesh, key, 16, 2, 3, work)
    assert info["resumed_from"] == 3 and info["steps"] == 3 and int(resumed.step) == 6
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(full.opt_state), jax.tree.leaves(resumed.opt_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
