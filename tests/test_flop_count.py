"""benchmarks/flop_count.py against counts written out by hand, and against XLA's CPU
count of a whole train step (the count that XLA's GPU compile loses to cuDNN)."""
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from benchmarks.flop_count import jaxpr_flops, step_flops

DN = ("NHWC", "HWIO", "NHWC")


def conv(x, w, stride=1, groups=1):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=DN,
                                        feature_group_count=groups)


@pytest.mark.parametrize("stride, groups", [(1, 1), (2, 1), (1, 4), (2, 8)])
def test_a_convolution_and_its_two_gradients(stride, groups):
    """Forward: 2 x outputs x kernel taps per output (input features of a group x 3 x 3).
    The weight and input gradients each cost the forward again, for strided (the input
    gradient's inserted zeros are not counted) and grouped (the weight gradient is a
    batch-grouped convolution) ones alike."""
    x, w = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8 // groups, 16))
    side = 16 // stride
    forward = 2 * (2 * side * side * 16) * (8 // groups * 9)
    assert step_flops(lambda w, x: conv(x, w, stride, groups), w, x) == forward
    loss = lambda w, x: (conv(x, w, stride, groups) ** 2).sum()  # noqa: E731
    assert step_flops(jax.grad(loss), w, x) == 2 * forward  # forward + weight gradient
    assert step_flops(jax.grad(loss, argnums=(0, 1)), w, x) == 3 * forward


def test_matmuls_loops_branches_and_devices():
    a, b = jnp.ones((3, 5, 7)), jnp.ones((3, 7, 2))
    one = 2 * 3 * 5 * 2 * 7  # a batched matmul: 2 x outputs x contraction
    assert step_flops(jnp.matmul, a, b) == one
    assert step_flops(jax.jit(jnp.matmul), a, b) == one  # inside a pjit
    assert step_flops(lambda a, b: jax.lax.scan(lambda c, _: (c, c @ b), a, None,
                                                length=4)[1], a, b) == 4 * one
    assert step_flops(lambda p, a, b: jax.lax.cond(p, lambda: a @ b, lambda: a[..., :2]),
                      True, a, b) == one  # the costlier branch
    square = jnp.ones((3, 5, 5))
    assert step_flops(lambda s: jax.lax.while_loop(lambda c: c[0, 0, 0] < 9,
                                                   lambda c: c @ s, s), square) \
        == 2 * 3 * 5 * 5 * 5  # a while loop's body once
    assert step_flops(lambda x: jnp.sin(x) * 2, a) is None  # no convolution or matmul
    mesh = AbstractMesh((4, 3), ("d", "e"))
    sharded = jax.shard_map(lambda a, b: a @ b, mesh=mesh, in_specs=(P("d"), P()),
                            out_specs=P("d"))
    rows = jnp.ones((8, 7))
    assert jaxpr_flops(jax.make_jaxpr(sharded)(rows, b[0])) == 12 * 2 * 2 * 2 * 7  # 12 x 2
    one_axis = jax.shard_map(lambda a, b: a @ b, mesh=mesh, in_specs=(P("d"), P()),
                             out_specs=P("d"), axis_names={"d"})
    assert jaxpr_flops(jax.make_jaxpr(one_axis)(rows, b[0])) == 2 * 8 * 2 * 7  # 4 x 2 rows


def test_a_train_step_is_counted_as_xla_counts_it_on_a_cpu():
    """The DevNet step at 64 px: within a tenth of XLA's CPU count (which also counts the
    elementwise rest but skips taps on the padding); on a GPU XLA's count of the same
    step lost the convolutions (0.69 against 51.5 GFLOP per image at 448 px)."""
    import argparse
    from benchmarks.throughput import config_for, train_setup
    args = argparse.Namespace(img_size=64, backbone="resnet18", n_normal=8)
    _, _, _, data, state, step, key, _ = train_setup(config_for("devnet", args, 4, "float32"),
                                                     8)
    ours = step_flops(step, state, data, key)
    cost = step.lower(state, data, key).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    assert 0.95 < ours / xla < 1.1, (ours, xla)


def test_a_conv_route_does_not_change_the_models_count():
    """throughput.model_flops counts the plain model's convolutions whichever route the
    config takes (the same count as the plain model's own step); the routed program's
    own count has the space-to-depth stem's zero taps too. (Lite0's depthwise slices,
    which the count cannot see, are set back to grouped convolutions the same way; that
    case took 11 s here, so the stem stands for both.)"""
    import argparse
    from benchmarks.throughput import config_for, model_flops, train_setup
    from fsad.config import override
    from fsad.methods import build_method
    from fsad.train import make_train_step

    args = argparse.Namespace(img_size=32, backbone="resnet18", n_normal=4)
    plain, routed = (config_for("devnet", args, 4, "float32") for _ in range(2))
    override(plain, "model.depthwise_conv", "grouped")
    override(routed, "model.stem", "space_to_depth")
    _, tx, mesh, data, state, step, key, _ = train_setup(routed, 4)
    counted = model_flops(routed, tx, mesh, state, data, key)
    own = step_flops(step, state, data, key)
    assert own > counted, (own, counted)  # 8x8 folded taps where the kernel has 7x7
    plain_step = make_train_step(build_method(plain), tx, mesh, 4)
    assert counted == step_flops(plain_step, state, data, key)
