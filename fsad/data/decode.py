"""Image decoding: file -> resized RGB uint8, in parallel, with clear errors."""

from __future__ import annotations

import concurrent.futures as futures
import os
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from fsad.data.opencv_resize import resize_linear
from fsad.errors import UserError
from fsad.hosts import progress

# .npy: Mastcam's 64x64x6 arrays (spec §9.4), read as the released loader reads them
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy")


class CorruptImageError(UserError):
    """Image files that cannot be read or decoded; `what` names them without the advice."""

    def __init__(self, what: str, fix: str | None = None):
        super().__init__(what if fix is None else f"{what}; {fix}")
        self.what = what


# what Pillow raises for a file it cannot open or decode (truncated, not an image, or
# over its guard against decompression bombs: 2 x Image.MAX_IMAGE_PIXELS, 179 Mpx)
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError,
                 Image.DecompressionBombError)


def unreadable(kind: str, path: str, err: Exception,
               fix: str = "remove or replace the file, then rerun") -> CorruptImageError:
    """The error for a file `path` that raised `err` when read as `kind` ("image")."""
    if isinstance(err, PermissionError):
        return CorruptImageError(f"cannot read {kind} {path!r} (permission denied)",
                                 "make it readable (chmod a+r) or remove it, then rerun")
    if isinstance(err, Image.DecompressionBombError):
        fix = ("a file this large is refused unread (Pillow's guard); downscale it below "
               "that, e.g. to the run's data.img_size, then rerun")
    return CorruptImageError(f"cannot decode {kind} {path!r} ({err})", fix)


NAMED_AT_MOST = 3  # unreadable files an error names; it counts the rest


def all_unreadable(errors: list[CorruptImageError], total: int) -> CorruptImageError:
    """One error for every unreadable file of a decode (so that one rerun, not one per
    file, follows the fix): the first NAMED_AT_MOST named, the rest counted."""
    if len(errors) == 1:
        return errors[0]
    named = "; ".join(e.what for e in errors[:NAMED_AT_MOST])
    more = f"; and {len(errors) - NAMED_AT_MOST} more" if len(errors) > NAMED_AT_MOST else ""
    return CorruptImageError(f"{len(errors)} of {total} files cannot be read: {named}{more}",
                             "remove, replace or make readable each of them, then rerun")


# Pillow's modes of 16-bit (and 32-bit integer) grey, which its convert("RGB") clips at 255
DEEP_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def pil_rgb(im: Image.Image) -> np.ndarray:
    """A PIL image as [H, W, 3] uint8 RGB, as the released loader's `.convert("RGB")`
    gives it (grey, palette and RGBA converted), except 16-bit (and 32-bit integer) grey
    whose values pass 255: scaled to 8 bits (/257) where that convert would clip them
    all to white. Values within 0..255 are read as they are, as that convert reads them.

    Raises:
      ValueError: float pixels (mode F), or integer grey past 16 bits, which no scaling
        to 8 bits reads right (that convert made them black or white, silently)."""
    if im.mode == "F" or im.mode in DEEP_GREY_MODES and np.asarray(im).max() > 65535:
        raise ValueError(f"{'float' if im.mode == 'F' else '32-bit integer'} pixels (Pillow "
                         f"mode {im.mode}), which have no one reading as 8-bit colour; save "
                         f"it as an 8- or 16-bit image")
    if im.mode in DEEP_GREY_MODES:
        arr = np.asarray(im, dtype=np.float64)
        if arr.max() > 255:
            arr = arr / 257.0  # 65535 -> 255
        grey = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def npy_rgb(path: str) -> np.ndarray:
    """An .npy image as the released loader reads it: cast to uint8, first 3 channels.

    Returns:
      [H, W, 3] uint8 (a 2-D or 1-channel array is repeated to 3 channels).
    """
    arr = np.load(path, allow_pickle=False).astype(np.uint8)  # a plain cast, as released
    check_npy_image_shape(arr.shape)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def check_npy_image_shape(shape: tuple) -> None:
    """Raises ValueError unless an .npy array's shape is an image's: [H, W] or [H, W, C]
    with C = 1 or C >= 3."""
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[-1] == 2):
        raise ValueError(f"expected an [H, W, C] array with C = 1 or C >= 3, got {shape}")


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """The resize every reader applies: [H, W, 3] uint8 -> [size, size, 3] uint8, bilinear."""
    im = Image.fromarray(image)
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def load_rgb(path: str) -> np.ndarray:
    """Reads one image at its own size as RGB (grey and RGBA converted). [H, W, 3] uint8."""
    try:
        if path.lower().endswith(".npy"):
            return npy_rgb(path)
        with Image.open(path) as im:
            return pil_rgb(im)
    except DECODE_ERRORS as err:
        raise unreadable("image", path, err) from err


def decode_image(path: str, size: int) -> np.ndarray:
    """Reads one image as RGB (grey and RGBA converted) resized to size x size.

    Returns:
      [size, size, 3] uint8.
    """
    return resize_rgb(load_rgb(path), size)


MASK_RESIZES = ("nearest", "opencv_linear")


def resize_mask(mask: np.ndarray, size: int, resize: str = "nearest") -> np.ndarray:
    """[H, W] mask (any nonzero pixel anomalous) -> [size, size] uint8 {0, 1}: the
    nearest resize, or (resize="opencv_linear") OpenCV's bilinear resize then > 0, as the
    released localization.py makes its masks (`fsad.data.opencv_resize`; a mask about one
    source pixel wider at every edge)."""
    mask = np.asarray(mask, dtype=np.uint8)
    if resize == "opencv_linear":
        return (resize_linear(mask, size, size) > 0).astype(np.uint8)
    if resize != "nearest":
        raise ValueError(f"mask_resize={resize!r}; use one of {', '.join(MASK_RESIZES)}")
    im = Image.fromarray(mask).resize((size, size), Image.NEAREST)
    return (np.asarray(im) > 0).astype(np.uint8)


def decode_mask(path: str | None, size: int, resize: str = "nearest") -> np.ndarray:
    """Reads a mask resized to size x size by `resize_mask`. [size, size] uint8 {0, 1}.

    Where resize="opencv_linear" the file is read as the released localization.py reads
    it, as RGB, and its first channel counts; otherwise as grey.
    """
    if path is None:
        return resize_mask(np.zeros((size, size), np.uint8), size, resize)
    try:
        with Image.open(path) as im:
            mask = np.asarray(im.convert("RGB"))[..., 0] if resize == "opencv_linear" \
                else np.asarray(im.convert("L"))
    except DECODE_ERRORS as err:  # (a mask over Pillow's size guard too)
        raise unreadable("mask", path, err) from err
    return resize_mask(mask, size, resize)


def decode_many(paths: Sequence[str], size: int, desc: str = "decoding",
                mask: bool = False, mask_resize: str = "nearest") -> np.ndarray:
    """Decodes files in a thread pool, with a progress bar (masks resized by
    `mask_resize`, see decode_mask). [N, size, size(, 3)] uint8.

    Raises:
      CorruptImageError: naming every file that cannot be read (`all_unreadable`).
    """
    fn = (lambda p, s: decode_mask(p, s, mask_resize)) if mask else decode_image

    def one(path):
        try:
            return fn(path, size)
        except CorruptImageError as err:  # the others are still decoded, to name them all
            return err

    workers = min(16, (os.cpu_count() or 1) * 2)
    with futures.ThreadPoolExecutor(workers) as pool:
        out = list(progress(pool.map(one, paths), total=len(paths),
                            desc=desc, leave=False, disable=len(paths) < 200))
    bad = [r for r in out if isinstance(r, CorruptImageError)]
    if bad:
        raise all_unreadable(bad, len(paths))
    if not out:
        shape = (0, size, size) if mask else (0, size, size, 3)
        return np.zeros(shape, np.uint8)
    return np.stack(out)


# files a folder of images may hold that no one means as an image: not worth a word
NOT_IMAGES = ("Thumbs.db", "desktop.ini")


def left_out(folder: str) -> list[str]:
    """What `list_images` of `folder` leaves out, relative to it: files that are not
    images fsad reads (IMAGE_SUFFIXES; hidden files and NOT_IMAGES aside) and subfolders
    (named with a trailing /). A recursive listing's: `images_and_others`."""
    out = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            out += [name + os.sep] if not name.startswith(".") else []
        elif not name.startswith(".") and name not in NOT_IMAGES and not (
                name.lower().endswith(IMAGE_SUFFIXES) and is_file_or_broken_link(path)):
            out.append(name)
    return sorted(out)


def images_and_others(folder: str, require_images: bool = True
                      ) -> tuple[list[str], list[str]]:
    """(the image files under folder, searched recursively; the other files), each sorted
    and relative to it; hidden files and NOT_IMAGES aside. Symlinked folders are followed
    (a dataset often links its parts), each real folder once (a link cycle ends there; of
    a folder and a link to it side by side, the folder: its images were listed twice).
    What is not a file (a named pipe, whose reading waits for good) is among the others.

    Raises:
      UserError: the folder does not exist, or (require_images) holds no images.
    """
    from fsad.errors import UserError
    if not os.path.isdir(folder):
        raise UserError(f"folder {folder!r} does not exist; pass an existing folder of images")
    images, others, seen = [], [], {os.path.realpath(folder)}
    for dirpath, dirnames, files in os.walk(folder, followlinks=True):
        kept = []
        for d in sorted(dirnames, key=lambda d: (os.path.islink(os.path.join(dirpath, d)), d)):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real not in seen:
                seen.add(real)
                kept.append(d)
        dirnames[:] = kept
        for f in files:
            if f.startswith(".") or f in NOT_IMAGES:
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, folder)
            image = f.lower().endswith(IMAGE_SUFFIXES) and is_file_or_broken_link(path)
            (images if image else others).append(rel)
    if not images and require_images:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder!r}; point it "
                        f"at a folder that holds images")
    return sorted(images), sorted(others)


def list_images(folder: str) -> list[str]:
    """Sorted image files (by suffix) directly inside a folder; not what is no file (a
    named pipe: its reading waits for good), but a broken link (the decoding names it)."""
    return sorted(p for p in (os.path.join(folder, f) for f in os.listdir(folder)
                              if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."))
                  if is_file_or_broken_link(p))


def is_file_or_broken_link(path: str) -> bool:
    """Whether a listing takes path as an image file: a file, or a link to nothing (kept
    for the decoding to name); not a named pipe, socket or device."""
    return os.path.isfile(path) or not os.path.exists(path)


def list_images_recursive(folder: str) -> list[str]:
    """Image files under a folder (searched recursively), sorted, relative to it
    (`images_and_others`).

    Raises:
      UserError: the folder does not exist, or holds no images.
    """
    return images_and_others(folder)[0]


def image_folder_paths(root: str, skip_subset: str = "") -> list[str]:
    """The image files of an outlier or texture folder (`load_image_folder`).

    A root in the MVTec layout (subsets with a train/good folder) gives, as the released
    DRA loader does, the training normals of every subset but `skip_subset` (the one
    being trained: its images are not outliers); any other folder gives every image
    under it (recursively).

    Raises:
      UserError: no image there.
    """
    subsets = sorted(d for d in os.listdir(root)
                     if os.path.isdir(os.path.join(root, d, "train", "good")))
    if not subsets:
        return [os.path.join(root, f) for f in list_images_recursive(root)]
    paths = [p for d in subsets if d != skip_subset
             for p in list_images(os.path.join(root, d, "train", "good"))]
    if not paths:
        but = (f" but those of {skip_subset!r}, the subset being trained"
               if skip_subset in subsets else "")
        raise UserError(f"no images in the train/good folders of {root!r}{but}; point it at "
                        f"a folder that holds {'other ' if but else ''}images")
    return paths


def check_image_folder(root: str, skip_subset: str = "") -> None:
    """That an outlier or texture folder holds images that open, before any training
    uses it: each file's header is read (Pillow identifies the image; an .npy's shape),
    no pixel decoded, so that a folder of gigabytes is checked in a second (a file cut
    short after its header is found when the run decodes it).

    Raises:
      UserError: no image there; CorruptImageError naming the files that do not open.
    """
    paths = image_folder_paths(root, skip_subset)
    bad = []
    for path in paths:
        try:
            if path.lower().endswith(".npy"):
                check_npy_image_shape(np.load(path, mmap_mode="r", allow_pickle=False).shape)
            else:
                with Image.open(path):
                    pass
        except DECODE_ERRORS as err:
            bad.append(unreadable("image", path, err))
    if bad:
        raise all_unreadable(bad, len(paths))


def load_image_folder(root: str, size: int, skip_subset: str = "") -> np.ndarray | None:
    """Outlier-exposure or texture images under `root` (`image_folder_paths`), decoded at
    size x size; None for no root. -> [N, size, size, 3] uint8."""
    if not root:
        return None
    return decode_many(image_folder_paths(root, skip_subset), size, desc=f"decoding {root}")
