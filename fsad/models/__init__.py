"""Flax modules: backbones and heads."""

from fsad.models.alexnet import AlexNet
from fsad.models.backbone import BACKBONES, make_trunk, trunk_channels
from fsad.models.efficientnet import EfficientNetLite0
from fsad.models.heads import TopKScorer
from fsad.models.resnet import ResNet, feature_channels, normalize_uint8

__all__ = ["AlexNet", "BACKBONES", "EfficientNetLite0", "ResNet", "TopKScorer", "feature_channels",
           "make_trunk", "normalize_uint8", "trunk_channels"]
