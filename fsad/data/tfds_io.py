"""TensorFlow Datasets (TFDS): write any fsad dataset as a TFDS dataset, read it back,
and read any prepared TFDS image-classification dataset as a one-vs-rest protocol.

Writing and reading both run without TensorFlow: images are PNG-encoded with
Pillow before TFDS sees them (TFDS's own encoder of NumPy images calls
``tf.image.encode_png``), the builder is a plain ``GeneratorBasedBuilder``
(``tfds.dataset_builders.store_as_tfds_dataset`` checks its inputs against
``tf.data.Dataset`` and so imports TensorFlow), the files are ``array_record``,
and reading goes through ``tfds.data_source``.

An fsad dataset in TFDS has the splits ``train`` and ``test`` of the ImageSet
(``split``), one example per image:

    image       Image (H, W, 3) uint8, PNG, at the source file's own size
    label       ClassLabel ["normal", "anomaly"]
    class_name  Text   "good" or the anomaly class
    file_id     Text   path relative to the dataset root (as the folder/ELPV readers)
    index       int64  row of the ImageSet (the readers' order)
    mask        Image (H, W, 1) uint8 {0, 255}, only when the dataset has masks
    mask_present  bool  the image has a mask file (an anomaly without one: False, its mask
                all zero; pixel metrics leave it out), with `mask`

and ``metadata.json`` with ``fsad_format`` and the ImageSet's name. Reading
resizes exactly as the folder and ELPV readers do, so ``data.name=tfds`` gives
the same ImageSet, pixel for pixel, as the reader the dataset was written from.

    python -m fsad.data.tfds_io elpv ~/tensorflow_datasets             # -> fsad_elpv
    python -m fsad.data.tfds_io /data/mvtec/bottle ~/tensorflow_datasets --name mvtec_bottle
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import dataclasses
import io
import logging
import os
import re
import shutil
import sys
import tempfile

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fsad.data.cache import cached_imageset, cached_rows, listing_fingerprint
from fsad.data.decode import CorruptImageError, load_rgb, resize_mask, resize_rgb
from fsad.data.folders import mask_paths_of, scan_folder, split_normals_3_to_1
from fsad.data.imageset import NORMAL, ImageSet
from fsad.errors import UserError

FORMAT = 1  # metadata["fsad_format"] of datasets written here
VERSION = "1.0.0"
LABEL_NAMES = ["normal", "anomaly"]
_CHUNK = 64  # examples decoded per worker task


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise UserError("TFDS support needs tensorflow-datasets and array_record, which fsad "
                        "depends on; reinstall fsad (pip install -e .) or pip install "
                        "tensorflow-datasets array_record (TensorFlow itself is not needed)"
                        ) from err
    return tfds


@contextlib.contextmanager
def _temporary_folders_removed():
    """TFDS (4.9) makes a temporary folder each time it makes a builder whose dataset is
    not written yet (`DatasetInfo.initialize_from_bucket`, for metadata it never fetches
    offline) and leaves it behind, empty: /tmp/tmp...tfds, one per conversion. Inside
    this context Python's temporary folders go into one that is removed at its end."""
    with tempfile.TemporaryDirectory(prefix="fsad_tfds_") as scratch:
        before, tempfile.tempdir = tempfile.tempdir, scratch
        try:
            yield
        finally:
            tempfile.tempdir = before


# ------------------------------------------------------------------ sources


@dataclasses.dataclass
class SourceTable:
    """An fsad dataset as files, in the order and with the labels its reader gives.

    Attributes:
      name: the ImageSet's name.
      paths: [N] image files.
      classes, split, file_ids: [N] str, as ImageSet.
      mask_paths: [N] mask file or None per image; None when the dataset has no masks.
    """

    name: str
    paths: list
    classes: np.ndarray
    split: np.ndarray
    file_ids: np.ndarray
    mask_paths: list | None = None


def folder_source(root: str) -> SourceTable:
    """An MVTec-layout folder as `read_folder` reads it (same order, split and masks)."""
    root = os.path.abspath(root)
    rows = scan_folder(root)
    classes = np.array([r[1] for r in rows])
    split = np.array([r[2] for r in rows])
    if not np.any((classes == NORMAL) & (split == "test")):  # read_folder's 3:1 rule
        normals = np.flatnonzero(classes == NORMAL)
        _, test = split_normals_3_to_1(len(normals))
        split[normals[test]] = "test"
    paths = [r[0] for r in rows]
    masks = mask_paths_of(root, rows)
    return SourceTable(os.path.basename(root.rstrip("/")), paths, classes, split,
                       np.array([os.path.relpath(p, root) for p in paths]),
                       masks if any(m is not None for m in masks) else None)


def elpv_source() -> SourceTable:
    """ELPV from the `elpv-dataset` package as `read_elpv` reads it."""
    from fsad.data.elpv import elpv_layout
    data_dir, paths, classes, split = elpv_layout()
    return SourceTable("elpv", [os.path.join(data_dir, p) for p in paths], classes, split,
                       paths)


def source_for(source: str) -> SourceTable:
    """"elpv" or the path of an MVTec-layout folder."""
    return elpv_source() if source == "elpv" else folder_source(source)


# ------------------------------------------------------------------ writing


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _encode_row(table: SourceTable, i: int) -> dict:
    image = load_rgb(table.paths[i])
    ex = {"image": _png(image), "label": int(table.classes[i] != NORMAL),
          "class_name": str(table.classes[i]), "file_id": str(table.file_ids[i]), "index": i}
    if table.mask_paths is not None:
        path = table.mask_paths[i]
        if path is None:  # normals, and anomalies without a mask file: all zero
            mask = np.zeros(image.shape[:2], np.uint8)
        else:
            try:
                with Image.open(path) as im:  # binarised as decode_mask does: any non-zero
                    mask = (np.asarray(im.convert("L")) > 0).astype(np.uint8) * 255
            except OSError as err:
                raise CorruptImageError(f"cannot decode mask {path!r} ({err})",
                                        "remove or replace the file, then rerun") from err
        ex["mask"] = _png(mask)  # grey PNG; TFDS gives it back as (H, W, 1)
        ex["mask_present"] = path is not None
    return ex


def _features(tfds, has_masks: bool):
    f = {"image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
         "label": tfds.features.ClassLabel(names=LABEL_NAMES),
         "class_name": tfds.features.Text(),
         "file_id": tfds.features.Text(),
         "index": tfds.features.Scalar(dtype=np.int64)}
    if has_masks:
        f["mask"] = tfds.features.Image(shape=(None, None, 1), encoding_format="png")
        f["mask_present"] = tfds.features.Scalar(dtype=np.bool_)
    return tfds.features.FeaturesDict(f)


def _builder_class(tfds):
    class FsadBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Writes one SourceTable; its name is given per instance (as TFDS's AdhocBuilder)."""

        VERSION = tfds.core.Version(VERSION)
        # No source file or checksums to find. TFDS 4.9's lookup of them, for a class
        # inside a package, needs `importlib_resources` (not installed on Python >= 3.9).
        code_path = None

        def __init__(self, *, name: str, table: SourceTable, **kwargs):
            self.name = name
            self._table = table
            super().__init__(**kwargs)

        def _info(self):
            t = self._table
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"fsad dataset {t.name!r}: normals and anomalies in the "
                            f"papers' few-shot anomaly-detection layout.",
                features=_features(tfds, t.mask_paths is not None),
                disable_shuffling=True,  # keep the readers' order
                metadata=tfds.core.MetadataDict(fsad_format=FORMAT, name=t.name,
                                                has_masks=t.mask_paths is not None))

        def _split_generators(self, dl_manager):
            del dl_manager
            return {s: self._generate_examples(s) for s in ("train", "test")
                    if np.any(self._table.split == s)}

        def _generate_examples(self, split):
            idx = np.flatnonzero(self._table.split == split).tolist()
            workers = min(8, (os.cpu_count() or 1) * 2)
            with futures.ThreadPoolExecutor(workers) as pool:
                for start in range(0, len(idx), 256):  # bounded memory: 256 encoded at a time
                    chunk = idx[start:start + 256]
                    for i, ex in zip(chunk, pool.map(lambda j: _encode_row(self._table, j),
                                                     chunk)):
                        yield i, ex

    return FsadBuilder


def write_tfds(table: SourceTable, tfds_name: str, tfds_dir: str,
               overwrite: bool = False) -> str:
    """Writes `table` as the TFDS dataset `tfds_name` (array_record) under `tfds_dir`.

    Args:
      table: the dataset's files (folder_source, elpv_source).
      tfds_name: TFDS dataset name, lower-case snake case (e.g. "fsad_elpv").
      tfds_dir: TFDS data_dir; the dataset lands in tfds_dir/tfds_name/1.0.0.
      overwrite: replace an existing version folder.
    Returns:
      The version folder written.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*", tfds_name):
        raise UserError(f"TFDS name {tfds_name!r} is not lower-case snake case; use e.g. "
                        f"'fsad_{re.sub(r'[^a-z0-9_]', '_', tfds_name.lower())}'")
    tfds = _tfds()
    tfds_dir = os.path.abspath(os.path.expanduser(tfds_dir))
    target = os.path.join(tfds_dir, tfds_name, VERSION)
    if os.path.exists(target):
        if not overwrite:
            raise UserError(f"TFDS dataset {target!r} already exists; pass --overwrite to "
                            f"replace it, or choose another name")
        shutil.rmtree(target)
    with _temporary_folders_removed():
        builder = _builder_class(tfds)(name=tfds_name, table=table, data_dir=tfds_dir,
                                       file_format="array_record")
    with tempfile.TemporaryDirectory() as downloads:  # TFDS makes one; nothing is downloaded
        builder.download_and_prepare(download_dir=downloads)
    return target


# ------------------------------------------------------------------ reading


def _builder(tfds_name: str, tfds_dir: str | None):
    tfds = _tfds()
    data_dir = os.path.expanduser(tfds_dir) if tfds_dir else None
    try:
        with _temporary_folders_removed():  # a known dataset not prepared there makes one
            return tfds.builder(tfds_name, data_dir=data_dir)
    except Exception as err:  # DatasetNotFoundError lists the whole catalogue: keep it short
        where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets, $TFDS_DATA_DIR)"
        raise UserError(f"no TFDS dataset {tfds_name!r} in {where} ({type(err).__name__}); "
                        f"set --config.data.tfds_dir to the data_dir that holds it, or write "
                        f"one with python -m fsad.data.tfds_io") from err


def _unprepared(builder, tfds_name: str) -> str:
    """For an error about a builder: what to do where its dataset is not prepared (no
    files in its data_dir: offline, nothing can be downloaded), else ""."""
    try:
        prepared = builder.is_prepared()
    except Exception:  # noqa: BLE001 - a builder that cannot say: no hint
        return ""
    if prepared:
        return ""
    return (f"; {tfds_name!r} is not prepared in {builder.data_dir} (TFDS knows its name, "
            f"not its files): prepare it with tfds build {tfds_name} "
            f"--file_format=array_record --data_dir DIR where it can be downloaded, and pass "
            f"--config.data.tfds_dir=DIR")


def _sources(builder, tfds_name: str, skip=()) -> dict:
    """{split: data source}; the features named in `skip` (images, masks) come back as
    their encoded bytes, not decoded. A builder that lists no splits (not prepared, or
    mocked by tfds.testing.mock_data) is asked for the usual train and test."""
    splits = sorted(builder.info.splits) or ["train", "test"]
    decoders = {k: _tfds().decode.SkipDecoding() for k in skip} or None
    try:
        return {s: builder.as_data_source(split=s, decoders=decoders) for s in splits}
    except Exception as err:
        raise UserError(f"TFDS dataset {tfds_name!r} cannot be read as a data source "
                        f"({type(err).__name__}: {str(err).splitlines()[0]})"
                        + (_unprepared(builder, tfds_name) or
                           f"; it must be prepared in the array_record format, e.g. tfds "
                           f"build {tfds_name} --file_format=array_record")) from err


def _read_examples(source, keep, desc: str) -> list:
    """Reads every example of a data source, keeping keep(i, example) (not None) in order."""
    n = len(source)

    def chunk(start):
        idx = list(range(start, min(n, start + _CHUNK)))
        try:
            items = list(source.__getitems__(idx))
        except (AttributeError, TypeError):  # tfds.testing.mock_data's sources lack it
            items = [source[i] for i in idx]
        return [keep(i, ex) for i, ex in zip(idx, items)]

    workers = min(8, (os.cpu_count() or 1) * 2)
    out = []
    with futures.ThreadPoolExecutor(workers) as pool:
        for part in tqdm(pool.map(chunk, range(0, n, _CHUNK)), total=-(-n // _CHUNK),
                         desc=desc, leave=False, disable=n < 200):
            out += [r for r in part if r is not None]
    return out


def _progress_label(tfds_name: str, split: str, size: int | None) -> str:
    return f"{'reading' if size is not None else 'listing'} {tfds_name} {split}"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def _fingerprint(builder) -> str:
    d = str(builder.data_dir)
    if not os.path.isdir(d):
        return "none"
    return listing_fingerprint(sorted(os.path.join(d, f) for f in os.listdir(d)))


def _fsad_builder(tfds_name: str, tfds_dir: str | None):
    """The builder of a dataset written by `write_tfds`, and its metadata."""
    builder = _builder(tfds_name, tfds_dir)
    meta = builder.info.metadata or {}
    if meta.get("fsad_format") != FORMAT:
        raise UserError(f"TFDS dataset {tfds_name!r} was not written by fsad (no fsad_format in "
                        f"its metadata); to read an image-classification dataset one class "
                        f"against the rest, set --config.data.normal_class=CLASS")
    return builder, meta


def _fsad_imageset(builder, meta, tfds_name: str, size: int | None,
                   mask_resize: str = "nearest", encoded: bool = True) -> ImageSet:
    """The ImageSet of a dataset written by `write_tfds`, at size x size; size None: its
    rows without their pixels (`ImageSet.without_pixels`), the images and masks read as
    bytes and never decoded (encoded=False: decoded by TFDS, not resized)."""
    has_masks = bool(meta.get("has_masks"))
    # which anomalies have a mask (datasets written before the field: None, every one)
    flags = has_masks and "mask_present" in builder.info.features
    skip = ("image", "mask") if has_masks else ("image",)
    skip = skip if size is None and encoded else ()
    rows = []
    for split, source in _sources(builder, tfds_name, skip).items():
        def keep(i, ex, split=split):
            if size is None:
                return int(ex["index"]), split, _text(ex["class_name"]), _text(ex["file_id"])
            return (int(ex["index"]), split, _text(ex["class_name"]), _text(ex["file_id"]),
                    int(ex["label"]), resize_rgb(_rgb(ex["image"]), size),
                    resize_mask(ex["mask"][..., 0], size, mask_resize) if has_masks
                    else None, bool(ex["mask_present"]) if flags else None)
        rows += _read_examples(source, keep, _progress_label(tfds_name, split, size))
    rows.sort(key=lambda r: r[0])
    if [r[0] for r in rows] != list(range(len(rows))):
        raise UserError(f"TFDS dataset {tfds_name!r} has missing or repeated indices; "
                        f"write it again with python -m fsad.data.tfds_io")
    name, classes = str(meta["name"]), np.array([r[2] for r in rows])
    split, file_ids = np.array([r[1] for r in rows]), np.array([r[3] for r in rows])
    if size is None:
        return ImageSet.without_pixels(name, classes, split, file_ids)
    present = np.array([r[7] for r in rows]) if flags else None
    labels = np.array([r[4] for r in rows], np.int8)
    if present is not None and present.any() and not present[labels == 1].all():
        missing = file_ids[(labels == 1) & ~present]
        logging.warning("%d anomaly image(s) of TFDS dataset %r have no mask (e.g. %s); "
                        "pixel metrics leave them out", len(missing), tfds_name, missing[0])
    return ImageSet(name, np.stack([r[5] for r in rows]), labels, classes, split, file_ids,
                    np.stack([r[6] for r in rows]) if has_masks else None, present)


def read_tfds(tfds_name: str, tfds_dir: str | None, size: int,
              cache_dir: str | None = None, mask_resize: str = "nearest") -> ImageSet:
    """Reads an fsad dataset written by `write_tfds` into an ImageSet at size x size (cached).

    Args:
      tfds_name: TFDS name (optionally with ":version").
      tfds_dir: TFDS data_dir ("" or None: TFDS's default).
      size: output side length in pixels.
      cache_dir: where decoded arrays are kept ("" to disable).
      mask_resize: "nearest" or "opencv_linear", as `read_folder`'s (the stored masks are
        binarised, which is the same for masks of 0 and 255).
    Returns:
      The ImageSet the source reader (folder or ELPV) gives, same order, names and pixels.
    """
    builder, meta = _fsad_builder(tfds_name, tfds_dir)
    return cached_imageset(
        _fsad_key(builder, meta, tfds_name, size, mask_resize),
        lambda: _fsad_imageset(builder, meta, tfds_name, size, mask_resize), cache_dir)


def _fsad_key(builder, meta, tfds_name: str, size: int, mask_resize: str) -> dict:
    """`read_tfds`'s cache key."""
    key = {"name": meta["name"], "tfds": tfds_name, "dir": str(builder.data_dir), "size": size,
           "files": _fingerprint(builder), "v": 1}
    if meta.get("has_masks") and mask_resize != "nearest":
        key["mask_resize"] = mask_resize
    return key


def tfds_without_pixels(tfds_name: str, tfds_dir: str | None, normal_class: str, size: int,
                        cache_dir: str | None = None, mask_resize: str = "nearest") -> ImageSet:
    """The rows `read_tfds` (or, with normal_class, `read_tfds_one_vs_rest`) returns with
    the same arguments, in their order and split, without their pixels
    (`ImageSet.without_pixels`), so a run checks its protocol before it decodes: from
    the readers' cache where it holds them, else from the records with their images (and
    masks) left encoded, none decoded or resized. Raises the UserErrors the readers raise
    for a missing dataset, a foreign one, or an unknown normal class."""
    if normal_class:
        builder, ovr = _one_vs_rest_builder(tfds_name, tfds_dir, normal_class)
        rows = cached_rows(_one_vs_rest_key(builder, ovr, tfds_name, size), cache_dir)
        return rows if rows is not None else _rows_from_records(
            lambda encoded: _one_vs_rest_imageset(builder, ovr, tfds_name, None,
                                                  encoded=encoded))
    builder, meta = _fsad_builder(tfds_name, tfds_dir)
    rows = cached_rows(_fsad_key(builder, meta, tfds_name, size, mask_resize), cache_dir)
    return rows if rows is not None else _rows_from_records(
        lambda encoded: _fsad_imageset(builder, meta, tfds_name, None, encoded=encoded))


def _rows_from_records(read) -> ImageSet:
    """read(encoded=True): the rows with the images left encoded. A source that needs
    TensorFlow to hand its images over encoded, as `tfds.testing.mock_data`'s (it
    encodes random arrays), is read decoded instead: the same rows, more slowly."""
    try:
        return read(True)
    except ModuleNotFoundError:
        return read(False)


def _feature_key(features, kind, preferred: str, tfds_name: str) -> str:
    if preferred in features and isinstance(features[preferred], kind):
        return preferred
    keys = [k for k, f in features.items() if isinstance(f, kind)]
    if len(keys) != 1:
        raise UserError(f"TFDS dataset {tfds_name!r} has {len(keys)} top-level "
                        f"{kind.__name__} features ({keys}), not one named {preferred!r}; "
                        f"the one-vs-rest reader needs an image and a class label")
    return keys[0]


@dataclasses.dataclass(frozen=True)
class _OneVsRest:
    """A TFDS classification dataset read one class against the rest: its image and label
    features, class names and the index of the normal class."""
    image_key: str
    label_key: str
    names: list
    normal: int


def _one_vs_rest_builder(tfds_name: str, tfds_dir: str | None, normal_class: str):
    """The builder of a TFDS classification dataset and its `_OneVsRest`."""
    tfds = _tfds()
    builder = _builder(tfds_name, tfds_dir)
    if (builder.info.metadata or {}).get("fsad_format") is not None:
        # its label is normal/anomaly: one against the rest lost its classes and masks
        raise UserError(f"TFDS dataset {tfds_name!r} was written by fsad, with its normals, "
                        f"anomaly classes and masks; read it without data.normal_class "
                        f"(--config.data.normal_class=)")
    features = builder.info.features
    image_key = _feature_key(features, tfds.features.Image, "image", tfds_name)
    label_key = _feature_key(features, tfds.features.ClassLabel, "label", tfds_name)
    names = list(features[label_key].names)
    if normal_class in names:
        normal = names.index(normal_class)
    elif str(normal_class).isdigit() and int(normal_class) < len(names):
        normal = int(normal_class)
    else:
        raise UserError(f"normal_class {normal_class!r} is not a class of {tfds_name!r}; use "
                        f"one of {names[:20]}{' ...' if len(names) > 20 else ''} or an index"
                        + _unprepared(builder, tfds_name))
    return builder, _OneVsRest(image_key, label_key, names, normal)


def _one_vs_rest_imageset(builder, ovr: _OneVsRest, tfds_name: str, size: int | None,
                          encoded: bool = True) -> ImageSet:
    """`read_tfds_one_vs_rest`'s ImageSet at size x size; size None: its rows without their
    pixels, the images read as bytes and never decoded (encoded=False: decoded by TFDS,
    not resized)."""
    normal, names = ovr.normal, ovr.names
    sources = _sources(builder, tfds_name,
                       (ovr.image_key,) if size is None and encoded else ())
    has_test = "test" in sources and "train" in sources
    rows = []  # (split name, index, label, image or None)
    for split, source in sources.items():
        if has_test and split not in ("train", "test"):
            continue

        def keep(i, ex, split=split):
            y = int(ex[ovr.label_key])
            if has_test and split == "train" and y != normal:
                return None
            return split, i, y, (resize_rgb(_rgb(ex[ovr.image_key]), size)
                                 if size is not None else None)
        rows += _read_examples(source, keep, _progress_label(tfds_name, split, size))
    normals = [r for r in rows if r[2] == normal]
    if has_test:
        normal_split = ["train" if r[0] == "train" else "test" for r in normals]
    else:
        normal_split = np.array(["train"] * len(normals), dtype=object)
        normal_split[split_normals_3_to_1(len(normals))[1]] = "test"
    anomalies = sorted((r for r in rows if r[2] != normal), key=lambda r: names[r[2]])
    if not normals or not anomalies:
        raise UserError(f"{tfds_name!r} with normal class {names[normal]!r} has "
                        f"{len(normals)} normal and {len(anomalies)} anomalous images; "
                        f"the protocol needs both")
    order = [i for i in range(len(normals)) if normal_split[i] == "train"] + \
            [i for i in range(len(normals)) if normal_split[i] == "test"]
    ordered = [normals[i] for i in order] + anomalies
    classes = np.array([NORMAL] * len(normals) + [names[r[2]] for r in anomalies])
    split = np.array([normal_split[i] for i in order] + ["test"] * len(anomalies))
    name, file_ids = f"{tfds_name}:{names[normal]}", np.array([f"{r[0]}/{r[1]}" for r in ordered])
    if size is None:
        return ImageSet.without_pixels(name, classes, split, file_ids)
    return ImageSet(name, np.stack([r[3] for r in ordered]), (classes != NORMAL).astype(np.int8),
                    classes, split, file_ids)


def read_tfds_one_vs_rest(tfds_name: str, tfds_dir: str | None, normal_class: str, size: int,
                          cache_dir: str | None = None) -> ImageSet:
    """Any prepared TFDS image-classification dataset as a one-vs-rest anomaly protocol.

    The rule: `normal_class` (a class name, or its integer index) is normal, every
    other class is an anomaly class of its own name. If the dataset has a ``test``
    split, training normals are the normal class of ``train`` and the images of the
    ``test`` split are the rest (its normals and its anomalies, of which a run's
    protocol draws the shots, `data.shot_pool` of them, leaving the test set; other
    splits and the other classes of ``train`` are not used), as the usual one-class
    protocol.
    Otherwise every split is pooled (splits in name order), the normals are split
    3:1 with the authors' ``train_test_split(test_size=0.25, random_state=42)``,
    and every other-class image is an anomaly. Images are read from the feature
    ``image`` (or the only Image feature), classes from ``label`` (or the only
    ClassLabel); grey images become RGB. The whole selection is decoded into
    memory, as every fsad reader does.

    Returns:
      ImageSet named "<tfds_name>:<class>", file_ids "<split>/<index in split>".
    """
    builder, ovr = _one_vs_rest_builder(tfds_name, tfds_dir, normal_class)
    return cached_imageset(_one_vs_rest_key(builder, ovr, tfds_name, size),
                           lambda: _one_vs_rest_imageset(builder, ovr, tfds_name, size),
                           cache_dir)


def _one_vs_rest_key(builder, ovr: _OneVsRest, tfds_name: str, size: int) -> dict:
    """`read_tfds_one_vs_rest`'s cache key."""
    normal = ovr.names[ovr.normal]
    return {"name": re.sub(r"[^A-Za-z0-9_.-]", "_", f"{tfds_name}-{normal}"),
            "tfds": tfds_name, "dir": str(builder.data_dir), "normal": normal,
            "size": size, "files": _fingerprint(builder), "v": 1}


# ------------------------------------------------------------------ command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fsad.data.tfds_io",
        description="Write an fsad dataset as a TFDS dataset (array_record; no TensorFlow "
                    "needed). Read it back with --config.data.name=tfds "
                    "--config.data.tfds_name=NAME --config.data.tfds_dir=TFDS_DIR.")
    p.add_argument("source", help="'elpv' (the elpv-dataset package) or an MVTec-layout "
                                  "folder (e.g. one written by python -m fsad.convert)")
    p.add_argument("tfds_dir", help="TFDS data_dir to write into (e.g. ~/tensorflow_datasets)")
    p.add_argument("--name", help="TFDS dataset name (default: fsad_<dataset name>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing version")
    args = p.parse_args(argv)
    try:
        if args.source != "elpv" and not os.path.isdir(args.source):
            raise UserError(f"source {args.source!r} is neither 'elpv' nor a folder; pass "
                            f"'elpv' or an MVTec-layout dataset folder")
        table = source_for(args.source)
        name = args.name or "fsad_" + re.sub(r"[^a-z0-9_]", "_", table.name.lower())
        target = write_tfds(table, name, args.tfds_dir, args.overwrite)
    except (UserError, FileNotFoundError, NotADirectoryError) as err:
        print(f"fsad.data.tfds_io: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fsad.data.tfds_io: interrupted before the dataset was complete; run the "
              "command again (with --overwrite where it says so)", file=sys.stderr)
        return 130
    counts = {s: int(np.sum(table.split == s)) for s in ("train", "test")}
    print(f"wrote {target}: {counts['train']} train + {counts['test']} test examples"
          f"{', with masks' if table.mask_paths is not None else ''}")
    print(f"read with: --config.data.name=tfds --config.data.tfds_name={name} "
          f"--config.data.tfds_dir={args.tfds_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
