"""One entry point for every trunk fsad can build: name -> Flax module.

All trunks take ImageNet-normalised NHWC float input and return their
stride-32 feature map; the heads infer its channel count.
"""

from __future__ import annotations

import flax.linen as nn

from fsad.errors import UserError
from fsad.models.efficientnet import HEAD_CHANNELS, EfficientNetLite0
from fsad.models.resnet import STAGES, ResNet, feature_channels

LITE0 = "efficientnet_lite0"
BACKBONES = tuple(sorted(STAGES)) + (LITE0,)


def make_trunk(backbone: str, name: str | None = None) -> nn.Module:
    """The trunk called `backbone` ("resnet18", "resnet34", "resnet50", "efficientnet_lite0")."""
    if backbone == LITE0:
        return EfficientNetLite0(name=name)
    if backbone in STAGES:
        return ResNet(backbone, name=name)
    raise UserError(f"model.backbone={backbone!r} is not a trunk fsad has; use one of "
                     f"{', '.join(BACKBONES)}")


def trunk_channels(backbone: str) -> int:
    """Channels of a trunk's stride-32 map."""
    if backbone == LITE0:
        return HEAD_CHANNELS
    make_trunk(backbone)  # validates the name
    return feature_channels(backbone)


def trunk_features(backbone: str, variables, images, n_scales: int, dtype=None) -> list:
    """The trunk's eval-mode maps at every pyramid scale.

    Args:
      variables: a model's {"params", "batch_stats"} holding the trunk under "backbone".
      images: [B, H, W, 3] ImageNet-normalised float.
      dtype: compute dtype (fsad.precision), default float32.
    Returns:
      [scale 0 map [B, h, w, C], scale 1 map, ...] in float32.
    """
    import jax.numpy as jnp

    from fsad.models.pyramid import pyramid
    from fsad.precision import apply_in
    trunk = make_trunk(backbone)
    dtype = dtype or jnp.float32
    params = variables["params"]["backbone"]
    stats = variables["batch_stats"]["backbone"]
    return [apply_in(trunk, dtype, params, stats, x, train=False).astype(jnp.float32)
            for x in pyramid(images, n_scales)]
