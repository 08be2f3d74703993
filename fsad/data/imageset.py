"""The in-memory form every reader returns: decoded uint8 images and their labels."""

from __future__ import annotations

import dataclasses

import numpy as np

NORMAL = "good"


@dataclasses.dataclass
class ImageSet:
    """A decoded dataset, one row per image.

    Attributes:
      name: dataset name (for messages and results).
      images: [N, H, W, 3] uint8.
      labels: [N] int8, 0 normal, 1 anomaly.
      classes: [N] str, "good" for normals, else the anomaly class name.
      split: [N] str, "train" or "test" (the dataset's own split; normals only
        ever come from "train" for training).
      file_ids: [N] str, paths relative to the dataset root.
      masks: [N, H, W] uint8 {0, 1}, or None when the dataset has no masks.
        An anomaly without a mask file has an all-zero mask.
      mask_present: [N] bool, which rows have a mask file (None: every anomaly has one
        when masks exist); pixel metrics use only anomalies with a mask.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    classes: np.ndarray
    split: np.ndarray
    file_ids: np.ndarray
    masks: np.ndarray | None = None
    mask_present: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.images)
        for field in ("labels", "classes", "split", "file_ids"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"{self.name}: {field} has {len(getattr(self, field))} rows, "
                                 f"images has {n}")

    @classmethod
    def without_pixels(cls, name: str, classes, split, file_ids) -> "ImageSet":
        """A dataset's rows without their pixels (images [N, 0, 0, 3], no masks): the
        labels, classes and split that the protocol's checks read, known from a file
        listing, label table or records before any image is decoded.

        Args:
          classes: [N] str, "good" for normals. split: [N] "train" | "test".
          file_ids: [N] str, paths relative to the dataset root.
        """
        classes = np.asarray(classes)
        return cls(name, np.zeros((len(classes), 0, 0, 3), np.uint8),
                   (classes != NORMAL).astype(np.int8), classes, np.asarray(split),
                   np.asarray(file_ids))

    @property
    def anomaly_classes(self) -> list[str]:
        return sorted(set(self.classes[self.labels == 1].tolist()))

    def counts(self) -> dict[str, int]:
        out = {"train_normal": int(np.sum((self.labels == 0) & (self.split == "train"))),
               "test_normal": int(np.sum((self.labels == 0) & (self.split == "test")))}
        for c in self.anomaly_classes:
            out[f"anomaly_{c}"] = int(np.sum(self.classes == c))
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = dataclasses.asdict(self)
        out["name"] = np.array(self.name)
        for optional in ("masks", "mask_present"):
            if out[optional] is None:
                del out[optional]
        return out

    @classmethod
    def from_arrays(cls, arrays) -> "ImageSet":
        kw = {k: arrays[k] for k in ("images", "labels", "classes", "split", "file_ids")}
        optional = {k: arrays[k] if k in arrays else None for k in ("masks", "mask_present")}
        return cls(name=str(arrays["name"]), **optional, **kw)

    def has_mask(self) -> np.ndarray:
        """[N] bool: rows whose pixel masks can be scored (anomalies with a mask file)."""
        if self.masks is None:
            return np.zeros(len(self.labels), bool)
        present = self.mask_present if self.mask_present is not None else self.labels == 1
        return np.asarray(present, bool) & (self.labels == 1)
