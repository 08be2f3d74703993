"""OpenCV's bilinear resize of uint8 images (``cv2.resize``, INTER_LINEAR), bit for bit.

The released localisation (DevNet's ``localization.py``) reads each ground-truth mask as an
RGB image, resizes it with ``cv2.resize(label, (448, 448))`` and counts every pixel of its
first channel above 0 as anomalous: a mask one bilinear tap wider than a nearest resize
gives. fsad computes that resize here in numpy, without OpenCV, as OpenCV computes it for
uint8: source positions ``(d + 0.5) * src / dst - 0.5`` in float32, weights rounded to
11-bit fixed point (``INTER_RESIZE_COEF_BITS``), the horizontal pass in integers, and the
vertical pass as its SIMD kernel (``VResizeLinearVec_32s8u``) rounds: each row's sum
shifted right by 4, multiplied by its weight keeping the high 16 bits, then
``(sum + 2) >> 2``. tests/test_opencv_resize.py checks it against OpenCV itself where
opencv-python is installed (it equalled 4.5.5, 4.10 and 5.0 on every element of random
images, downscaled and upscaled, odd sizes and exact halvings included) and against a
stored OpenCV output where it is not.
"""

from __future__ import annotations

import numpy as np

COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS
COEF_SCALE = 1 << COEF_BITS


def _taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """One axis: (first source index [dst] int64 (may be -1 or src - 1),
    the fraction towards the next one [dst] float32), as OpenCV computes them."""
    scale = 1.0 / (dst / src)  # OpenCV's scale = 1 / inv_scale, in double
    pos = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(pos).astype(np.int64)
    return first, (pos - first.astype(np.float32)).astype(np.float32)


def _fixed(weight: np.ndarray) -> np.ndarray:
    """float32 weights -> OpenCV's saturate_cast<short>(w * 2048): round half to even."""
    return np.rint(weight * np.float32(COEF_SCALE)).astype(np.int64)


def resize_linear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize(image, (width, height))`` for a uint8 image.

    Args:
      image: [H, W] or [H, W, C] uint8.
    Returns:
      [height, width] or [height, width, C] uint8.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"resize_linear takes uint8 images, not {image.dtype}")
    h_in, w_in = image.shape[:2]
    x = image.reshape(h_in, w_in, -1).astype(np.int64)
    # horizontal: outside the image the nearest column, with all the weight
    col, fx = _taps(w_in, width)
    edge = (col < 0) | (col >= w_in - 1)
    fx[edge] = 0.0
    col = np.clip(col, 0, w_in - 1)
    a0, a1 = _fixed(np.float32(1) - fx), _fixed(fx)
    nxt = np.minimum(col + 1, w_in - 1)
    rows = x[:, col] * a0[None, :, None] + x[:, nxt] * a1[None, :, None]
    # vertical: rows outside the image are clamped (their weights are kept)
    row, fy = _taps(h_in, height)
    b0, b1 = _fixed(np.float32(1) - fy)[:, None, None], _fixed(fy)[:, None, None]
    s0, s1 = rows[np.clip(row, 0, h_in - 1)], rows[np.clip(row + 1, 0, h_in - 1)]
    out = (((s0 >> 4) * b0) >> 16) + (((s1 >> 4) * b1) >> 16)
    out = np.clip((out + 2) >> 2, 0, 255).astype(np.uint8)
    return out.reshape((height, width) + image.shape[2:])
