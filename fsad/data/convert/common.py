"""What every converter shares: raw-layout checks, the authors' 3:1 split, an output
folder that appears only when complete, progress bars and the manifest.

The released scripts (spec §9) list folders with ``os.listdir``, so which file
lands in which split depends on the filesystem. Here every listing is sorted, and
the file lists are saved in ``<subset>/manifest.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import socket
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from fsad.data.decode import DECODE_ERRORS, DEEP_GREY_MODES, unreadable
from fsad.data.folders import split_normals_3_to_1
from fsad.errors import UserError


class RawLayoutError(UserError):
    """The raw download does not have the layout a converter expects."""


def require_dir(path: str, dataset: str, layout: str) -> str:
    """Returns `path` if it is a folder, else raises RawLayoutError naming it."""
    if not os.path.isdir(path):
        raise RawLayoutError(f"{dataset}: raw folder {path!r} is missing; expected the raw "
                             f"layout {layout}")
    return path


def require_file(path: str, dataset: str, layout: str) -> str:
    """Returns `path` if it is a file, else raises RawLayoutError naming it."""
    if not os.path.isfile(path):
        raise RawLayoutError(f"{dataset}: raw file {path!r} is missing; expected the raw "
                             f"layout {layout}")
    return path


def list_files(folder: str, suffixes: Sequence[str] | None = None) -> list[str]:
    """Sorted names of the regular, non-hidden files in `folder` (optionally by suffix,
    compared case-sensitively as the released scripts do)."""
    names = sorted(f for f in os.listdir(folder)
                   if not f.startswith(".") and os.path.isfile(os.path.join(folder, f)))
    if suffixes is not None:
        names = [f for f in names if f.endswith(tuple(suffixes))]
    return names


def list_dirs(folder: str) -> list[str]:
    """Sorted names of the non-hidden sub-folders of `folder`."""
    return sorted(f for f in os.listdir(folder)
                  if not f.startswith(".") and os.path.isdir(os.path.join(folder, f)))


def split_3_to_1(items: Sequence) -> tuple[list, list]:
    """The authors' split of normals: sklearn ``train_test_split(test_size=0.25,
    random_state=42)`` on `items` in the given order. Returns (train, test), each in
    the permutation's order, as the released scripts get them."""
    train, test = split_normals_3_to_1(len(items))
    return [items[i] for i in train], [items[i] for i in test]


def progress(iterable: Iterable, desc: str, total: int | None = None):
    """A tqdm progress bar over `iterable`."""
    return tqdm(iterable, desc=desc, total=total, unit="file", leave=False)


@dataclasses.dataclass
class ConvertResult:
    """What a converter wrote.

    Attributes:
      root: the subset folder (OUT_DIR/<subset>), in the MVTec layout.
      counts: {"train/good": n, "test/good": n, "test/<class>": n, "ground_truth/<class>": n}.
      warnings: raw files skipped or fixed, and why.
      extra: dataset-specific facts (e.g. BrainMRI's counts under the released loader's filter).
    """

    root: str
    counts: dict
    warnings: list
    extra: dict


def remove_stale_partials(final: str, host: str) -> None:
    """Removes the temporary folders (`Output`'s FINAL.partial-HOST-PID) that conversions
    on this host killed before their end left beside `final` (SIGKILL: no exit handler
    ran; a full ELPV left 55 MB each time); one of a process still running stays."""
    folder, name = os.path.split(final)
    pattern = re.compile(rf"{re.escape(name)}\.partial-{re.escape(host)}-(\d+)")
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        match = pattern.fullmatch(entry)
        if match is None or _running(int(match.group(1))):
            continue
        logging.warning("removing %s, left by a conversion that did not end",
                        os.path.join(folder, entry))
        shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


def _running(pid: int) -> bool:
    """Whether process `pid` of this host runs (another user's counts)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # (OverflowError: no pid that large)
        return False
    except PermissionError:
        return True
    return True


class Output:
    """The output subset folder, written under a temporary name and renamed when complete.

    Args:
      out_dir: OUT_DIR; the subset folder is OUT_DIR/<subset>.
      subset: the released scripts' folder name (e.g. "AITEX").
      overwrite: replace an existing OUT_DIR/<subset>; otherwise refuse to touch it.
    """

    def __init__(self, out_dir: str, subset: str, overwrite: bool = False):
        self.final = os.path.join(os.path.abspath(out_dir), subset)
        if os.path.exists(self.final) and (not os.path.isdir(self.final)
                                           or os.listdir(self.final)):
            if not overwrite:
                raise UserError(f"output folder {self.final!r} already exists; pass "
                                f"--overwrite to replace it, or choose another OUT_DIR")
        self.overwrite = overwrite
        host = socket.gethostname()
        self.root = f"{self.final}.partial-{host}-{os.getpid()}"
        remove_stale_partials(self.final, host)
        if os.path.exists(self.root):
            shutil.rmtree(self.root)
        os.makedirs(self.root)
        self.files: dict[str, list[str]] = {}
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        logging.warning(message)
        self.warnings.append(message)

    def warn_skipped(self, dataset: str, files: Sequence[str], why: str) -> None:
        """One warning (naming the first three of `files`) that `files` were skipped, and
        `why`; none where `files` is empty."""
        if files:
            self.warn(f"{dataset}: {len(files)} file{'s' * (len(files) > 1)} skipped, {why}: "
                      f"{', '.join(files[:3])}{', ...' * (len(files) > 3)}")

    def _target(self, rel_dir: str, name: str) -> str:
        folder = os.path.join(self.root, rel_dir)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name)
        if os.path.exists(path):  # the released scripts would overwrite silently
            raise UserError(f"two raw files map to the same output {rel_dir}/{name}; rename "
                            f"one of them in the raw folder")
        self.files.setdefault(rel_dir, []).append(name)
        return path

    def save_png(self, rel_dir: str, name: str, array: np.ndarray) -> None:
        """Writes `array` ([H, W, 3] uint8) as rel_dir/name (a PNG)."""
        Image.fromarray(np.ascontiguousarray(array)).save(self._target(rel_dir, name))

    def copy(self, src: str, rel_dir: str, name: str | None = None) -> None:
        """Copies a raw file byte for byte as rel_dir/name (default: its own name), once
        it reads (`check_readable`): a truncated image, or a file that is none, was
        copied without a word and stopped the training run later."""
        check_readable(src)
        shutil.copyfile(src, self._target(rel_dir, name or os.path.basename(src)))

    def finish(self, dataset: str, raw_dir: str, settings: dict | None = None,
               extra: dict | None = None) -> ConvertResult:
        """Writes manifest.json, moves the folder into place, returns what was written."""
        counts = {k: len(v) for k, v in sorted(self.files.items())}
        manifest = {"dataset": dataset, "raw_dir": os.path.abspath(raw_dir),
                    "settings": settings or {}, "counts": counts, "warnings": self.warnings,
                    "extra": extra or {}, "files": {k: v for k, v in sorted(self.files.items())}}
        with open(os.path.join(self.root, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.exists(self.final):
            shutil.rmtree(self.final)
        os.replace(self.root, self.final)
        return ConvertResult(self.final, counts, list(self.warnings), extra or {})

    def abort(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Output":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # leave no half-written dataset behind
            self.abort()


def check_readable(path: str) -> None:
    """Reads a raw file as fsad will: an .npy array (Mastcam) loaded, an image decoded.

    Raises:
      CorruptImageError: naming the file and the fix.
    """
    if path.endswith(".npy"):
        try:
            np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise unreadable("raw array", path, err, RAW_FIX) from err
        return
    with open_raw(path) as im:
        im.load()


RAW_FIX = ("replace it with a good copy from the dataset's download (a file that is not "
           "one of its images: move it out of the raw folder), then run the converter again")


@contextlib.contextmanager
def open_raw(path: str):
    """`Image.open(path)` for the block; a file that cannot be opened or decoded there (a
    truncated download) raised as CorruptImageError naming it and the fix."""
    try:
        with Image.open(path) as im:
            yield im
    except UserError:  # the block's own finding (a ValueError too), not a decode's
        raise
    except DECODE_ERRORS as err:
        raise unreadable("raw image", path, err, RAW_FIX) from err


def read_rgb(path: str) -> np.ndarray:
    """A raw image as the released scripts' `cv2.imread(path)` (OpenCV's default colour
    mode) gives it, in RGB order. [H, W, 3] uint8: grey as 3 equal channels, alpha
    dropped, 16-bit samples shifted right by 8 bits (Pillow's convert would clip
    them), an EXIF orientation applied (Pillow leaves it to the caller).

    Raises:
      CorruptImageError: the file cannot be decoded (`open_raw`).
    """
    with open_raw(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in DEEP_GREY_MODES:
            grey = (np.asarray(im, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=-1)
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def stem(name: str) -> str:
    """The released scripts' stem: the file name up to its first dot."""
    return name.split(".")[0]
