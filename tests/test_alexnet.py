"""The AlexNet trunk (torchvision ``alexnet().features``, the released code's
``--backbone alexnet``): map sizes, checkpoint import against PyTorch, and a model with
no BatchNorm through training and an Orbax checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fsad import weights
from fsad.errors import UserError
from fsad.methods import build_method
from fsad.models.alexnet import AlexNet, output_size
from fsad.models.backbone import make_trunk, trunk_channels
from fsad.validate import check_config


def test_map_sizes_follow_pytorchs_unpadded_pools():
    assert (output_size(448), output_size(224), output_size(63), output_size(62)) == \
        (13, 6, 1, 0)
    for size in (63, 96, 224):
        out = jax.eval_shape(lambda x: AlexNet().init_with_output(jax.random.key(0), x)[0],
                             jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
        assert out.shape == (2, output_size(size), output_size(size), 256)
    assert trunk_channels("alexnet") == 256
    assert isinstance(make_trunk("alexnet"), AlexNet)


def torch_alexnet_features(torch, seed=0):
    """torchvision's ``alexnet().features``, layer for layer (torchvision is not installed
    here), with PyTorch's default init."""
    nn = torch.nn
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2)).eval()


def test_a_torchvision_checkpoint_gives_pytorchs_feature_map(tmp_path):
    torch = pytest.importorskip("torch")
    features = torch_alexnet_features(torch)
    sd = {f"features.{k}": v for k, v in features.state_dict().items()}
    sd["classifier.1.weight"] = torch.zeros(8, 9216)  # dropped, as the real 4096 x 9216
    sd["classifier.1.bias"] = torch.zeros(8)
    path = str(tmp_path / "alexnet-owt.pth")
    torch.save(sd, path)

    pre = weights.backbone_variables(path, backbone="alexnet", scope="backbone")
    assert pre["batch_stats"] == {"backbone": {}}
    assert sorted(pre["params"]["backbone"]) == ["conv0", "conv10", "conv3", "conv6", "conv8"]
    x = np.random.default_rng(1).normal(size=(2, 3, 99, 99)).astype(np.float32)
    with torch.no_grad():
        want = features(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    got = jax.jit(AlexNet().apply)({"params": pre["params"]["backbone"]},
                                   jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert got.shape == want.shape == (2, 2, 2, 256)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    with pytest.raises(UserError, match="another trunk"):  # a ResNet key in it
        weights.torchvision_alexnet_to_flax({"conv1.weight": np.zeros((64, 3, 7, 7))})


def test_devnet_on_alexnet_trains_and_checkpoints_without_batch_stats(tmp_path,
                                                                        synthetic_root):
    """No BatchNorm anywhere in DevNet on AlexNet: an empty batch_stats collection goes
    through the train step and an Orbax save and restore."""
    from fsad.checkpoints import checkpoint_manager, restore_latest, save_checkpoint
    from fsad.data import read_folder
    from fsad.mesh import make_mesh
    from fsad.train import init_state, make_train_step, put_train_data
    data = read_folder(synthetic_root, 64, cache_dir="")
    config = tiny_config(**{"data.img_size": 64, "model.backbone": "alexnet",
                            "model.n_scales": 1, "batch_size": 8})
    check_config(config)
    method = build_method(config)
    mesh = make_mesh()
    tx = method.optimizer(config.steps_per_epoch)
    train = put_train_data(data.images[data.labels == 0][:16],
                           data.images[data.labels == 1][:3], mesh)
    state = init_state(method, jax.random.key(0), train, tx, mesh)
    assert state.batch_stats == {}
    before = jax.tree.map(np.asarray, state.params)
    step = make_train_step(method, tx, mesh, config.batch_size)
    new, metrics = step(state, train, jax.random.key(1))  # donates state
    assert np.isfinite(float(metrics["loss"]))
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), new.params,
                         before)
    assert moved["backbone"]["conv0"]["kernel"] > 0 and moved["head"]["conv"]["kernel"] > 0

    mngr = checkpoint_manager(str(tmp_path / "ckpt"))
    save_checkpoint(mngr, 1, new)
    back = restore_latest(mngr, jax.tree.map(jnp.zeros_like, new))
    assert back.batch_stats == {}
    np.testing.assert_array_equal(back.params["backbone"]["conv8"]["kernel"],
                                  new.params["backbone"]["conv8"]["kernel"])


def test_images_too_small_for_alexnet_are_refused():
    with pytest.raises(UserError, match="alexnet's map is empty below 63.*at least 126"):
        check_config(tiny_config(**{"model.backbone": "alexnet", "data.img_size": 96}))
    check_config(tiny_config(**{"model.backbone": "alexnet", "data.img_size": 126}))
