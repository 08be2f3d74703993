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

import dataclasses
import logging
import os

import numpy as np
from sklearn.model_selection import train_test_split

from fsad.data.cache import cached_imageset, listing_fingerprint
from fsad.data.decode import IMAGE_SUFFIXES, NOT_IMAGES, decode_many, left_out, list_images
from fsad.data.imageset import NORMAL, ImageSet
from fsad.errors import UserError

LAYOUT_HELP = ("expected the MVTec AD layout: ROOT/train/good/*.png, ROOT/test/good/*.png, "
               "ROOT/test/<anomaly_class>/*.png, optional "
               "ROOT/ground_truth/<class>/<stem>_mask.png")


def split_normals_3_to_1(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The authors' 3:1 split of normals for sets without a test split: (train idx, test idx).

    Raises:
      UserError: fewer than 2 normals (scikit-learn's split left one side empty).
    """
    if n < 2:
        raise UserError(f"{n} normal image{'' if n == 1 else 's'}: too few to split 3:1 into "
                        f"training and test normals (at least 2 are needed); add normal "
                        f"images")
    idx = np.arange(n)
    train, test = train_test_split(idx, test_size=0.25, random_state=42)
    return np.asarray(train), np.asarray(test)


MASK_FORMATS = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")  # in this order


def mask_paths_of(root: str, rows) -> list[str | None]:
    """Each anomaly row's mask in ground_truth/<class>/, None for a normal row or where
    there is none: <stem>_mask, <stem> or <stem>_label ("_label.PNG": Optical (DAGM) masks
    as the released converter copies them, spec §9.3), in any of MASK_FORMATS, whose
    case is not compared (X_mask.JPG was not found before, and its image was said to
    have no mask). rows: `scan_folder`'s (path, class, split)."""
    found: dict[str, dict] = {}  # class -> {(name without suffix, lower-case suffix): file}
    out = []
    for path, cls, _ in rows:
        if cls == NORMAL:
            out.append(None)
            continue
        folder = os.path.join(root, "ground_truth", cls)
        if cls not in found:
            names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
            index = {}
            for f in names:
                base, suffix = os.path.splitext(f)
                if suffix.lower() in MASK_FORMATS and (suffix.islower()
                                                       or (base, suffix.lower()) not in index):
                    index[base, suffix.lower()] = f
            found[cls] = index
        stem = os.path.splitext(os.path.basename(path))[0]
        hits = (found[cls].get((stem + end, suffix)) for suffix in MASK_FORMATS
                for end in ("_mask", "", "_label"))
        name = next((h for h in hits if h is not None), None)
        out.append(None if name is None else os.path.join(folder, name))
    return out


def scan_folder(root: str) -> list[tuple[str, str, str]]:
    """Lists (path, class, split) for every image, validating the layout.

    Raises:
      UserError: a missing root, train/good or test folder, an empty train/good or
        anomaly-class folder, or no anomaly class at all.
    """
    if not os.path.isdir(root):
        raise UserError(f"dataset folder {root!r} does not exist; check --config.data.root "
                        f"and --config.data.subset ({LAYOUT_HELP})")
    train_good = os.path.join(root, "train", NORMAL)
    if not os.path.isdir(train_good):
        subsets = sorted(d for d in os.listdir(root)
                         if os.path.isdir(os.path.join(root, d, "train", NORMAL)))
        if subsets:  # a root of several datasets, as the converters write it
            raise UserError(f"{train_good!r} is missing, and {root!r} holds datasets in "
                            f"subfolders ({', '.join(subsets[:5])}"
                            f"{', ...' if len(subsets) > 5 else ''}); point at one of them, "
                            f"e.g. {os.path.join(root, subsets[0])!r} (data.root, with "
                            f"data.subset the folder under it)")
        raise UserError(f"{train_good!r} is missing; put the normal training images there "
                        f"({LAYOUT_HELP})")
    rows = [(p, NORMAL, "train") for p in list_images(train_good)]
    if not rows:
        raise UserError(f"{train_good!r} holds no images; put the normal training images "
                        f"there ({LAYOUT_HELP})")
    test_dir = os.path.join(root, "test")
    if not os.path.isdir(test_dir):
        raise UserError(f"{test_dir!r} is missing; put the anomalies in "
                        f"test/<anomaly_class>/ ({LAYOUT_HELP})")
    for cls in sorted(os.listdir(test_dir)):
        folder = os.path.join(test_dir, cls)
        if not os.path.isdir(folder) or cls.startswith("."):  # .ipynb_checkpoints: no class
            continue
        files = list_images(folder)
        if not files:
            raise UserError(f"class folder {folder!r} holds no images; add images or remove "
                            f"the folder")
        rows += [(p, cls, "test") for p in files]
    if not any(c != NORMAL for _, c, _ in rows):
        raise UserError(f"{test_dir!r} has no anomaly class folder; put the anomalies in "
                        f"test/<anomaly_class>/ ({LAYOUT_HELP})")
    return rows


def check_masks(root: str, rows, mask_paths) -> None:
    """Warns about masks without an image and, where a class has masks, images without
    one (pixel metrics leave those out)."""
    by_class: dict[str, set] = {}
    for (path, cls, _), mask in zip(rows, mask_paths):
        if cls != NORMAL:
            by_class.setdefault(cls, set()).add(os.path.splitext(os.path.basename(path))[0])
    gt = os.path.join(root, "ground_truth")
    used = {os.path.abspath(m) for m in mask_paths if m is not None}
    for cls in sorted(os.listdir(gt)) if os.path.isdir(gt) else []:
        if cls.startswith("."):  # .DS_Store, which Finder leaves: a traceback before
            continue
        if not os.path.isdir(os.path.join(gt, cls)):
            logging.warning("%s is a file directly in ground_truth/; it is ignored (masks go "
                            "in ground_truth/<class>/)", os.path.join(gt, cls))
            continue
        for f in sorted(os.listdir(os.path.join(gt, cls))):
            path = os.path.abspath(os.path.join(gt, cls, f))
            if path not in used and not f.startswith("."):
                logging.warning("mask %s has no image in test/%s/; it is ignored (rename it "
                                "<image stem>_mask.png or remove it)", path, cls)
    missing = [p for (p, c, _), m in zip(rows, mask_paths) if c != NORMAL and m is None]
    if used and missing:
        logging.warning("%d anomaly image(s) have no mask in ground_truth/ (e.g. %s); pixel "
                        "metrics leave them out", len(missing), missing[0])


def check_left_out(root: str) -> None:
    """Warns about what the layout leaves out: files that are not images fsad reads and
    folders inside train/good or a class folder, and files directly in test/ (a class
    is a folder)."""
    out = [os.path.join("train", NORMAL, f) for f in left_out(os.path.join(root, "train",
                                                                              NORMAL))]
    test = os.path.join(root, "test")
    for name in sorted(os.listdir(test)):
        if name.startswith("."):  # hidden: no class (scan_folder), not said either
            continue
        if os.path.isdir(os.path.join(test, name)):
            out += [os.path.join("test", name, f) for f in left_out(os.path.join(test, name))]
        elif name not in NOT_IMAGES:
            out.append(os.path.join("test", name))
    if out:
        logging.warning("%d file(s) and folder(s) under %s are not in the dataset (%s%s): "
                        "images go directly into train/good/ and test/<class>/, as %s",
                        len(out), root, ", ".join(out[:3]), ", ..." if len(out) > 3 else "",
                        ", ".join(IMAGE_SUFFIXES))


def folder_without_pixels(root: str) -> ImageSet:
    """The rows of an MVTec-layout folder without their pixels (`ImageSet.without_pixels`):
    its files listed and the layout checked (`scan_folder`), none decoded; the rows, their
    order and split are those `read_folder` decodes."""
    root = os.path.abspath(root)
    rows = scan_folder(root)
    check_left_out(root)  # here, not at the decode: a cached set's later strays too
    return _rows_without_pixels(root, rows)


def _rows_without_pixels(root: str, rows) -> ImageSet:
    """The pixel-free ImageSet of `scan_folder`'s rows: normals split 3:1 where the set has
    no test/good."""
    classes = np.array([r[1] for r in rows])
    split = np.array([r[2] for r in rows])
    if not np.any((classes == NORMAL) & (split == "test")):
        normals = np.flatnonzero(classes == NORMAL)
        _, test = split_normals_3_to_1(len(normals))
        split[normals[test]] = "test"
    file_ids = np.array([os.path.relpath(r[0], root) for r in rows])
    return ImageSet.without_pixels(_folder_name(root), classes, split, file_ids)


def _folder_name(root: str) -> str:
    return os.path.basename(root.rstrip("/"))


def read_folder(root: str, size: int, cache_dir: str | None = None,
                mask_resize: str = "nearest") -> ImageSet:
    """Decodes an MVTec-layout folder to an ImageSet at size x size (cached).

    Args:
      root: the subset folder holding train/ and test/.
      size: output side length in pixels.
      cache_dir: where decoded arrays are kept ("" to disable).
      mask_resize: how masks are resized, "nearest" or "opencv_linear" (the released
        localisation's; `fsad.data.decode.decode_mask`).
    """
    root = os.path.abspath(root)
    rows = scan_folder(root)
    paths = [r[0] for r in rows]
    mask_paths = mask_paths_of(root, rows)
    # v 3: 16-bit grey within 0..255 read as it is, no longer scaled (decode.pil_rgb);
    # the masks' own listing: a mask added, mended or removed served the old ones
    key = {"name": _folder_name(root), "root": root, "size": size,
           "files": listing_fingerprint(paths),
           "masks": listing_fingerprint(m for m in mask_paths if m), "v": 3}
    if mask_resize != "nearest":  # the key of a nearest read stays what it was
        key["mask_resize"] = mask_resize

    def build() -> ImageSet:
        check_masks(root, rows, mask_paths)
        images = decode_many(paths, size, desc=f"decoding {key['name']}")
        masks = present = None
        if any(m is not None for m in mask_paths):
            masks = decode_many(mask_paths, size, desc="decoding masks", mask=True,
                                mask_resize=mask_resize)
            present = np.array([m is not None for m in mask_paths])
        return dataclasses.replace(_rows_without_pixels(root, rows), images=images,
                                   masks=masks, mask_present=present)

    return cached_imageset(key, build, cache_dir)
