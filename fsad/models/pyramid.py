"""The image pyramid of the released DevNet and DRA code (spec §5, §6)."""

from __future__ import annotations

import jax
import numpy as np


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source rows of PyTorch's `F.interpolate(mode="nearest")`: floor(i * in / out)."""
    scale = np.float32(size_in) / np.float32(size_out)
    idx = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, size_in - 1)


def resize_nearest(images: jax.Array, size: int) -> jax.Array:
    """[B, H, W, C] -> [B, size, size, C] as PyTorch's `F.interpolate(x, size=size)`
    (nearest): every other pixel when size = H // 2 and H is even."""
    rows = nearest_indices(images.shape[1], size)
    cols = nearest_indices(images.shape[2], size)
    return images[:, rows][:, :, cols]


def pyramid(images: jax.Array, n_scales: int) -> list:
    """[B, H, W, C] -> [scale 0 (the input), scale s: nearest resize to H // 2**s, ...]
    (the released code resizes the input to img_size // 2**s at every scale s > 0)."""
    h = images.shape[1]
    return [images] + [resize_nearest(images, h // 2 ** s) for s in range(1, n_scales)]
