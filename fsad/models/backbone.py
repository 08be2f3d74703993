"""One entry point for every trunk fsad can build: name -> Flax module.

All trunks take ImageNet-normalised NHWC float input and return their last
feature map (stride 32; AlexNet's unpadded pools give 13x13 at 448 px); the heads
infer its channel count.
"""

from __future__ import annotations

import flax.linen as nn

from fsad.errors import UserError
from fsad.models import alexnet
from fsad.models.cpu_conv import DEPTHWISE_ROUTES
from fsad.models.efficientnet import HEAD_CHANNELS, EfficientNetLite0
from fsad.models.resnet import STAGES, ResNet, feature_channels
from fsad.models.stem import STEM_ROUTES

LITE0 = "efficientnet_lite0"
ALEXNET = "alexnet"
BACKBONES = (ALEXNET,) + tuple(sorted(STAGES)) + (LITE0,)


def depthwise_route(config) -> str:
    """A config's `model.depthwise_conv` (one of DEPTHWISE_ROUTES); "auto" for a config
    made before the field existed."""
    return config.model.get("depthwise_conv", "auto")


def stem_route(config) -> str:
    """A config's `model.stem` (one of STEM_ROUTES); "conv" for a config made before the
    field existed."""
    return config.model.get("stem", "conv")


def make_trunk(backbone: str, name: str | None = None, depthwise: str = "auto",
               stem: str = "conv") -> nn.Module:
    """The trunk called `backbone` (one of `BACKBONES`); `depthwise`: the route of its
    depthwise convs (DEPTHWISE_ROUTES; only EfficientNet-Lite0 has any); `stem`: the
    route of a ResNet's stem conv (STEM_ROUTES)."""
    if depthwise not in DEPTHWISE_ROUTES:
        raise UserError(f"model.depthwise_conv={depthwise!r} is not a route fsad has; use "
                        f"one of {', '.join(DEPTHWISE_ROUTES)}")
    if stem not in STEM_ROUTES:
        raise UserError(f"model.stem={stem!r} is not a route fsad has; use one of "
                        f"{', '.join(STEM_ROUTES)}")
    if stem != "conv" and backbone not in STAGES:
        raise UserError(f"model.stem={stem}: only the ResNet trunks have that stem, not "
                        f"{backbone}; keep model.stem=conv")
    if backbone == LITE0:
        return EfficientNetLite0(depthwise, name=name)
    if backbone == ALEXNET:
        return alexnet.AlexNet(name=name)
    if backbone in STAGES:
        return ResNet(backbone, stem=stem, name=name)
    raise UserError(f"model.backbone={backbone!r} is not a trunk fsad has; use one of "
                     f"{', '.join(BACKBONES)}")


def trunk_channels(backbone: str) -> int:
    """Channels of a trunk's output map."""
    if backbone == LITE0:
        return HEAD_CHANNELS
    if backbone == ALEXNET:
        return alexnet.CHANNELS
    make_trunk(backbone)  # validates the name
    return feature_channels(backbone)


def smallest_input(backbone: str) -> int:
    """The smallest image side whose trunk map is not empty (the ResNets and Lite0 pad
    every layer, so any side of at least one pixel gives a map)."""
    return alexnet.MIN_INPUT if backbone == ALEXNET else 1


def trunk_map_shape(backbone: str, size: int) -> tuple[int, int, int]:
    """(h, w, C) of the trunk's map for a size x size input, from shapes alone."""
    import jax
    import jax.numpy as jnp
    trunk = make_trunk(backbone)
    out = jax.eval_shape(lambda x: trunk.init_with_output(jax.random.key(0), x)[0],
                         jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    return tuple(out.shape[1:])


def trunk_features(backbone: str, variables, images, n_scales: int, dtype=None,
                   depthwise: str = "auto", stem: str = "conv") -> list:
    """The trunk's eval-mode maps at every pyramid scale.

    Args:
      variables: a model's {"params", "batch_stats"} holding the trunk under "backbone"
        (a trunk without BatchNorm, AlexNet, has no batch_stats entry).
      images: [B, H, W, 3] ImageNet-normalised float.
      dtype: compute dtype (fsad.precision), default float32.
      depthwise, stem: the routes of the trunk's depthwise and stem convs (`make_trunk`).
    Returns:
      [scale 0 map [B, h, w, C], scale 1 map, ...] in float32.
    """
    import jax.numpy as jnp

    from fsad.models.pyramid import pyramid
    from fsad.precision import apply_in
    trunk = make_trunk(backbone, depthwise=depthwise, stem=stem)
    dtype = dtype or jnp.float32
    params = variables["params"]["backbone"]
    stats = variables.get("batch_stats", {}).get("backbone", {})
    return [apply_in(trunk, dtype, params, stats, x, train=False).astype(jnp.float32)
            for x in pyramid(images, n_scales)]
