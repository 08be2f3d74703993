"""AlexNet's feature trunk in Flax linen: torchvision's ``alexnet().features`` (spec §2).

The released DevNet and DRA code both offer ``--backbone alexnet``, which is
``torchvision.models.alexnet(pretrained=True).features`` with 256 output channels;
DevNet's Table 5 ablation (AlexNet+DS) runs it. Five convs with biases and no
BatchNorm, so a model on this trunk has an empty ``batch_stats`` collection:

    conv 11x11/4 pad 2 -> 64, relu, maxpool 3/2,
    conv 5x5 pad 2 -> 192, relu, maxpool 3/2,
    conv 3x3 pad 1 -> 384, relu, conv 3x3 pad 1 -> 256, relu, conv 3x3 pad 1 -> 256, relu,
    maxpool 3/2.

Pools have no padding and round down, as PyTorch's do: a 448 input gives a 13x13
map, 224 gives 6x6, and the smallest input with a non-empty map is 63 pixels
(`MIN_INPUT`). Module names keep torchvision's indices (``features.3`` is
``conv3``) so that `fsad.weights` maps a checkpoint onto the params one to one.

Call: x [B, H, W, 3] ImageNet-normalised float -> [B, h, w, 256].
"""

from __future__ import annotations

import flax.linen as nn

from fsad.models.heads import torch_conv
from fsad.models.resnet import check_trunk_input

# (torchvision index, out channels, kernel, stride, padding, in channels, pool after)
LAYERS = ((0, 64, 11, 4, 2, 3, True), (3, 192, 5, 1, 2, 64, True),
          (6, 384, 3, 1, 1, 192, False), (8, 256, 3, 1, 1, 384, False),
          (10, 256, 3, 1, 1, 256, True))
CHANNELS = 256
MIN_INPUT = 63  # (63 + 4 - 11) // 4 + 1 = 15 -> pool 7 -> pool 3 -> pool 1


def output_size(size: int) -> int:
    """Side of the trunk's map for an input side `size` (0: empty)."""
    size = (size + 4 - 11) // 4 + 1
    for _ in range(3):
        size = (size - 3) // 2 + 1 if size >= 3 else 0
    return max(size, 0)


class AlexNet(nn.Module):
    """torchvision AlexNet ``features``; `train` is accepted and unused (no BatchNorm)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_trunk_input(x, "alexnet")
        for index, out, kernel, stride, pad, cin, pool in LAYERS:
            x = nn.relu(torch_conv(out, kernel, cin, f"conv{index}", stride, pad)(x))
            if pool:
                x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
        return x
