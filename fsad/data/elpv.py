"""ELPV from the `elpv-dataset` package (spec §1).

2,624 300x300 grayscale solar cells with a defect probability and a cell type.
Probability 0 is normal, 1 is an anomaly, 1/3 and 2/3 are dropped; normals are
split 3:1 as the authors did; anomalies form the classes ``mono`` and ``poly``.
Counts: 1,131 train normal, 377 test normal, 313 mono and 402 poly anomalies.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from fsad.data.cache import cached_imageset
from fsad.data.decode import decode_many
from fsad.data.folders import split_normals_3_to_1
from fsad.data.imageset import NORMAL, ImageSet


def elpv_labels() -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """(data dir, relative paths [2624], probabilities [2624], types [2624]) from the package."""
    try:
        import elpv_dataset
    except ImportError:
        from fsad.errors import UserError
        raise UserError("ELPV (data.name=elpv, the configs' default) needs the elpv-dataset "
                        "package, which is not installed; pip install elpv-dataset (or pip "
                        "install -e . for all of fsad's dependencies), or read another "
                        "dataset with --config.data.name=folder") from None
    data_dir = os.path.join(os.path.dirname(elpv_dataset.__file__), "data")
    table = np.genfromtxt(os.path.join(data_dir, "labels.csv"), dtype=["|S19", "<f8", "|S4"],
                          names=["path", "probability", "type"])
    return (data_dir, np.char.decode(table["path"]), table["probability"],
            np.char.decode(table["type"]))


def elpv_layout() -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """The authors' ELPV protocol: normals (defect probability 0) split 3:1, anomalies
    (probability 1, classes mono and poly) all in test; uncertain cells left out.

    Returns:
      (data_dir, paths [N] relative to data_dir in order train normals, test normals,
      anomalies; classes [N] ("good", "mono", "poly"); split [N] "train" | "test").
    """
    data_dir, paths, probs, types = elpv_labels()
    normal = np.flatnonzero(probs == 0.0)
    anomaly = np.flatnonzero(probs == 1.0)
    train, test = split_normals_3_to_1(len(normal))
    order = np.concatenate([normal[train], normal[test], anomaly])
    classes = np.array([NORMAL] * len(normal) + [str(t) for t in types[anomaly]])
    split = np.array(["train"] * len(train) + ["test"] * (len(test) + len(anomaly)))
    return data_dir, paths[order].astype(str), classes, split


def elpv_without_pixels() -> ImageSet:
    """ELPV's rows without their pixels (`ImageSet.without_pixels`), from the package's
    label table: what the protocol's checks read, with no image decoded."""
    _, paths, classes, split = elpv_layout()
    return ImageSet.without_pixels("elpv", classes, split, paths)


def read_elpv(size: int, cache_dir: str | None = None) -> ImageSet:
    """Decodes ELPV at size x size into an ImageSet (cached)."""
    data_dir, paths, classes, split = elpv_layout()

    def build() -> ImageSet:
        images = decode_many([os.path.join(data_dir, p) for p in paths], size,
                             desc="decoding ELPV")
        return dataclasses.replace(ImageSet.without_pixels("elpv", classes, split, paths),
                                   images=images)

    return cached_imageset({"name": "elpv", "size": size, "n": len(paths), "v": 1}, build,
                           cache_dir)
