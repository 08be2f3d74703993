"""ResNet-18/34/50 trunks in Flax linen with the torchvision layout (spec §2).

Module names follow torchvision's state_dict keys (``layer1.0.conv1`` becomes
``layer1_0/conv1``) so that `fsad.weights` can map a PyTorch checkpoint onto
the params one to one. Padding is explicit, as in PyTorch, so that a converted
checkpoint gives the same feature map.

Input is NHWC float (ImageNet-normalised); output is the stride-32 feature map
``[B, H/32, W/32, C]`` with C = 512 (ResNet-18/34) or 2048 (ResNet-50).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from fsad.models.cpu_conv import matmul_conv
from fsad.models.norm import TorchBatchNorm
from fsad.models.stem import STEM_CONVS, STEM_ROUTES

# torchvision initialises convs with kaiming_normal_(mode="fan_out", relu).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

STAGES = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


def _conv(features: int, kernel: int, stride: int, name: str, conv=matmul_conv) -> nn.Conv:
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False,
                   kernel_init=conv_init, conv_general_dilated=conv, name=name)


def torch_batch_norm(train: bool, name: str, epsilon: float = 1e-5) -> TorchBatchNorm:
    """PyTorch's BatchNorm2d (momentum 0.1; see `fsad.models.norm.TorchBatchNorm`)."""
    return TorchBatchNorm(use_running_average=not train, epsilon=epsilon, name=name)


def _bn(train: bool, name: str) -> TorchBatchNorm:
    return torch_batch_norm(train, name)


class BasicBlock(nn.Module):
    """Two 3x3 convs with identity (or 1x1 projection) shortcut. [B,H,W,Cin] -> [B,H/s,W/s,C]."""

    features: int
    stride: int = 1
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        out = nn.relu(_bn(train, "bn1")(_conv(self.features, 3, self.stride, "conv1")(x)))
        out = _bn(train, "bn2")(_conv(self.features, 3, 1, "conv2")(out))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _bn(train, "downsample_bn")(_conv(self.features, 1, self.stride,
                                                  "downsample_conv")(x))
        return nn.relu(out + x)


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 bottleneck (torchvision v1.5: stride on the 3x3). Output 4*features channels."""

    features: int
    stride: int = 1
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        out = nn.relu(_bn(train, "bn1")(_conv(self.features, 1, 1, "conv1")(x)))
        out = nn.relu(_bn(train, "bn2")(_conv(self.features, 3, self.stride, "conv2")(out)))
        out = _bn(train, "bn3")(_conv(self.features * 4, 1, 1, "conv3")(out))
        if self.stride != 1 or x.shape[-1] != self.features * 4:
            x = _bn(train, "downsample_bn")(_conv(self.features * 4, 1, self.stride,
                                                  "downsample_conv")(x))
        return nn.relu(out + x)


class ResNet(nn.Module):
    """ResNet trunk without pooling and classifier.

    Attributes:
      depth_name: "resnet18", "resnet34" or "resnet50".
      stem: how the 7x7 stride-2 stem conv is computed (STEM_ROUTES): "conv", as
        released, or "space_to_depth" (`fsad.models.stem`; the same parameters).
    Call:
      x: [B, H, W, 3] float32 -> [B, H/32, W/32, C] float32.
    """

    depth_name: str = "resnet18"
    widths: Sequence[int] = (64, 128, 256, 512)
    stem: str = "conv"

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.depth_name not in STAGES:
            raise ValueError(f"unknown backbone {self.depth_name!r}; choose one of "
                             f"{sorted(STAGES)}")
        if self.stem not in STEM_ROUTES:
            raise ValueError(f"unknown stem {self.stem!r}; choose one of {STEM_ROUTES}")
        check_trunk_input(x, self.depth_name)
        kind, blocks = STAGES[self.depth_name]
        block_cls = BasicBlock if kind == "basic" else Bottleneck
        x = _conv(64, 7, 2, "conv1", STEM_CONVS[self.stem])(x)
        x = nn.relu(_bn(train, "bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, (width, count) in enumerate(zip(self.widths, blocks), start=1):
            for i in range(count):
                stride = 2 if (i == 0 and stage > 1) else 1
                x = block_cls(width, stride, name=f"layer{stage}_{i}")(x, train)
        return x


def feature_channels(depth_name: str) -> int:
    """Channels of the stride-32 map of a trunk."""
    return 2048 if STAGES[depth_name][0] == "bottleneck" else 512


# numpy, not jax arrays: importing fsad must not start a JAX backend (a multi-host run
# joins its hosts first, `fsad.hosts.initialize`)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def check_trunk_input(x, trunk: str) -> None:
    """Refuses what a trunk would take silently and wrongly: not [B, H, W, 3] (NCHW
    arrays, as PyTorch's, or grey images), or not float (raw uint8 pixels).

    Raises:
      ValueError: naming the shape or dtype and the fix.
    """
    if x.ndim != 4 or x.shape[-1] != 3 or not jnp.issubdtype(x.dtype, jnp.floating):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            hint = "normalize_uint8(images) for uint8 pixels"
        elif x.ndim == 3:
            hint = "one image is a batch of one, x[None]"
        elif x.ndim == 4 and x.shape[1] == 3:
            hint = "for NCHW arrays, x.transpose(0, 2, 3, 1)"
        elif x.shape[-1:] == (1,):
            hint = "for grey images, three equal channels"
        else:
            hint = "RGB images, e.g. x[..., :3] of RGBA ones"
        raise ValueError(f"{trunk} takes ImageNet-normalised float images [B, H, W, 3] "
                         f"(NHWC); got shape {tuple(x.shape)} {x.dtype}: {hint}")


def normalize_uint8(images):
    """uint8 [..., H, W, 3] -> ImageNet-normalised float32 of the same shape."""
    return (images.astype(jnp.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
