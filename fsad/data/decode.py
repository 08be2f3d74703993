"""Image decoding: file -> resized RGB uint8, in parallel, with clear errors."""

from __future__ import annotations

import concurrent.futures as futures
import os
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class CorruptImageError(ValueError):
    """An image file that PIL cannot decode."""


def decode_image(path: str, size: int) -> np.ndarray:
    """Reads one image as RGB (grey and RGBA converted) resized to size x size.

    Returns:
      [size, size, 3] uint8.
    """
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise CorruptImageError(
            f"cannot decode image {path!r} ({err}). Remove or replace the file, then rerun.") from err


def decode_mask(path: str | None, size: int) -> np.ndarray:
    """Reads a mask (any nonzero pixel is anomalous), nearest-resized. [size, size] uint8 {0,1}."""
    if path is None:
        return np.zeros((size, size), np.uint8)
    try:
        with Image.open(path) as im:
            im = im.convert("L").resize((size, size), Image.NEAREST)
            return (np.asarray(im) > 0).astype(np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise CorruptImageError(f"cannot decode mask {path!r} ({err}).") from err


def decode_many(paths: Sequence[str], size: int, desc: str = "decoding",
                mask: bool = False) -> np.ndarray:
    """Decodes files in a thread pool, with a progress bar. [N, size, size(, 3)] uint8."""
    fn = decode_mask if mask else decode_image
    workers = min(16, (os.cpu_count() or 1) * 2)
    with futures.ThreadPoolExecutor(workers) as pool:
        out = list(tqdm(pool.map(lambda p: fn(p, size), paths), total=len(paths), desc=desc,
                        leave=False, disable=len(paths) < 200))
    if not out:
        shape = (0, size, size) if mask else (0, size, size, 3)
        return np.zeros(shape, np.uint8)
    return np.stack(out)


def list_images(folder: str) -> list[str]:
    """Sorted image files (by suffix) directly inside a folder."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."))
