"""Reader for the MVTec AD folder layout (spec §1).

    ROOT/train/good/*                       normal training images
    ROOT/test/good/*                        normal test images (optional, see below)
    ROOT/test/<anomaly_class>/*             one folder per anomaly class
    ROOT/ground_truth/<class>/<stem>_mask.png   optional pixel masks

A set without ``test/good`` has its normals split 3:1 into train and test with
scikit-learn's ``train_test_split(test_size=0.25, random_state=42)``, as the
authors did.
"""

from __future__ import annotations

import os

import numpy as np
from sklearn.model_selection import train_test_split

from fsad.data.cache import cached_imageset, listing_fingerprint
from fsad.data.decode import decode_many, list_images
from fsad.data.imageset import NORMAL, ImageSet

LAYOUT_HELP = ("expected the MVTec AD layout: ROOT/train/good/*.png, ROOT/test/good/*.png, "
               "ROOT/test/<anomaly_class>/*.png, optional ROOT/ground_truth/<class>/<stem>_mask.png")


def split_normals_3_to_1(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The authors' 3:1 split of normals for sets without a test split: (train idx, test idx)."""
    idx = np.arange(n)
    train, test = train_test_split(idx, test_size=0.25, random_state=42)
    return np.asarray(train), np.asarray(test)


def _mask_path(root: str, cls: str, path: str) -> str | None:
    stem = os.path.splitext(os.path.basename(path))[0]
    folder = os.path.join(root, "ground_truth", cls)
    # "_label.PNG": Optical (DAGM) masks as the released converter copies them (spec §9.3)
    for suffix in (".png", ".bmp", ".tif", ".jpg", ".PNG"):
        for name in (f"{stem}_mask{suffix}", f"{stem}{suffix}", f"{stem}_label{suffix}"):
            cand = os.path.join(folder, name)
            if os.path.exists(cand):
                return cand
    return None


def scan_folder(root: str) -> list[tuple[str, str, str]]:
    """Lists (path, class, split) for every image, validating the layout.

    Raises:
      FileNotFoundError: a missing root or train/good folder.
      ValueError: an empty train/good, an empty anomaly-class folder, or no anomalies.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root!r} does not exist; {LAYOUT_HELP}")
    train_good = os.path.join(root, "train", NORMAL)
    if not os.path.isdir(train_good):
        raise FileNotFoundError(f"{train_good!r} is missing; {LAYOUT_HELP}")
    rows = [(p, NORMAL, "train") for p in list_images(train_good)]
    if not rows:
        raise ValueError(f"{train_good!r} holds no images (.png/.jpg/.bmp/.tif); {LAYOUT_HELP}")
    test_dir = os.path.join(root, "test")
    if not os.path.isdir(test_dir):
        raise FileNotFoundError(f"{test_dir!r} is missing: the anomalies live in "
                                f"test/<anomaly_class>/; {LAYOUT_HELP}")
    for cls in sorted(os.listdir(test_dir)):
        folder = os.path.join(test_dir, cls)
        if not os.path.isdir(folder):
            continue
        files = list_images(folder)
        if not files:
            raise ValueError(f"class folder {folder!r} holds no images: add images or remove "
                             f"the folder")
        rows += [(p, cls, "test") for p in files]
    if not any(c != NORMAL for _, c, _ in rows):
        raise ValueError(f"{test_dir!r} has no anomaly class folder; {LAYOUT_HELP}")
    return rows


def read_folder(root: str, size: int, cache_dir: str | None = None) -> ImageSet:
    """Decodes an MVTec-layout folder to an ImageSet at size x size (cached).

    Args:
      root: the subset folder holding train/ and test/.
      size: output side length in pixels.
      cache_dir: where decoded arrays are kept ("" to disable).
    """
    root = os.path.abspath(root)
    rows = scan_folder(root)
    paths = [r[0] for r in rows]
    key = {"name": os.path.basename(root.rstrip("/")), "root": root, "size": size,
           "files": listing_fingerprint(paths), "v": 1}

    def build() -> ImageSet:
        classes = np.array([r[1] for r in rows])
        split = np.array([r[2] for r in rows])
        labels = (classes != NORMAL).astype(np.int8)
        has_test_good = bool(np.any((classes == NORMAL) & (split == "test")))
        if not has_test_good:
            normals = np.flatnonzero(classes == NORMAL)
            _, test = split_normals_3_to_1(len(normals))
            split[normals[test]] = "test"
        mask_paths = [_mask_path(root, c, p) if c != NORMAL else None for p, c, _ in rows]
        images = decode_many(paths, size, desc=f"decoding {key['name']}")
        masks = None
        if any(m is not None for m in mask_paths):
            masks = decode_many(mask_paths, size, desc="decoding masks", mask=True)
        file_ids = np.array([os.path.relpath(p, root) for p in paths])
        return ImageSet(key["name"], images, labels, classes, split, file_ids, masks)

    return cached_imageset(key, build, cache_dir)
