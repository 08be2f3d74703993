"""`model.stem=space_to_depth`: a ResNet's stride-2 stem conv as a stride-1 conv over
2x2 blocks folded into channels (fsad/models/stem.py) gives the convolution's outputs and
kernel gradient, and the config's route reaches every trunk a method builds."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from benchmarks.flop_count import sub_jaxprs
from fsad.errors import UserError
from fsad.models.backbone import make_trunk
from fsad.models.stem import space_to_depth_conv


@pytest.mark.parametrize("size, kernel, pads", [
    ((16, 16), 7, ((3, 3), (3, 3))),  # the ResNet stem
    ((15, 18), 7, ((3, 3), (3, 3))),  # odd sides
    ((17, 13), 7, ((3, 2), (0, 4))),  # uneven pads
    ((10, 10), 4, ((1, 1), (1, 1))),  # an even kernel
])
def test_space_to_depth_equals_the_strided_conv(size, kernel, pads):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, *size, 3)), jnp.float32)
    variables = {"params": {"kernel": jnp.asarray(rng.normal(size=(kernel, kernel, 3, 5)),
                                                  jnp.float32)}}
    plain = nn.Conv(5, (kernel, kernel), strides=2, padding=pads, use_bias=False)
    folded = nn.Conv(5, (kernel, kernel), strides=2, padding=pads, use_bias=False,
                     conv_general_dilated=space_to_depth_conv)
    want, got = plain.apply(variables, x), folded.apply(variables, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    grad = [jax.grad(lambda v, m=m: (m.apply(v, x) ** 2).sum())(variables)["params"]["kernel"]
            for m in (plain, folded)]
    np.testing.assert_allclose(grad[1], grad[0], rtol=1e-5, atol=1e-3)


def test_other_convs_are_left_as_they_are():
    x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 2))
    for stride, pads in [((1, 1), ((1, 1), (1, 1))), ((2, 2), "SAME")]:
        want = jax.lax.conv_general_dilated(x, w, stride, pads,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        got = space_to_depth_conv(x, w, stride, pads,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
        np.testing.assert_allclose(got, want, rtol=1e-6)


def stem_kernels(fn, *args) -> list[tuple]:
    """The kernel shapes of the convs in fn's jaxpr that read 12 channels (the folded
    stem's 4x4x12x64), nested programs included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                shape = eqn.invars[1].aval.shape
                if 12 in shape[:3]:
                    found.append(shape)
            for v in eqn.params.values():
                for sub in sub_jaxprs(v):
                    walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("method_name", ["devnet", "dra"])
def test_the_configs_stem_reaches_the_trunks(method_name):
    """The same outputs from the same parameters with either stem, and the folded conv
    in the method's score, DRA's reference maps and AHL's bank of frozen maps when the
    config asks for it, and only then. Traced at 64 px, one scale."""
    from conftest import tiny_config
    from fsad.methods import build_method
    from fsad.methods.ahl.bank import make_feature_fn

    methods = {stem: build_method(tiny_config(method_name, **{
        "model.n_scales": 1, "model.stem": stem, "model.pretrained": "none"}))
        for stem in ("conv", "space_to_depth")}
    x = jnp.asarray(np.random.default_rng(1).uniform(-2, 2, (2, 64, 64, 3)), jnp.float32)
    refs = np.random.default_rng(2).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    variables = {**methods["conv"].init(jax.random.key(0), x),
                 "extras": {"ref_images": jnp.asarray(refs)}}  # DRA's fixed references
    scores = {}
    for stem, method in methods.items():
        folded = stem == "space_to_depth"
        v = method.prepare_eval(variables)  # DRA: the references' maps
        assert bool(stem_kernels(method.prepare_eval, variables)) == (
            folded and method_name == "dra")
        v = {**v, "key": jax.random.key(2)} if method.random_scores else v
        assert bool(stem_kernels(method.score, v, x)) == folded
        scores[stem] = method.score(v, x)["score"]
        bank = make_feature_fn(tiny_config("ahl_dra", **{"model.stem": stem}))
        assert bool(stem_kernels(bank, variables, refs)) == folded  # AHL's frozen maps
    np.testing.assert_allclose(scores["space_to_depth"], scores["conv"], rtol=1e-4,
                               atol=1e-4)


def test_a_stem_only_resnets_have_is_refused():
    with pytest.raises(UserError, match="only the ResNet trunks have that stem"):
        make_trunk("efficientnet_lite0", stem="space_to_depth")
    with pytest.raises(UserError, match="model.stem='folded' is not a route"):
        make_trunk("resnet18", stem="folded")
    from fsad.models.resnet import ResNet
    with pytest.raises(ValueError, match="unknown stem 'folded'"):  # built directly
        ResNet(stem="folded").init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))
