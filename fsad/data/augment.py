"""Jit-able image augmentations and pseudo anomalies, on uint8 [H, W, 3] images.

Every function takes an explicit PRNG key and works on one image; `jax.vmap`
them over a batch. Shapes are static: rectangles of random size are masks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fsad.data import pil_ops


def random_rotation(key: jax.Array, image: jax.Array, max_degrees: float = 180.0) -> jax.Array:
    """torchvision RandomRotation(max_degrees): nearest neighbour, zero fill.

    Args:
      image: [H, W, C]. Returns the same shape and dtype.
    """
    degrees = jax.random.uniform(key, (), minval=-max_degrees, maxval=max_degrees)
    return rotate(image, degrees)


def rotate(image: jax.Array, degrees: jax.Array) -> jax.Array:
    """Rotates [H, W, C] counter-clockwise about the centre; nearest, zero fill."""
    h, w = image.shape[:2]
    theta = degrees * math.pi / 180
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                          indexing="ij")
    c, s = jnp.cos(theta), jnp.sin(theta)
    # inverse map: output pixel -> source pixel (rows point down, so this turns
    # the picture counter-clockwise as displayed, like torchvision)
    sy = c * (yy - cy) + s * (xx - cx) + cy
    sx = -s * (yy - cy) + c * (xx - cx) + cx
    iy, ix = jnp.round(sy).astype(jnp.int32), jnp.round(sx).astype(jnp.int32)
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    out = image[jnp.clip(iy, 0, h - 1), jnp.clip(ix, 0, w - 1)]
    return jnp.where(inside[..., None], out, jnp.zeros((), image.dtype))


def jitter_ops(image: jax.Array, order: jax.Array, brightness: jax.Array,
               contrast: jax.Array, saturation: jax.Array, hue: jax.Array,
               region: jax.Array | None = None) -> jax.Array:
    """torchvision's ColorJitter adjustments of a PIL image, with given factors, in the
    given order, bit for bit (`fsad.data.pil_ops`): brightness blends with black,
    contrast with the rounded mean grey level of the patch, saturation with each
    pixel's grey level (`Image.blend`, truncating to uint8), hue turns h in Pillow's
    8-bit HSV.

    Args:
      image: [H, W, 3] float32 uint8 levels (integers 0..255); order: [4] a permutation
        of 0..3 (brightness, contrast, saturation, hue); brightness, contrast,
        saturation: factors; hue: shift in turns; region: optional [H, W] bool, the
        patch (the contrast mean is taken over it; PIL jitters the cut patch alone).
    Returns:
      [H, W, 3] float32 uint8 levels.
    """
    ops = [lambda x: pil_ops.blend(jnp.zeros_like(x), x, brightness),
           lambda x: pil_ops.blend(jnp.full_like(x, pil_ops.grey_mean(x, region)), x, contrast),
           lambda x: pil_ops.blend(pil_ops.grey(x)[..., None], x, saturation),
           lambda x: pil_ops.shift_hue(x, hue)]

    def apply(i, x):
        return jax.lax.switch(order[i], ops, x)

    return jax.lax.fori_loop(0, len(ops), apply, image.astype(jnp.float32))


def colour_jitter(key: jax.Array, image: jax.Array, strength: float = 0.1,
                  region: jax.Array | None = None) -> jax.Array:
    """torchvision's ColorJitter(brightness, contrast, saturation, hue = strength), as the
    released CutPaste applies it to the cut patch: a random order of the four
    adjustments (torchvision draws a permutation), factors from
    U(max(0, 1 - strength), 1 + strength) and a hue shift from U(-strength, strength);
    see `jitter_ops`.

    Args:
      image: [H, W, 3] float32 uint8 levels.
      region: optional [H, W] bool, the patch (the contrast mean is taken over it);
        default the whole image.
    Returns:
      [H, W, 3] float32 uint8 levels.
    """
    k_order, kb, kc, ks, kh = jax.random.split(key, 5)
    factor = lambda k: jax.random.uniform(k, (), minval=max(0.0, 1 - strength),  # noqa: E731
                                          maxval=1 + strength)
    shift = jax.random.uniform(kh, (), minval=-strength, maxval=strength)
    return jitter_ops(image, jax.random.permutation(k_order, 4), factor(kb), factor(kc),
                      factor(ks), shift, region)


def cut_box(key: jax.Array, h: int, w: int, area=(0.02, 0.15), aspect: float = 0.3):
    """Random rectangle size as the released CutPaste: area fraction U(area), aspect
    ratio log-uniform in [aspect, 1/aspect]. Returns (cut_h, cut_w) int32 scalars."""
    ka, kr = jax.random.split(key)
    frac = jax.random.uniform(ka, (), minval=area[0], maxval=area[1])
    ratio = jnp.exp(jax.random.uniform(kr, (), minval=math.log(aspect), maxval=-math.log(aspect)))
    a = frac * h * w
    cut_w = jnp.clip(jnp.round(jnp.sqrt(a * ratio)), 1, w - 1).astype(jnp.int32)
    cut_h = jnp.clip(jnp.round(jnp.sqrt(a / ratio)), 1, h - 1).astype(jnp.int32)
    return cut_h, cut_w


def paste_patch(key: jax.Array, target: jax.Array, source: jax.Array,
                area=(0.02, 0.15), aspect: float = 0.3, jitter: float = 0.1):
    """Cuts a rectangle from `source`, colour-jitters it (`colour_jitter` on the patch),
    pastes it at a random place of `target`. CutPaste when source is target, CutMix when
    it is another image.

    Args:
      target, source: [H, W, 3] uint8.
    Returns:
      (image [H, W, 3] uint8, mask [H, W] bool of the pasted rectangle).
    """
    h, w = target.shape[:2]
    kbox, kfrom_y, kfrom_x, kto_y, kto_x, kjit = jax.random.split(key, 6)
    ch, cw = cut_box(kbox, h, w, area, aspect)
    # int(random.uniform(0, h - cut_h)) in the released code: 0 .. h - cut_h - 1
    fy = jax.random.randint(kfrom_y, (), 0, jnp.maximum(h - ch, 1))
    fx = jax.random.randint(kfrom_x, (), 0, jnp.maximum(w - cw, 1))
    ty = jax.random.randint(kto_y, (), 0, jnp.maximum(h - ch, 1))
    tx = jax.random.randint(kto_x, (), 0, jnp.maximum(w - cw, 1))
    # shift the source so that its box lands on the target box; no wrap reaches the box
    shifted = jnp.roll(source, (ty - fy, tx - fx), axis=(0, 1)).astype(jnp.float32)
    yy, xx = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    mask = (yy >= ty) & (yy < ty + ch) & (xx >= tx) & (xx < tx + cw)
    patch = colour_jitter(kjit, shifted, jitter, mask) if jitter else shifted
    out = jnp.where(mask[..., None], patch, target.astype(jnp.float32))
    return out.astype(jnp.uint8), mask


def cutpaste(key: jax.Array, image: jax.Array, **kw):
    """DRA's released pseudo anomaly: a jittered patch of the image pasted elsewhere in it."""
    return paste_patch(key, image, image, **kw)


def cutmix(key: jax.Array, image: jax.Array, other: jax.Array, **kw):
    """A jittered patch of `other` pasted into `image` (AHL's CutMix). -> (image, mask)."""
    return paste_patch(key, image, other, **kw)


def perlin_noise(key: jax.Array, shape: tuple, res: int) -> jax.Array:
    """2-D Perlin noise on a res x res lattice of random unit gradients. -> [H, W] in ~[-1, 1]."""
    h, w = shape
    angles = jax.random.uniform(key, (res + 1, res + 1), maxval=2 * math.pi)
    grads = jnp.stack([jnp.cos(angles), jnp.sin(angles)], -1)
    y = jnp.linspace(0, res, h, endpoint=False)[:, None] * jnp.ones((1, w))
    x = jnp.linspace(0, res, w, endpoint=False)[None, :] * jnp.ones((h, 1))
    y0, x0 = jnp.floor(y).astype(jnp.int32), jnp.floor(x).astype(jnp.int32)
    fy, fx = y - y0, x - x0

    def dot(dy, dx):
        g = grads[y0 + dy, x0 + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    fade = lambda t: 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3  # noqa: E731
    u, v = fade(fx), fade(fy)
    top = dot(0, 0) * (1 - u) + dot(0, 1) * u
    bottom = dot(1, 0) * (1 - u) + dot(1, 1) * u
    return math.sqrt(2) * (top * (1 - v) + bottom * v)


def perlin_blend(key: jax.Array, image: jax.Array, texture: jax.Array,
                 resolutions=(2, 4, 8), threshold: float = 0.5, max_beta: float = 0.8,
                 jitter: float = 0.3):
    """DRAEM-style pseudo anomaly: a Perlin mask (noise > threshold) blends a colour-
    augmented texture into the image with opacity 1 - beta, beta ~ U(0, max_beta).

    Args:
      image, texture: [H, W, 3] uint8.
    Returns:
      (image [H, W, 3] uint8, mask [H, W] bool). The mask is never empty.
    """
    h, w = image.shape[:2]
    k_res, k_noise, k_beta, k_jit = jax.random.split(key, 4)
    noises = jnp.stack([perlin_noise(k, (h, w), r) for k, r in
                        zip(jax.random.split(k_noise, len(resolutions)), resolutions)])
    noise = noises[jax.random.randint(k_res, (), 0, len(resolutions))]
    mask = noise > threshold
    mask = mask.at[jnp.unravel_index(jnp.argmax(noise), (h, w))].set(True)
    beta = jax.random.uniform(k_beta, (), maxval=max_beta)
    tex = colour_jitter(k_jit, texture.astype(jnp.float32), jitter)
    img = image.astype(jnp.float32)
    blended = beta * img + (1 - beta) * tex
    out = jnp.where(mask[..., None], blended, img)
    return jnp.round(out).astype(jnp.uint8), mask
