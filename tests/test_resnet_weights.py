"""ResNet trunk shapes and torchvision checkpoint import, checked against NumPy."""

import hashlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsad import weights
from fsad.errors import UserError
from fsad.models.resnet import STAGES, BasicBlock, ResNet, _bn, _conv, feature_channels


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_feature_map_shape(name):
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: ResNet(name).init_with_output(jax.random.key(0), x)[0], x)
    assert shapes.shape == (2, 2, 2, feature_channels(name))


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0", "alexnet"])
def test_a_trunk_refuses_nchw_grey_or_uint8_images(backbone):
    """What a PyTorch user hands over first (an NCHW batch, uint8 pixels) or a grey batch
    built a trunk for other inputs, or ran on unnormalised pixels, without a word."""
    from fsad.models import make_trunk
    trunk = make_trunk(backbone)
    for shape, dtype, hint in (((2, 3, 64, 64), jnp.float32, r"x.transpose\(0, 2, 3, 1\)"),
                               ((2, 64, 64, 1), jnp.float32, "three equal channels"),
                               ((2, 64, 64, 3), jnp.uint8, r"normalize_uint8\(images\)"),
                               ((64, 64, 3), jnp.float32, r"x\[None\]"),
                               ((2, 64, 64, 4), jnp.float32, r"x\[..., :3\] of RGBA")):
        x = jax.ShapeDtypeStruct(shape, dtype)
        with pytest.raises(ValueError, match=rf"{backbone} takes ImageNet-normalised float "
                           rf"images \[B, H, W, 3\] \(NHWC\); got shape .*{hint}"):
            jax.eval_shape(lambda x: trunk.init(jax.random.key(0), x), x)


def torchvision_state_dict(name="resnet18", seed=0):
    """A state_dict with torchvision's keys and shapes, written from the architecture."""
    rng = np.random.default_rng(seed)
    kind, blocks = STAGES[name]
    sd = {}

    def conv(key, o, i, k):
        sd[key + ".weight"] = rng.normal(0, np.sqrt(2 / (i * k * k)), (o, i, k, k)).astype(
            np.float32)

    def bn(key, c):
        sd[key + ".weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[key + ".bias"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[key + ".running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[key + ".running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
        sd[key + ".num_batches_tracked"] = np.array(7)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    cin = 64
    exp = 1 if kind == "basic" else 4
    for s, (w, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for b in range(n):
            p = f"layer{s}.{b}"
            if kind == "basic":
                conv(p + ".conv1", w, cin, 3); bn(p + ".bn1", w)  # noqa: E702
                conv(p + ".conv2", w, w, 3); bn(p + ".bn2", w)  # noqa: E702
            else:
                conv(p + ".conv1", w, cin, 1); bn(p + ".bn1", w)  # noqa: E702
                conv(p + ".conv2", w, w, 3); bn(p + ".bn2", w)  # noqa: E702
                conv(p + ".conv3", w * 4, w, 1); bn(p + ".bn3", w * 4)  # noqa: E702
            if b == 0 and (s > 1 or cin != w * exp):
                conv(p + ".downsample.0", w * exp, cin, 1)
                bn(p + ".downsample.1", w * exp)
            cin = w * exp
    sd["fc.weight"] = rng.normal(size=(1000, cin)).astype(np.float32)
    sd["fc.bias"] = np.zeros(1000, np.float32)
    return sd


# ---- NumPy reference (NCHW, PyTorch weight layout) ----
def np_conv(x, w, stride, pad):
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    out = np.zeros((n, o, ho, wo), np.float64)
    for i in range(k):
        for j in range(k):
            patch = xp[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out


def np_bn(x, sd, key):
    g, b, m, v = (sd[f"{key}.{n}"][None, :, None, None] for n in
                  ("weight", "bias", "running_mean", "running_var"))
    return (x - m) / np.sqrt(v + 1e-5) * g + b


def np_stem_and_block(x, sd):
    """conv1/bn1/relu/maxpool, then layer1.0 (a BasicBlock), eval mode."""
    y = np.maximum(np_bn(np_conv(x, sd["conv1.weight"], 2, 3), sd, "bn1"), 0)
    yp = np.pad(y, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    h = (y.shape[2] - 1) // 2 + 1
    y = np.max([yp[:, :, i:i + 2 * h:2, j:j + 2 * h:2] for i in range(3) for j in range(3)], 0)
    out = np.maximum(np_bn(np_conv(y, sd["layer1.0.conv1.weight"], 1, 1), sd, "layer1.0.bn1"), 0)
    out = np_bn(np_conv(out, sd["layer1.0.conv2.weight"], 1, 1), sd, "layer1.0.bn2")
    return np.maximum(out + y, 0)


class Layer1Probe(ResNet):
    """The trunk truncated after layer1_0, sharing ResNet's parameter names."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(_bn(train, "bn1")(_conv(64, 7, 2, "conv1")(x)))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        return BasicBlock(64, 1, name="layer1_0")(x, train)


def test_converted_block_matches_numpy_reference():
    sd = torchvision_state_dict()
    var = weights.torchvision_resnet_to_flax(sd)
    x = np.random.default_rng(3).normal(size=(2, 3, 32, 32))
    ref = np_stem_and_block(x, sd)
    probe = Layer1Probe()
    keep = ("conv1", "bn1", "layer1_0")
    sub = {c: {k: v for k, v in var[c].items() if k in keep} for c in var}
    got = probe.apply(sub, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32))
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_conversion_covers_every_variable(name):
    var = weights.torchvision_resnet_to_flax(torchvision_state_dict(name))
    model_vars = jax.eval_shape(ResNet(name).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    merged = weights.merge_variables(model_vars, var)  # raises on unknown paths / shapes
    n_model = len(jax.tree.leaves(model_vars))
    assert len(jax.tree.leaves(var)) == n_model
    np.testing.assert_array_equal(merged["params"]["conv1"]["kernel"],
                                  var["params"]["conv1"]["kernel"])


def test_merge_rejects_wrong_depth():
    var = weights.torchvision_resnet_to_flax(torchvision_state_dict("resnet50"))
    model_vars = jax.eval_shape(ResNet("resnet18").init, jax.random.key(0),
                                jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="shape|no place"):
        weights.merge_variables(model_vars, var)


def test_merge_rejects_a_smaller_trunk_or_no_trunk_at_all():
    """A ResNet-18 checkpoint into a ResNet-34 trunk left its extra blocks at random init,
    and an empty or classifier-only checkpoint loaded nothing, each without a word (and
    results.json said "pretrained")."""
    def scoped(tree):
        return {k: {"backbone": v} for k, v in tree.items()}
    var = scoped(weights.torchvision_resnet_to_flax(torchvision_state_dict("resnet18")))
    model_vars = scoped(jax.eval_shape(ResNet("resnet34").init, jax.random.key(0),
                                       jnp.zeros((1, 32, 32, 3))))
    with pytest.raises(UserError, match=r"gives no value for \d+ of the trunk's weights "
                       r"\(e.g. batch_stats/backbone/layer1_2/bn1/mean"):
        weights.merge_variables(model_vars, var)
    fc_only = {"fc.weight": np.zeros((1000, 512), np.float32), "fc.bias": np.zeros(1000)}
    for nothing in (scoped(weights.torchvision_resnet_to_flax(fc_only)), {}):
        with pytest.raises(UserError, match="holds no weight of the trunk"):
            weights.merge_variables(model_vars, nothing)


def test_pth_file_and_url_with_checksum(tmp_path):
    torch = pytest.importorskip("torch")
    sd = torchvision_state_dict()
    path = str(tmp_path / "resnet18.pth")
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, path)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    loaded = weights.load_state_dict(path, digest)
    np.testing.assert_array_equal(loaded["layer2.0.downsample.0.weight"],
                                  sd["layer2.0.downsample.0.weight"])
    cache = str(tmp_path / "cache")
    via_url = weights.load_state_dict("file://" + path, digest, cache_dir=cache)
    assert os.path.exists(os.path.join(cache, "resnet18.pth"))
    np.testing.assert_array_equal(via_url["conv1.weight"], sd["conv1.weight"])
    with pytest.raises(ValueError, match="sha256"):
        weights.load_state_dict(path, "0" * 64)
    with pytest.raises(UserError, match="does not exist"):
        weights.load_state_dict(str(tmp_path / "missing.pth"))


def test_a_download_that_fails_its_sha256_is_not_kept_and_odd_sources_are_named(tmp_path):
    """A download whose sha256 is not the one asked for (a proxy's page) was renamed into
    the cache before the check, and every later run failed on that copy until it was
    deleted by hand; a URL ending in / and a folder given as the weights were tracebacks
    (IsADirectoryError); a checkpoint whose first key is layer_norm.* an IndexError.
    (A review's findings.)"""
    src = tmp_path / "model.npz"
    np.savez(src, w=np.zeros(3, np.float32))
    cache = str(tmp_path / "cache")
    with pytest.raises(UserError, match=r"the download from file://.*model.npz has sha256 "
                                        r"\w+, expected 00000000...; nothing was kept"):
        weights.load_state_dict(f"file://{src}", "0" * 8, cache_dir=cache)
    assert not os.path.exists(os.path.join(cache, "model.npz"))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert weights.load_state_dict(f"file://{src}", digest, cache_dir=cache)["w"].shape == (3,)
    assert os.path.exists(os.path.join(cache, "model.npz"))  # the right one is kept
    with pytest.raises(UserError, match="names no file .it ends in /."):
        weights.load_state_dict(f"file://{tmp_path}/", digest, cache_dir=cache)
    with pytest.raises(UserError, match="a folder; give the weights file in it"):
        weights.load_state_dict(str(tmp_path), digest)
    for convert, key in ((weights.torchvision_resnet_to_flax, "layer_norm.weight"),
                         (weights.efficientnet_lite_to_flax, "_blocks.weight")):
        with pytest.raises(UserError, match=f"'{key}' is not a .* key; the checkpoint is "
                                            f"for another trunk"):
            convert({key: np.zeros(3, np.float32)})


def test_two_urls_of_one_file_name_are_two_downloads(tmp_path):
    """Without a sha256 to check it, a cached download was found by its file name alone:
    another URL's model.pth took the first's weights (and results.json named the
    second)."""
    cache = str(tmp_path / "cache")
    got = []
    for folder, value in (("a", 1.0), ("b", 2.0)):
        os.makedirs(tmp_path / folder)
        np.savez(tmp_path / folder / "model.npz", w=np.full(3, value, np.float32))
        got.append(weights.load_state_dict(f"file://{tmp_path}/{folder}/model.npz",
                                           cache_dir=cache)["w"])
    assert got[0][0] == 1.0 and got[1][0] == 2.0


def test_a_file_url_changed_since_its_copy_is_copied_again(tmp_path):
    """A file:// URL without a sha256 was copied into the cache once and read from there
    for good: weights written over its file later were never seen (a walkthrough's run
    trained from the old ones). A file whose time or size is not its copy's is copied
    again (an older-dated one too); with a sha256, the copy that matches it is kept."""
    cache, source = str(tmp_path / "cache"), tmp_path / "model.npz"
    url = f"file://{source}"
    np.savez(source, w=np.full(3, 1.0, np.float32))
    assert weights.load_state_dict(url, cache_dir=cache)["w"][0] == 1.0
    np.savez(source, w=np.full(3, 2.0, np.float32))
    assert weights.load_state_dict(url, cache_dir=cache)["w"][0] == 2.0
    stamp = os.path.getmtime(source)
    np.savez(source, w=np.full(3, 4.0, np.float32))  # replaced by an older-dated file of
    os.utime(source, (stamp - 3600,) * 2)  # the same size (cp -p, tar x)
    assert weights.load_state_dict(url, cache_dir=cache)["w"][0] == 4.0
    assert weights.load_state_dict(url, cache_dir=cache)["w"][0] == 4.0  # and kept then
    sha = weights.sha256_of(str(source))
    assert weights.load_state_dict(url, sha, cache_dir=cache)["w"][0] == 4.0
    np.savez(source, w=np.full(3, 3.0, np.float32))
    os.utime(source, (os.path.getmtime(source) + 20,) * 2)
    assert weights.load_state_dict(url, sha, cache_dir=cache)["w"][0] == 4.0


def test_npz_checkpoint_into_devnet_backbone(tmp_path):
    """The config path: model.pretrained -> backbone variables inside a DevNet model."""
    from fsad.methods.devnet import DevNetModel
    sd = torchvision_state_dict()
    path = str(tmp_path / "r18.npz")
    np.savez(path, **sd)
    pre = weights.backbone_variables(path)
    model = DevNetModel()
    v = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    merged = weights.merge_variables(v, pre)
    np.testing.assert_allclose(merged["batch_stats"]["backbone"]["layer4_1"]["bn2"]["var"],
                               sd["layer4.1.bn2.running_var"])
    assert "head" in merged["params"]


@pytest.mark.parametrize("route", ["matmul_conv", "cpu_matmul_conv"])
@pytest.mark.parametrize("hw,k,stride", [(2, 3, 1), (2, 1, 1), (1, 3, 1), (2, 3, 2), (2, 1, 2),
                                         (3, 3, 3), (14, 3, 3), (6, 1, 2), (5, 3, 1)])
def test_matmul_conv_equals_lax(hw, k, stride, route):
    """Both CPU routes (sizes-limited, and every size for AHL's heads) equal XLA's conv,
    and take the slices-and-matmul route where they should: matmul_conv for maps of at
    most 4 pixels or windows that do not overlap (not the 5x5 map's 3x3 stride-1 conv,
    which it hands to XLA, the one case here that compared XLA with itself)."""
    from fsad.models import cpu_conv
    matmul_conv = getattr(cpu_conv, route)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, hw, hw, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, 8, 5)), jnp.float32)
    pad = ((k - 1) // 2,) * 2
    args = (x, w, (stride, stride), (pad, pad))
    kw = {"dimension_numbers": ("NHWC", "HWIO", "NHWC")}
    ref = jax.lax.conv_general_dilated(*args, **kw)
    np.testing.assert_allclose(matmul_conv(*args, **kw), ref, rtol=1e-5, atol=1e-5)
    routed = route == "cpu_matmul_conv" or hw * hw <= 4 or stride >= k
    jaxpr = str(jax.make_jaxpr(lambda x, w: matmul_conv(x, w, *args[2:], **kw))(x, w))
    assert ("conv_general_dilated" not in jaxpr) == routed, (route, hw, k, stride)
    g = jax.grad(lambda w: matmul_conv(x, w, *args[2:], **kw).sum())(w)
    g_ref = jax.grad(lambda w: jax.lax.conv_general_dilated(x, w, *args[2:], **kw).sum())(w)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k,stride,padding", [(1, 1, "SAME"), (1, 2, "VALID"), (3, 3, "SAME")])
def test_a_string_padding_takes_the_matmul_route(k, stride, padding):
    """"SAME" and "VALID" (EfficientNet-Lite0's convs) become explicit pads on CPU, so a
    1x1 or non-overlapping conv is a matmul there too, with XLA's conv's numbers."""
    from fsad.models.cpu_conv import matmul_conv
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 7, 7, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, 8, 5)), jnp.float32)
    kw = {"dimension_numbers": ("NHWC", "HWIO", "NHWC")}

    def ours(w):
        return matmul_conv(x, w, (stride, stride), padding, **kw)

    assert "conv_general_dilated" not in str(jax.make_jaxpr(jax.grad(lambda w: ours(w).sum()))(w))
    ref = jax.lax.conv_general_dilated(x, w, (stride, stride), padding, **kw)
    np.testing.assert_allclose(ours(w), ref, rtol=1e-5, atol=1e-5)
