"""One entry point for every trunk fsad can build: name -> Flax module.

All trunks take ImageNet-normalised NHWC float input and return their
stride-32 feature map; the heads infer its channel count.
"""

from __future__ import annotations

import flax.linen as nn

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
    raise ValueError(f"unknown backbone {backbone!r}; set config.model.backbone to one of "
                     f"{', '.join(BACKBONES)}")


def trunk_channels(backbone: str) -> int:
    """Channels of a trunk's stride-32 map."""
    if backbone == LITE0:
        return HEAD_CHANNELS
    make_trunk(backbone)  # validates the name
    return feature_channels(backbone)
