"""Flax modules: backbones and heads."""

from fsad.models.heads import TopKScorer
from fsad.models.resnet import ResNet, feature_channels, normalize_uint8

__all__ = ["ResNet", "TopKScorer", "feature_channels", "normalize_uint8"]
