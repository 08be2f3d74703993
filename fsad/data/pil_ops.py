"""Pillow's 8-bit colour operations, bit for bit, as jit-able JAX functions.

The released CutPaste jitters a PIL patch with torchvision's ColorJitter, whose four
adjustments are Pillow operations on uint8 images: `Image.blend` (brightness, contrast,
saturation), the "L" grey conversion and the RGB <-> HSV round trip of `adjust_hue`.
Each rounds or truncates in its own way, and these functions do the same, on float32
arrays that hold uint8 levels (integers 0..255), [..., 3] RGB. Pillow's RGB -> HSV
computes in double precision, which JAX on an accelerator does not have; its hue and
saturation depend only on small integers, so they come from tables computed here once
in NumPy, in double precision, as Pillow computes them (checked against Pillow on all
2^24 colours by tests/test_pil_ops.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def blend(degenerate: jax.Array, image: jax.Array, alpha) -> jax.Array:
    """`Image.blend(degenerate, image, alpha)` (ImageEnhance's `enhance(alpha)`):
    degenerate + alpha (image - degenerate) in float32, truncated and clipped to uint8."""
    t = degenerate + product(jnp.asarray(alpha, jnp.float32), image - degenerate)
    return jnp.clip(jnp.trunc(t), 0.0, 255.0)


def product(a: jax.Array, n: jax.Array) -> jax.Array:
    """a * n rounded to float32, for float32 a and integer-valued n (|n| < 4096), also
    where the compiler fuses the next addition into a multiply-add (which skips the
    product's rounding that Pillow does): a splits into two parts of 12 significant
    bits, whose products with n are exact, and their sum is rounded once."""
    bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
    hi = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000), jnp.float32)
    return hi * n + (a - hi) * n


def grey(rgb: jax.Array) -> jax.Array:
    """Pillow's RGB -> "L": (19595 R + 38470 G + 7471 B + 2^15) >> 16 (ITU-R 601-2 in
    16-bit fixed point). [..., 3] levels -> [...] levels."""
    c = rgb.astype(jnp.int32)
    return ((c[..., 0] * 19595 + c[..., 1] * 38470 + c[..., 2] * 7471 + 0x8000) >> 16
            ).astype(jnp.float32)


def grey_mean(rgb: jax.Array, region: jax.Array | None = None) -> jax.Array:
    """`ImageEnhance.Contrast`'s degenerate level: int(mean of "L" + 0.5), over `region`
    ([H, W] bool; default all) of an [H, W, 3] image, in exact integer arithmetic."""
    g = grey(rgb).astype(jnp.int32)
    w = (jnp.ones(g.shape, jnp.int32) if region is None else region.astype(jnp.int32))
    n = jnp.maximum(jnp.sum(w), 1)
    return ((2 * jnp.sum(g * w) + n) // (2 * n)).astype(jnp.float32)


# --------------------------------------------------------------- HSV tables (NumPy)

def _pil_hue_saturation(r, g, b):
    """Pillow's rgb2hsv (libImaging/Convert.c) in NumPy: float divisions, double
    arithmetic where C promotes to double. int arrays -> (hue, saturation) uint8."""
    f, d = np.float32, np.float64
    r, g, b = (np.asarray(v, np.int64) for v in (r, g, b))
    maxc = np.maximum(r, np.maximum(g, b))
    minc = np.minimum(r, np.minimum(g, b))
    cr = (maxc - minc).astype(f)
    grey_pixel = maxc == minc
    crs = np.where(grey_pixel, f(1), cr)
    s = cr / np.where(maxc == 0, f(1), maxc.astype(f))
    rc, gc, bc = ((maxc - c).astype(f) / crs for c in (r, g, b))
    h = np.where(r == maxc, bc - gc,
                 np.where(g == maxc, (2.0 + rc.astype(d) - bc.astype(d)).astype(f),
                          (4.0 + gc.astype(d) - rc.astype(d)).astype(f)))
    h = np.fmod(h.astype(d) / 6.0 + 1.0, 1.0).astype(f)
    uh = np.clip(np.trunc(h.astype(d) * 255.0), 0, 255)
    us = np.clip(np.trunc(s.astype(d) * 255.0), 0, 255)
    return (np.where(grey_pixel, 0, uh).astype(np.uint8),
            np.where(grey_pixel, 0, us).astype(np.uint8))


@functools.lru_cache(maxsize=None)
def _tables():
    """Hue by (case, k, cr) and saturation by (cr, max), as NumPy uint8 arrays.

    Pillow's hue depends on which channel is the maximum (r first, then g), which of the
    other two is the minimum, their distance k = max - other and the range cr = max -
    min; it does not depend on the levels themselves. Case 2 * branch + (1 if the later
    of the other two channels is the minimum): so every (case, k, cr) is the hue of one
    colour whose minimum is 0.
    """
    k, cr = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    k = np.minimum(k, cr)
    zero = np.zeros_like(cr)
    rows = []
    for branch in range(3):
        for later_is_min in (0, 1):
            rgb = [None, None, None]
            rgb[branch] = cr  # the maximum (ties with earlier channels do not reach here)
            others = [c for c in range(3) if c != branch]
            rgb[others[1] if later_is_min else others[0]] = zero
            rgb[others[0] if later_is_min else others[1]] = cr - k
            rows.append(_pil_hue_saturation(*rgb)[0])
    hue = np.stack(rows)  # [6, 256 (k), 256 (cr)]
    cr2, mx = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    saturation = _pil_hue_saturation(mx, mx - np.minimum(cr2, mx), mx - np.minimum(cr2, mx))[1]
    return hue, saturation  # saturation: [256 (cr), 256 (max)]


@functools.lru_cache(maxsize=None)
def _sector_tables():
    """Pillow's hsv2rgb sector i = floor(h * 6 / 255) (int32) and fraction f = h * 6 / 255
    - i (float32) for every hue level h, computed in double precision as Pillow does."""
    levels = np.arange(256, dtype=np.float64)
    sector = np.floor(levels.astype(np.float32).astype(np.float64) * 6.0 / 255.0)
    return sector.astype(np.int32), (levels * 6.0 / 255.0 - sector).astype(np.float32)


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
    """`Image.convert("HSV")`: [..., 3] RGB levels -> [..., 3] HSV levels (h, s, v)."""
    hue_table, sat_table = (jnp.asarray(t) for t in _tables())
    c = rgb.astype(jnp.int32)
    r, g, b = c[..., 0], c[..., 1], c[..., 2]
    maxc = jnp.maximum(r, jnp.maximum(g, b))
    minc = jnp.minimum(r, jnp.minimum(g, b))
    cr = maxc - minc
    branch = jnp.where(r == maxc, 0, jnp.where(g == maxc, 1, 2))
    # the two other channels in order, for each branch: (g, b), (r, b), (r, g)
    first = jnp.where(branch == 0, g, r)
    later = jnp.where(branch == 2, g, b)
    later_is_min = (later == minc) & (first != minc)
    k = maxc - jnp.where(later_is_min, first, later)
    case = 2 * branch + later_is_min.astype(jnp.int32)
    h = jnp.where(cr == 0, 0, hue_table[case, k, cr])
    s = jnp.where(cr == 0, 0, sat_table[cr, maxc])
    return jnp.stack([h, s, maxc], -1).astype(jnp.float32)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """`Image.merge("HSV", ...).convert("RGB")` (Pillow's hsv2rgb): [..., 3] HSV levels ->
    [..., 3] RGB levels. Sector i and fraction f of the hue come from double-precision
    tables; p, q, t are float32, each operation rounded in turn (true divisions, no
    fused multiply-adds), and rounded half up, which equals Pillow's double arithmetic
    on all 2^24 inputs."""
    sector, frac = (jnp.asarray(t) for t in _sector_tables())
    h = hsv[..., 0].astype(jnp.int32)
    s, v = hsv[..., 1], hsv[..., 2]
    fs = product(frac[h], s)
    # a true division: XLA turns x / 255.0 into x * (1 / 255.0), which rounds otherwise
    d = jax.lax.optimization_barrier(jnp.float32(255.0))
    p = jnp.floor(v * (255.0 - s) / d + 0.5)
    q = jnp.floor(v * (255.0 - fs) / d + 0.5)
    t = jnp.floor(v * (255.0 - s + fs) / d + 0.5)
    p, q, t = (jnp.clip(x, 0.0, 255.0) for x in (p, q, t))
    i = sector[h] % 6
    first_five = [i == k for k in range(5)]  # sector 5 is each select's default
    r = jnp.select(first_five, [v, q, p, p, t], v)
    g = jnp.select(first_five, [t, v, v, q, p], p)
    b = jnp.select(first_five, [p, p, t, v, v], q)
    out = jnp.stack([r, g, b], -1)
    return jnp.where((s == 0)[..., None], v[..., None], out)


def shift_hue(rgb: jax.Array, shift) -> jax.Array:
    """torchvision's PIL `adjust_hue(img, shift)`: HSV, h += uint8(shift * 255) with
    wrap-around (the cast truncates toward zero, so -0.05 turns h by -12), back to RGB."""
    hsv = rgb_to_hsv(rgb)
    turn = jnp.trunc(jnp.asarray(shift, jnp.float32) * 255.0).astype(jnp.int32)
    h = (hsv[..., 0].astype(jnp.int32) + turn) % 256
    return hsv_to_rgb(hsv.at[..., 0].set(h.astype(jnp.float32)))
