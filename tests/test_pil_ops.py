"""fsad.data.pil_ops and fsad.data.augment against Pillow itself: the HSV round trip on
all 2^24 colours, the enhancers on random images, the whole ColorJitter of a CutPaste
patch, and the rotation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance

from conftest import USER_COMPILE_OPTIONS
from fsad.data import augment, pil_ops


def every_colour() -> np.ndarray:
    """[4096, 4096, 3] uint8: each of the 2^24 triples once."""
    x = np.empty((256, 256, 256, 3), np.uint8)  # [r, g, b, channel]: r major, as r << 16
    v = np.arange(256, dtype=np.uint8)
    x[..., 0], x[..., 1], x[..., 2] = v[:, None, None], v[None, :, None], v[None, None, :]
    return x.reshape(4096, 4096, 3)


def test_hsv_both_ways_on_every_colour():
    x = every_colour()
    # compiled as a user's run compiles (XLA's default options, which the suite turns off,
    # tests/conftest.py): the 2^24 pixels took 3 s at -O0, under 1 s so; both compile in
    # a fraction of a second
    to_hsv = jax.jit(pil_ops.rgb_to_hsv, compiler_options=USER_COMPILE_OPTIONS)
    to_rgb = jax.jit(pil_ops.hsv_to_rgb, compiler_options=USER_COMPILE_OPTIONS)
    for rows in np.array_split(np.arange(4096), 4):  # a quarter at a time: less memory
        part = x[rows]
        want = np.asarray(Image.fromarray(part).convert("HSV"))
        np.testing.assert_array_equal(np.asarray(to_hsv(jnp.asarray(part, jnp.float32))), want)
        # the same triples read as HSV
        want = np.asarray(Image.fromarray(part, "HSV").convert("RGB"))
        np.testing.assert_array_equal(np.asarray(to_rgb(jnp.asarray(part, jnp.float32))), want)


def adjust_hue(image: Image.Image, shift: float) -> Image.Image:
    """torchvision's PIL adjust_hue (functional_pil.py), written out."""
    h, s, v = image.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    np_h += np.array(shift * 255).astype(np.int32).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


PIL_OPS = [lambda im, f: ImageEnhance.Brightness(im).enhance(f),
           lambda im, f: ImageEnhance.Contrast(im).enhance(f),
           lambda im, f: ImageEnhance.Color(im).enhance(f),
           adjust_hue]


def test_enhancers_match_pillow():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    image = Image.fromarray(x)
    xs = jnp.asarray(x, jnp.float32)
    jitter = jax.jit(augment.jitter_ops)
    for f in (0.9, 0.9371, 1.0, 1.0437, 1.1, 0.3, 1.7):
        for op in range(3):
            order = jnp.array([op, op, op, op])
            once = {0: lambda v: pil_ops.blend(jnp.zeros_like(v), v, f),
                    1: lambda v: pil_ops.blend(jnp.full_like(v, pil_ops.grey_mean(v)), v, f),
                    2: lambda v: pil_ops.blend(pil_ops.grey(v)[..., None], v, f)}[op]
            np.testing.assert_array_equal(np.asarray(jax.jit(once)(xs)),
                                          np.asarray(PIL_OPS[op](image, f)), err_msg=str((op, f)))
            # four times in a row through jitter_ops
            want = image
            for _ in range(4):
                want = PIL_OPS[op](want, f)
            np.testing.assert_array_equal(np.asarray(jitter(xs, order, f, f, f, 0.0)),
                                          np.asarray(want))
    for shift in (-0.1, -0.0437, 0.0, 0.02, 0.0999):
        got = jax.jit(pil_ops.shift_hue)(xs, shift)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(adjust_hue(image, shift)))


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2)])
def test_colour_jitter_is_torchvision_on_the_cut_patch(order):
    """The released CutPaste crops the patch as a PIL image and jitters it alone (so the
    contrast mean is the patch's); fsad jitters in place with the patch as region."""
    rng = np.random.default_rng(sum(order))
    x = rng.integers(0, 256, (30, 36, 3), dtype=np.uint8)
    region = np.zeros((30, 36), bool)
    region[4:19, 7:30] = True
    factors = (1.08, 0.93, 1.05, -0.07)
    got = jax.jit(augment.jitter_ops)(jnp.asarray(x, jnp.float32), jnp.array(order),
                                      *factors, jnp.asarray(region))
    patch = Image.fromarray(x[4:19, 7:30])
    for op in order:
        patch = PIL_OPS[op](patch, factors[op])
    np.testing.assert_array_equal(np.asarray(got)[4:19, 7:30], np.asarray(patch))


def test_colour_jitter_draws_a_new_order_per_key():
    """torchvision draws the order and the factors of the four adjustments per call:
    colour_jitter draws both from its key, so different keys give different patches,
    and the orders drawn vary."""
    x = jnp.asarray(np.random.default_rng(3).integers(0, 256, (12, 12, 3)), jnp.float32)
    jitter = jax.jit(augment.colour_jitter)
    outs = {np.asarray(jitter(k, x)).tobytes() for k in jax.random.split(jax.random.key(0), 8)}
    assert len(outs) == 8
    # the orders colour_jitter applies (`jitter_draw`'s; it drew them with
    # jax.random.permutation itself before, which this line then checked, not fsad)
    orders = {tuple(np.asarray(augment.jitter_draw(k)[0]).tolist())
              for k in jax.random.split(jax.random.key(0), 30)}
    assert len(orders) > 5 and all(sorted(o) == [0, 1, 2, 3] for o in orders), orders


@pytest.mark.parametrize("size", [64, 97, 448])
def test_rotation_is_pillows_pixel_for_pixel(size):
    """torchvision's RandomRotation rotates a PIL image with `Image.rotate(angle, NEAREST)`,
    which Pillow computes in 16.16 fixed point: random_rotation's table entries and
    rotate() at any angle give its pixels exactly (a float rotation about the centre
    differed from it in about 430 of the 200,704 pixels of a 448 px image)."""
    rng = np.random.default_rng(size)
    x = rng.integers(1, 256, (size, size, 3), dtype=np.uint8)
    table = augment.pil_rotation_table(180.0, size, size)
    angles = augment.grid_angles(180.0)
    assert table.shape == (augment.ROTATION_STEPS, 6) and abs(angles).max() < 180
    picks = [0, len(angles) // 2, len(angles) - 1, *rng.integers(0, len(angles), 12)]
    rotate_fixed = jax.jit(augment.rotate_fixed)
    for k in picks:
        want = np.asarray(Image.fromarray(x).rotate(float(angles[k]), Image.NEAREST))
        got = np.asarray(rotate_fixed(jnp.asarray(x), jnp.asarray(table[k])))
        np.testing.assert_array_equal(got, want, err_msg=f"angle {angles[k]}")
    for degrees in (0.0, 90.0, -90.0, 180.0, -180.0, 270.0, 45.0, -33.3, 179.99999, 1e-9):
        want = np.asarray(Image.fromarray(x).rotate(degrees, Image.NEAREST))
        np.testing.assert_array_equal(augment.rotate(jnp.asarray(x), degrees), want,
                                      err_msg=f"angle {degrees}")


def test_random_rotation_draws_every_part_of_the_circle():
    """Each key draws one angle of the grid, uniformly: over 400 keys of an image with one
    bright pixel off centre, that pixel lands in every quarter of the circle (nearest
    neighbour: in 0 to 2 output pixels per rotation)."""
    x = np.zeros((33, 33, 1), np.uint8)
    x[16, 28] = 255  # right of the centre
    outs = np.asarray(jax.jit(jax.vmap(augment.random_rotation, (0, None)))(
        jax.random.split(jax.random.key(0), 400), jnp.asarray(x)))
    ys, xs = np.nonzero(outs[..., 0])[1:]
    quarter = (ys < 16).astype(int) * 2 + (xs < 16)
    counts = np.bincount(quarter, minlength=4)
    assert len(ys) > 300 and counts.min() > 60, counts
