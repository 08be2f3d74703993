"""Datasets: readers, protocols and the procedural test set."""

from __future__ import annotations

import logging
import os
import tempfile

from PIL import Image

from fsad.cache_folder import fsad_cache
from fsad.data.decode import list_images
from fsad.data.elpv import elpv_without_pixels, read_elpv
from fsad.data.folders import folder_without_pixels, read_folder
from fsad.data.imageset import ImageSet
from fsad.data.protocols import Split, make_split
from fsad.data.synthetic import write_synthetic_dataset
from fsad.errors import UserError


def load_imageset(data_cfg) -> ImageSet:
    """Loads the dataset a config names.

    data_cfg fields: name ("elpv", "folder", "synthetic" or "tfds"), root (folder and
    synthetic), subset (optional folder under root), img_size, cache_dir, mask_resize; for
    "tfds": tfds_name, tfds_dir, normal_class.
    """
    cache_dir = _cache_dir(data_cfg)
    if data_cfg.name == "elpv":
        return read_elpv(data_cfg.img_size, cache_dir)
    if data_cfg.name in ("folder", "synthetic"):
        root = _folder_root(data_cfg)
        if data_cfg.name == "synthetic":
            _warn_if_resized(root, data_cfg.img_size)
        return read_folder(root, data_cfg.img_size, cache_dir, _mask_resize(data_cfg))
    if data_cfg.name == "tfds":
        return _load_tfds(data_cfg, cache_dir)
    raise _unknown_reader(data_cfg)


def dataset_without_pixels(data_cfg, write: bool = True) -> ImageSet:
    """The rows of the dataset a config names without their pixels, none decoded: elpv
    (the package's label table), folder and synthetic (the files listed; the synthetic set
    is a folder, written first when missing) and tfds (from its decoded cache, else the
    records read with their images left encoded). It raises the UserError `load_imageset`
    would for a missing folder, an empty class or an unknown TFDS dataset or class. The
    labels, classes and split are those `load_imageset` returns, so a run checks its
    protocol (shots, known class, contamination) before it creates its workdir, loads
    weights, decodes or compiles.

    write: False (a --check) leaves a missing synthetic set unwritten: its rows are listed
      from a copy written to a temporary folder and removed.

    Returns:
      an ImageSet with images [N, 0, 0, 3] and no masks.
    """
    if data_cfg.name == "elpv":
        return elpv_without_pixels()
    if data_cfg.name in ("folder", "synthetic"):
        root = _folder_root(data_cfg, write)
        if data_cfg.name == "synthetic" and not os.path.isdir(root):  # not written: a copy
            with tempfile.TemporaryDirectory() as tmp:  # named as root: the rows' set name
                return folder_without_pixels(_write_synthetic(
                    os.path.join(tmp, os.path.basename(os.path.abspath(root))), data_cfg))
        return folder_without_pixels(root)
    if data_cfg.name == "tfds":
        from fsad.data import tfds_io  # imports tensorflow_datasets only when asked for
        return tfds_io.tfds_without_pixels(*_tfds_source(data_cfg), data_cfg.img_size,
                                           _cache_dir(data_cfg), _mask_resize(data_cfg))
    raise _unknown_reader(data_cfg)


def _folder_root(data_cfg, write: bool = True) -> str:
    """data.root/data.subset of a folder reader (folder, synthetic); the synthetic set is
    written there first when that folder is missing (unless write is False)."""
    if not data_cfg.get("root"):
        raise UserError(f"data.name={data_cfg.name!r} reads a folder and data.root is "
                        f"empty; pass --config.data.root=PATH")
    root = os.path.join(data_cfg.root, data_cfg.get("subset") or "")
    if write and data_cfg.name == "synthetic" and not os.path.isdir(root):
        _write_synthetic(root, data_cfg)
    if data_cfg.name == "synthetic" and os.path.isdir(root) and not os.listdir(root):
        raise UserError(f"{root!r} (data.root) is an empty folder, and data.name=synthetic "
                        f"writes its set only where that folder does not exist; remove it, "
                        f"or name a new one")
    return root


def _write_synthetic(root: str, data_cfg) -> str:
    """The procedural set a data.name=synthetic config reads, written to root."""
    return write_synthetic_dataset(root, size=data_cfg.img_size, seed=0)


def _warn_if_resized(root: str, size: int) -> None:
    """A warning where the procedural set in root was written at another size than the
    run's data.img_size (the set is written once, at the first run's size)."""
    good = os.path.join(root, "train", "good")
    images = list_images(good) if os.path.isdir(good) else []
    if not images:
        return
    first = images[0]
    with Image.open(first) as im:
        written = im.size[0]
    if written != size:
        logging.warning("data.root=%s holds the procedural set written at %d px; "
                        "data.img_size=%d resizes it (a new data.root writes it at %d px)",
                        root, written, size, size)


def _load_tfds(data_cfg, cache_dir) -> ImageSet:
    """data.name=tfds: data.tfds_name in data.tfds_dir; with data.normal_class, one class of
    a TFDS image-classification dataset against the rest (fsad.data.tfds_io)."""
    from fsad.data import tfds_io  # imports tensorflow_datasets only when asked for
    name, tfds_dir, normal_class = _tfds_source(data_cfg)
    if normal_class:
        return tfds_io.read_tfds_one_vs_rest(name, tfds_dir, normal_class, data_cfg.img_size,
                                             cache_dir)
    return tfds_io.read_tfds(name, tfds_dir, data_cfg.img_size, cache_dir,
                             _mask_resize(data_cfg))


def _tfds_source(data_cfg) -> tuple[str, str | None, str]:
    """(data.tfds_name, data.tfds_dir, data.normal_class as a string, "" for a dataset
    written by fsad) of a data.name=tfds config."""
    if not data_cfg.get("tfds_name"):
        raise UserError("data.name='tfds' needs a dataset name; pass "
                        "--config.data.tfds_name=NAME (and --config.data.tfds_dir=DIR)")
    return (data_cfg.tfds_name, data_cfg.get("tfds_dir"),
            str(data_cfg.normal_class) if data_cfg.get("normal_class") else "")


def _unknown_reader(data_cfg) -> UserError:
    return UserError(f"data.name={data_cfg.name!r} is not a dataset reader; use elpv, folder, "
                     f"synthetic or tfds")


def _cache_dir(data_cfg) -> str:
    """data.cache_dir; None (unset): $FSAD_CACHE, else ~/.cache/fsad; "": no cache."""
    cache_dir = data_cfg.get("cache_dir")
    return cache_dir if cache_dir is not None else fsad_cache()


def _mask_resize(data_cfg) -> str:
    """data.mask_resize, "nearest" where a config predates the field."""
    return data_cfg.get("mask_resize", "nearest")


__all__ = ["ImageSet", "Split", "dataset_without_pixels", "load_imageset", "make_split",
           "read_elpv", "read_folder", "write_synthetic_dataset"]
