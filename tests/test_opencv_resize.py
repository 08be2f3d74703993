"""OpenCV's bilinear resize in numpy (fsad.data.opencv_resize), and the released
localisation's masks (data.mask_resize=opencv_linear) that it makes."""

import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from fsad.data import read_folder
from fsad.data.decode import decode_mask
from fsad.data.opencv_resize import resize_linear
from fsad.data.synthetic import write_synthetic_dataset


def formula(h, w, c):
    return ((np.arange(h * w * c, dtype=np.int64) * 97 + 13) % 256).astype(np.uint8).reshape(
        h, w, c)


def mask(n, shift):
    """[n, n, 3] uint8 0/255: a disc, a one-pixel diagonal line and a lattice of lines."""
    yy, xx = np.mgrid[:n, :n]
    m = (yy - n // 2) ** 2 + (xx - n // 2 - shift) ** 2 < (n // 5) ** 2
    m |= yy == xx
    m |= (yy // 7 + xx // 11) % 13 == 0
    return np.repeat((m * 255).astype(np.uint8)[..., None], 3, -1)


# name: (image, width, height, the first 24 hex digits of the sha256 of cv2.resize(image,
# (width, height))'s bytes, the same with opencv-python-headless 4.5.5 and 5.0.0)
CASES = {
    "colour, down": (lambda: formula(37, 23, 3), 16, 11, "0cedf82ba81c8231140144d5"),
    "colour, up": (lambda: formula(37, 23, 3), 50, 61, "8e7ad921f578b1403c4f3da6"),
    "grey, odd sizes": (lambda: formula(29, 31, 1)[..., 0], 13, 17, "304aabbfa1932c9c0dd07200"),
    "mask 1024 -> 448": (lambda: mask(1024, 30), 448, 448, "b584f6ba95f1af3e1b0468d1"),
    "mask 700 -> 448": (lambda: mask(700, 3), 448, 448, "4b3eae49cefba2e8feb017fb"),
    "mask 900 -> 96": (lambda: mask(900, 10), 96, 96, "4ebda691721ac8a62729f400"),
}


@pytest.mark.parametrize("name", CASES)
def test_equals_opencvs_stored_output(name):
    make, w, h, digest = CASES[name]
    out = resize_linear(make(), w, h)
    assert out.dtype == np.uint8 and out.shape[:2] == (h, w)
    assert hashlib.sha256(out.tobytes()).hexdigest()[:24] == digest


def test_equals_opencv_itself():
    """Every element, on random images and 0/255 masks, down- and upscaled, odd sizes,
    exact halvings and a copy at the same size (runs where opencv-python is installed,
    as .ci/run installs it)."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for (h_in, w_in, h, w) in [(1024, 1024, 448, 448), (900, 900, 448, 448),
                               (1024, 1024, 512, 512), (256, 1600, 448, 448), (50, 70, 33, 33),
                               (13, 17, 7, 7), (5, 5, 13, 13), (200, 300, 101, 103),
                               (64, 64, 64, 64), (31, 29, 62, 58), (1, 9, 3, 3), (2, 2, 1, 1)]:
        for c in (1, 3):
            img = rng.integers(0, 256, (h_in, w_in, c), dtype=np.uint8)
            img = np.where(img > 200, 255, 0).astype(np.uint8) if rng.random() < 0.5 else img
            img = img[..., 0] if c == 1 else img
            np.testing.assert_array_equal(resize_linear(img, w, h), cv2.resize(img, (w, h)),
                                          err_msg=f"{img.shape} -> {(h, w)}")


def test_same_size_is_a_copy_and_other_dtypes_are_refused():
    img = formula(19, 21, 3)
    np.testing.assert_array_equal(resize_linear(img, 21, 19), img)
    with pytest.raises(TypeError, match="uint8"):
        resize_linear(img.astype(np.float32), 8, 8)


def test_released_masks_are_the_nearest_masks_widened(tmp_path):
    """decode_mask(resize="opencv_linear") is the released localization.py's mask: the file
    as RGB, OpenCV's bilinear resize, > 0 on the first channel. On a 0/255 mask it holds
    the nearest resize's pixels and a rim around them (a tap of any weight counts)."""
    path = str(tmp_path / "m.png")
    Image.fromarray(mask(300, 7)[..., 0]).save(path)
    near = decode_mask(path, 64)
    released = decode_mask(path, 64, "opencv_linear")
    want = (resize_linear(mask(300, 7), 64, 64)[..., 0] > 0).astype(np.uint8)
    np.testing.assert_array_equal(released, want)
    assert released.dtype == np.uint8 and set(np.unique(released)) == {0, 1}
    assert np.all(released >= near) and released.sum() > near.sum() * 1.05
    with pytest.raises(ValueError, match="mask_resize"):
        decode_mask(path, 64, "bilinear")


def test_folder_reader_keeps_the_two_mask_resizes_apart_in_its_cache(tmp_path):
    """data.mask_resize reaches the folder reader, and its cache keeps each resize's masks
    (a read of the other resize is decoded, not taken from the cache)."""
    root = write_synthetic_dataset(str(tmp_path / "s"), size=48, n_train=4, n_test_good=2,
                                   n_per_class=2, seed=0)
    cache = str(tmp_path / "cache")
    near = read_folder(root, 20, cache)
    released = read_folder(root, 20, cache, mask_resize="opencv_linear")
    assert len(os.listdir(cache)) == 2
    np.testing.assert_array_equal(released.images, near.images)
    assert np.all(released.masks >= near.masks) and released.masks.sum() > near.masks.sum()
    again = read_folder(root, 20, cache, mask_resize="opencv_linear")
    np.testing.assert_array_equal(again.masks, released.masks)


@pytest.mark.parametrize("method", ["devnet", "dra", "ahl_dra", "ahl_devnet"])
def test_localization_variant_is_the_released_script(method):
    """`--config configs/<method>.py:localization`: the released localization.py's maps
    and masks, on top of any other variant."""
    import importlib
    module = importlib.import_module(f"configs.{method}")
    plain, c = module.get_config("quick"), module.get_config("quick,localization")
    assert (plain.explain.released_postprocess, plain.data.mask_resize) == (False, "nearest")
    assert (c.explain.released_postprocess, c.data.mask_resize) == (True, "opencv_linear")
    assert c.data.img_size == plain.data.img_size == 96
