"""Mixed precision (`model.dtype`, fsad.precision): bfloat16 is the default on GPU/TPU,
where no test runs, so its path is checked here on the CPU. The train step computes its
convolutions in bfloat16 and keeps float32 parameters, statistics, optimiser state and
losses; bfloat16 scores and saliency maps follow float32's.

One bfloat16 train step's update is not compared with float32's: at random init many
deviations sit near zero, where bfloat16 rounding flips the sign of d|dev|/d dev and
moves top-K's picks (measured: one SGD step of DRA on two scales, the updates 33%
apart, median over the leaves)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import norm_rel_err, tiny_config
from fsad.errors import UserError
from fsad.explain import method_saliency_fn
from fsad.mesh import make_mesh
from fsad.methods import build_method
from fsad.precision import compute_dtype
from fsad.train import init_state, make_score_fn, make_train_step, put_train_data, variables_of


def test_auto_is_float32_on_cpu_and_other_names_are_refused():
    assert jax.default_backend() == "cpu" and compute_dtype("auto") == jnp.float32
    assert compute_dtype("bfloat16") == jnp.bfloat16
    with pytest.raises(UserError, match="use auto, float32 or bfloat16"):
        compute_dtype("float16")
    # float64 (numerical checks, tests/test_train.py) only in JAX's 64-bit mode: without
    # it JAX would compute in float32 and say nothing
    assert not jax.config.jax_enable_x64
    with pytest.raises(UserError, match="JAX_ENABLE_X64=1"):
        compute_dtype("float64")


def test_bfloat16_dra_computes_in_bfloat16_and_keeps_float32_state(synthetic):
    """DRA: the trunk, all four heads and the reference path. Per dtype: the train step's
    program (lowered, not compiled), its output types, and the test scores and saliency
    maps of the same initial model."""
    mesh = make_mesh(jax.devices()[:1])
    data = put_train_data(synthetic.images[synthetic.labels == 0][:30],
                          synthetic.images[synthetic.labels == 1][:4], mesh)
    images = synthetic.images[:16]
    configs = {name: tiny_config("dra", **{"model.dtype": name, "model.n_scales": 1})
               for name in ("float32", "bfloat16")}
    methods = {name: build_method(config) for name, config in configs.items()}
    # one initial model for both: the parameters are float32 whatever the compute dtype
    tx = methods["float32"].optimizer(configs["float32"].steps_per_epoch)
    state = init_state(methods["float32"], jax.random.key(0), data, tx, mesh)
    variables = variables_of(state)
    out = {}
    for name, config in configs.items():
        method = methods[name]
        step = make_train_step(method, tx, mesh, config.batch_size)
        program = step.lower(state, data, jax.random.key(1)).as_text()
        convs = re.findall(r"stablehlo\.convolution.*", program)
        new_state, metrics = jax.eval_shape(step, state, data, jax.random.key(1))
        out[name] = {
            "convs": len(convs), "bf16_convs": sum("bf16" in c for c in convs),
            "bf16_anywhere": "bf16" in program,
            "state": {str(x.dtype) for x in jax.tree.leaves(
                (new_state.params, new_state.batch_stats, new_state.opt_state))
                if jnp.issubdtype(x.dtype, jnp.floating)},
            "metrics": {str(x.dtype) for x in jax.tree.leaves(metrics)},
            "scores": jax.device_get(make_score_fn(method, mesh)(variables, images)),
            "saliency": np.asarray(method_saliency_fn(method, config)(
                variables, images[:4].astype(np.float32))),
        }
    f32, bf16 = out["float32"], out["bfloat16"]
    assert f32["convs"] > 20 and not f32["bf16_anywhere"]
    assert bf16["convs"] == f32["convs"] == bf16["bf16_convs"]  # every conv, both passes
    assert f32["state"] == bf16["state"] == {"float32"}
    assert f32["metrics"] == bf16["metrics"] == {"float32"}
    assert set(bf16["scores"]) == {"score", "seen", "pseudo", "residual", "normality"}
    for head, s in bf16["scores"].items():
        assert s.dtype == np.float32, head
        # measured: relative error 0.005 (seen) to 0.055 (residual), correlation > 0.995
        assert norm_rel_err(f32["scores"][head], s) < 0.15, head
        assert np.corrcoef(f32["scores"][head], s)[0, 1] > 0.98, head
    assert bf16["saliency"].dtype == np.float32 and np.isfinite(bf16["saliency"]).all()
    # measured: relative error 0.023, correlation 0.9987
    assert np.corrcoef(f32["saliency"].ravel(), bf16["saliency"].ravel())[0, 1] > 0.99


def test_bfloat16_lite0_computes_in_bfloat16():
    """The EfficientNet-Lite0 trunk too: every convolution and matmul of DevNet's train
    step in bfloat16, its depthwise convs as XLA's grouped convolutions (`grouped`) so
    that the program shows them. (Its input rescaling once multiplied by float32
    constants, which promoted the trunk, and every layer after, to float32.) Lowered,
    not compiled."""
    mesh = make_mesh(jax.devices()[:1])
    rng = np.random.default_rng(0)
    data = put_train_data(rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
                          rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), mesh)
    config = tiny_config("devnet", **{"model.backbone": "efficientnet_lite0",
                                      "model.dtype": "bfloat16", "model.n_scales": 1,
                                      "model.depthwise_conv": "grouped"})
    m = build_method(config)
    tx = m.optimizer(config.steps_per_epoch)
    state = init_state(m, jax.random.key(0), data, tx, mesh)
    program = make_train_step(m, tx, mesh, config.batch_size).lower(
        state, data, jax.random.key(1)).as_text()
    ops = re.findall(r"stablehlo\.(?:convolution|dot_general).*", program)
    # Lite0's 16 depthwise, 16 + 16 1x1 convs, stem and head, forward and backward
    assert len(ops) > 100 and all("bf16" in op for op in ops), len(ops)
