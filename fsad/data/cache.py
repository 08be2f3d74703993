"""Decode once: decoded ImageSets are kept as .npz files keyed by their source."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from typing import Callable

import numpy as np

from fsad.atomic import whole_or_nothing
from fsad.data.imageset import ImageSet

# what np.load of a cut or emptied .npz raises (a torn write, a partial copy): rebuilt
UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def cached_imageset(key: dict, build: Callable[[], ImageSet], cache_dir: str | None) -> ImageSet:
    """Returns the cached ImageSet for `key`, building and storing it on a miss.

    Args:
      key: JSON-able description of the source (path, size, file listing hash...).
      build: decodes the dataset from its source.
      cache_dir: folder of .npz files; "" or None disables the cache.
    """
    if not cache_dir:
        return build()
    path = _cache_path(key, cache_dir)
    if os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as f:
                return ImageSet.from_arrays(dict(f))
        except UNREADABLE as err:  # a torn write: rebuild it
            logging.warning("ignoring unreadable cache %s (%s)", path, err)
    data = build()
    try:  # a failed or interrupted write (Ctrl-C) leaves no half file (GBs at 448 px)
        os.makedirs(cache_dir, exist_ok=True)
        with whole_or_nothing(path, suffix=".npz") as tmp:
            np.savez(tmp, **data.to_arrays())
    except OSError as err:  # a cache that cannot be written costs a decode, not the run
        logging.warning("cannot keep the decoded images in %s (%s); going on without the "
                        "cache (point --config.data.cache_dir at a writable folder, or set "
                        "it empty to turn the cache off)", cache_dir, err.strerror or err)
    return data


def cached_rows(key: dict, cache_dir: str | None) -> ImageSet | None:
    """The rows of the ImageSet `cached_imageset` keeps for `key`, without their pixels
    (`ImageSet.without_pixels`; the images are not read from the file), or None when it
    keeps none (or the file cannot be read)."""
    path = _cache_path(key, cache_dir) if cache_dir else ""
    if not path or not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            return ImageSet.without_pixels(str(f["name"]), f["classes"], f["split"],
                                           f["file_ids"])
    except UNREADABLE:  # a torn write: cached_imageset rebuilds it
        return None


def _cache_path(key: dict, cache_dir: str) -> str:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{key.get('name', 'data')}-{key.get('size')}-{digest}.npz")


def listing_fingerprint(paths) -> str:
    """Hash of file names, sizes and mtimes (in nanoseconds: a file rewritten within the
    second at the same size, a Mastcam .npy of the same shape, served the old pixels when
    they were seconds): changes when the folder changes. A path that cannot be read (a
    link to nothing) goes in as such, for the decoding to name it."""
    h = hashlib.sha1()
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            h.update(f"{p}|unreadable".encode())
            continue
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()
