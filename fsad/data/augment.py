"""Jit-able image augmentations and pseudo anomalies, on uint8 [H, W, 3] images.

Every function takes an explicit PRNG key and works on one image; `jax.vmap`
them over a batch. Shapes are static: rectangles of random size are masks.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fsad.data import pil_ops


# The angles a random rotation draws from: this many evenly spaced values in (-d, d),
# 0.0055 degrees apart for d = 180 (a corner pixel of a 448 px image moves 0.03 px from one
# to the next), so that Pillow's fixed-point matrix of every one of them is computed
# exactly, in float64 on the host, once per shape (`pil_rotation_table`).
ROTATION_STEPS = 1 << 16


def grid_angles(max_degrees: float, steps: int = ROTATION_STEPS) -> np.ndarray:
    """The `steps` angles random_rotation draws from: bin centres of (-d, d). -> [steps]
    float64 degrees."""
    return -max_degrees + 2.0 * max_degrees * (np.arange(steps) + 0.5) / steps


def pil_rotation_coefficients(degrees, height: int, width: int) -> np.ndarray:
    """Pillow's `Image.rotate(degrees, NEAREST)` (what torchvision's RandomRotation calls
    on a PIL image) as the 16.16 fixed-point affine map its C code runs.

    Pillow builds the inverse matrix in float64 (cos and sin rounded to 15 decimals,
    about the centre (w/2, h/2)), converts it to fixed point (floor(v * 2^16 + 0.5)) with
    the half-pixel offset folded into the constant terms, and reads source pixel
    (xx >> 16, yy >> 16) for output pixel (x, y), xx = a2 + x*a0 + y*a1 and
    yy = a5 + x*a3 + y*a4; a source outside the image gives black. Its shortcuts for 0,
    90, 180 and 270 degrees (a copy or a transpose) give the same pixels.

    Args:
      degrees: [N] angles (counter-clockwise as displayed), float64.
    Returns:
      [N, 6] int32 (a0, a1, a2, a3, a4, a5).
    """
    if max(height, width) > 8192:  # xx, yy of rotate_fixed stay within int32 up to this size
        raise ValueError(f"rotation of a {height}x{width} image: at most 8192 px a side")
    angle = -np.radians(np.asarray(degrees, np.float64) % 360.0)
    cos, sin = np.round(np.cos(angle), 15), np.round(np.sin(angle), 15)
    cx, cy = width / 2.0, height / 2.0
    m = (cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy)
    fix = lambda v: np.floor(v * 65536.0 + 0.5).astype(np.int64)  # noqa: E731
    return np.stack([fix(m[0]), fix(m[1]), fix(m[2] + m[1] * 0.5 + m[0] * 0.5),
                     fix(m[3]), fix(m[4]), fix(m[5] + m[4] * 0.5 + m[3] * 0.5)],
                    axis=-1).astype(np.int32)


@functools.lru_cache(maxsize=16)
def pil_rotation_table(max_degrees: float, height: int, width: int,
                       steps: int = ROTATION_STEPS) -> np.ndarray:
    """`pil_rotation_coefficients` of every `grid_angles` angle: [steps, 6] int32
    (read-only; cached per shape)."""
    table = pil_rotation_coefficients(grid_angles(max_degrees, steps), height, width)
    table.flags.writeable = False
    return table


def rotate_fixed(image: jax.Array, coefficients: jax.Array) -> jax.Array:
    """[H, W, C] rotated by a fixed-point affine map ([6] int32 from
    `pil_rotation_coefficients`): Pillow's nearest-neighbour rotation, pixel for pixel."""
    h, w = image.shape[:2]
    a0, a1, a2, a3, a4, a5 = (coefficients[i] for i in range(6))
    y = jnp.arange(h, dtype=jnp.int32)[:, None]
    x = jnp.arange(w, dtype=jnp.int32)[None, :]
    ix = (a2 + y * a1 + x * a0) >> 16  # arithmetic shift: floor, as Pillow's
    iy = (a5 + y * a4 + x * a3) >> 16
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    out = image[jnp.clip(iy, 0, h - 1), jnp.clip(ix, 0, w - 1)]
    return jnp.where(inside[..., None], out, jnp.zeros((), image.dtype))


def random_rotation(key: jax.Array, image: jax.Array, max_degrees: float = 180.0) -> jax.Array:
    """torchvision RandomRotation(max_degrees) of a PIL image: Pillow's nearest-neighbour
    rotation, zero fill, by an angle drawn uniformly from `grid_angles(max_degrees)`.

    Args:
      image: [H, W, C]. Returns the same shape and dtype.
    """
    table = pil_rotation_table(max_degrees, *image.shape[:2])
    k = jax.random.randint(key, (), 0, table.shape[0])
    return rotate_fixed(image, jnp.asarray(table)[k])


def rotate(image: jax.Array, degrees: float) -> jax.Array:
    """[H, W, C] rotated counter-clockwise by `degrees` (a number known when tracing):
    Pillow's `Image.rotate(degrees, NEAREST)`, zero fill, pixel for pixel."""
    coefficients = pil_rotation_coefficients(np.array([float(degrees)]), *image.shape[:2])[0]
    return rotate_fixed(image, jnp.asarray(coefficients))


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


def jitter_draw(key: jax.Array, strength: float = 0.1):
    """The random part of torchvision's ColorJitter(brightness, contrast, saturation,
    hue = strength), as `ColorJitter.get_params` draws it: a random order of the four
    adjustments, factors from U(max(0, 1 - strength), 1 + strength) and a hue shift
    from U(-strength, strength). -> (order [4] int32, brightness, contrast, saturation,
    hue), the arguments of `jitter_ops` after the image."""
    k_order, kb, kc, ks, kh = jax.random.split(key, 5)
    factor = lambda k: jax.random.uniform(k, (), minval=max(0.0, 1 - strength),  # noqa: E731
                                          maxval=1 + strength)
    shift = jax.random.uniform(kh, (), minval=-strength, maxval=strength)
    return jax.random.permutation(k_order, 4), factor(kb), factor(kc), factor(ks), shift


def colour_jitter(key: jax.Array, image: jax.Array, strength: float = 0.1,
                  region: jax.Array | None = None) -> jax.Array:
    """torchvision's ColorJitter(brightness, contrast, saturation, hue = strength), as the
    released CutPaste applies it to the cut patch: `jitter_draw`, then `jitter_ops`.

    Args:
      image: [H, W, 3] float32 uint8 levels.
      region: optional [H, W] bool, the patch (the contrast mean is taken over it);
        default the whole image.
    Returns:
      [H, W, 3] float32 uint8 levels.
    """
    return jitter_ops(image, *jitter_draw(key, strength), region)


def box_size(frac: jax.Array, ratio: jax.Array, h: int, w: int):
    """The released CutPaste's rectangle for area fraction `frac` and aspect `ratio`
    (width over height): cut_w = round(sqrt(frac h w ratio)), cut_h =
    round(sqrt(frac h w / ratio)), each kept within 1 .. side - 1 (the released
    ranges never leave it). -> (cut_h, cut_w) int32 scalars."""
    a = frac * h * w
    cut_w = jnp.clip(jnp.round(jnp.sqrt(a * ratio)), 1, w - 1).astype(jnp.int32)
    cut_h = jnp.clip(jnp.round(jnp.sqrt(a / ratio)), 1, h - 1).astype(jnp.int32)
    return cut_h, cut_w


def cut_box(key: jax.Array, h: int, w: int, area=(0.02, 0.15), aspect: float = 0.3):
    """Random rectangle size as the released CutPaste: area fraction U(area), aspect
    ratio log-uniform in [aspect, 1/aspect] (`box_size`). Returns (cut_h, cut_w) int32
    scalars."""
    ka, kr = jax.random.split(key)
    frac = jax.random.uniform(ka, (), minval=area[0], maxval=area[1])
    ratio = jnp.exp(jax.random.uniform(kr, (), minval=math.log(aspect), maxval=-math.log(aspect)))
    return box_size(frac, ratio, h, w)


def paste_draw(key: jax.Array, h: int, w: int, area=(0.02, 0.15), aspect: float = 0.3,
               jitter: float = 0.1) -> dict:
    """The random part of `paste_patch` for an h x w image, as the released CutPaste draws
    it: the rectangle's size (`cut_box`), its corner in the source and in the target,
    each int(U(0, side - cut)) (so 0 .. side - cut - 1), and the colour jitter
    (`jitter_draw`; None when jitter is 0).

    Returns:
      {"size": (cut_h, cut_w), "source": (y, x), "target": (y, x), "jitter": tuple or
      None}, int32 scalars and jitter_draw's values.
    """
    kbox, kfrom_y, kfrom_x, kto_y, kto_x, kjit = jax.random.split(key, 6)
    ch, cw = cut_box(kbox, h, w, area, aspect)
    corner = lambda k, side, cut: jax.random.randint(k, (), 0,  # noqa: E731
                                                     jnp.maximum(side - cut, 1))
    return {"size": (ch, cw),
            "source": (corner(kfrom_y, h, ch), corner(kfrom_x, w, cw)),
            "target": (corner(kto_y, h, ch), corner(kto_x, w, cw)),
            "jitter": jitter_draw(kjit, jitter) if jitter else None}


def paste_apply(target: jax.Array, source: jax.Array, draw: dict):
    """Cuts the rectangle `draw["size"]` at `draw["source"]` of `source`, jitters it
    (`jitter_ops` on the patch alone) and pastes it at `draw["target"]` of `target`: the
    released CutPaste (PIL crop, ColorJitter, paste) for given draws.

    Args:
      target, source: [H, W, 3] uint8; draw: as `paste_draw` returns.
    Returns:
      (image [H, W, 3] uint8, mask [H, W] bool of the pasted rectangle).
    """
    h, w = target.shape[:2]
    (ch, cw), (fy, fx), (ty, tx) = draw["size"], draw["source"], draw["target"]
    # shift the source so that its box lands on the target box; no wrap reaches the box
    shifted = jnp.roll(source, (ty - fy, tx - fx), axis=(0, 1)).astype(jnp.float32)
    yy, xx = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    mask = (yy >= ty) & (yy < ty + ch) & (xx >= tx) & (xx < tx + cw)
    if draw["jitter"] is not None:
        shifted = jitter_ops(shifted, *draw["jitter"], mask)
    out = jnp.where(mask[..., None], shifted, target.astype(jnp.float32))
    return out.astype(jnp.uint8), mask


def paste_patch(key: jax.Array, target: jax.Array, source: jax.Array,
                area=(0.02, 0.15), aspect: float = 0.3, jitter: float = 0.1):
    """Cuts a rectangle from `source`, colour-jitters it, pastes it at a random place of
    `target` (`paste_draw`, then `paste_apply`). CutPaste when source is target, CutMix
    when it is another image.

    Args:
      target, source: [H, W, 3] uint8.
    Returns:
      (image [H, W, 3] uint8, mask [H, W] bool of the pasted rectangle).
    """
    draw = paste_draw(key, *target.shape[:2], area, aspect, jitter)
    return paste_apply(target, source, draw)


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
