"""The papers' protocols: general / hard settings, k shots, contamination (spec §1).

All draws are seeded. The labelled anomalies are the first ``n_anomaly`` of a
seeded draw of ``max(shot_pool, n_anomaly)`` anomalies (``shot_pool`` = 10), and
the whole draw leaves the test set: so the 1-shot example is one of the 10-shot
examples of the same seed, and both are scored on the same test set.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fsad.data.imageset import NORMAL, ImageSet
from fsad.errors import UserError

SETTINGS = ("general", "hard")


def batch_counts(batch_size: int, anomaly_fraction: float) -> tuple[int, int]:
    """(normals, seen anomalies) in a training batch: floor(batch_size * (1 -
    anomaly_fraction)) normals and the rest seen anomalies, as the released balanced
    samplers split a batch (DevNet's batch_size // 2 normals, DRA's 2 * batch_size // 3):
    so an odd DevNet batch, or a DRA batch of 3k + 1, has the extra image an anomaly.
    The 1e-9 keeps a product such as 48 * (1 - 1/3) from falling below its integer."""
    n_normal = math.floor(batch_size * (1.0 - anomaly_fraction) + 1e-9)
    return n_normal, batch_size - n_normal


@dataclasses.dataclass
class Split:
    """Indices into an ImageSet.

    Attributes:
      train_normal: [Nn] normal training images, plus contamination (unlabelled anomalies).
      train_anomaly: [Na] labelled (seen) anomalies.
      test: [Nt] test images (labels from the ImageSet).
      contamination: [Nc] test anomalies moved into train_normal.
    """

    train_normal: np.ndarray
    train_anomaly: np.ndarray
    test: np.ndarray
    contamination: np.ndarray

    def describe(self, data: ImageSet) -> dict:
        """JSON-able record: counts and file ids of the seen anomalies."""
        test_labels = data.labels[self.test]
        return {
            "train_normal": int(len(self.train_normal)),
            "train_anomaly": int(len(self.train_anomaly)),
            "test_normal": int(np.sum(test_labels == 0)),
            "test_anomaly": int(np.sum(test_labels == 1)),
            "test_anomaly_classes": sorted(set(data.classes[self.test][test_labels == 1].tolist())),
            "seen_anomalies": data.file_ids[self.train_anomaly].tolist(),
            "contamination": data.file_ids[self.contamination].tolist(),
        }


# the papers' largest shot count: a seed draws this many first, whatever it needs
FIRST_DRAW = 10


def shot_order(rng: np.random.Generator, pool_from: np.ndarray, size: int) -> np.ndarray:
    """[min(size, len(pool_from))] the first anomalies of the seed's draw order: FIRST_DRAW
    of `pool_from` drawn without replacement, then, only where `size` asks for more, the
    rest in a random order. Every shot count and data.shot_pool of a seed take a prefix of
    one order, as the released loaders' one shuffle: a 1-shot example is the first of the
    seed's 10 shots also with shot_pool=1, and 10 shots are the first of 20. (A draw of
    `size` at once gives other first elements for each size.)"""
    order = rng.choice(pool_from, size=min(len(pool_from), FIRST_DRAW), replace=False)
    if size > len(order) and len(pool_from) > len(order):
        order = np.concatenate([order, rng.permutation(np.setdiff1d(pool_from, order))])
    return order[:size]


def make_split(data: ImageSet, setting: str = "general", n_anomaly: int = 10,
               known_class: str | None = None, contamination: float = 0.0, seed: int = 0,
               shot_pool: int = 10) -> Split:
    """Builds the train/test split of one seed.

    Args:
      data: the decoded dataset.
      setting: "general" (shots from all anomaly classes) or "hard" (shots from
        `known_class` only; every image of that class leaves the test set).
      n_anomaly: number of labelled anomalies (1 to 10 in the papers).
      known_class: the seen class in the hard setting.
      contamination: rate r; floor(N / (1 - r) * r) test anomalies join the
        normal training set unlabelled, N the number of training normals.
      seed: fixes the anomaly and contamination draws.
      shot_pool: how many anomalies of the seed's draw order (`shot_order`) leave the
        test set; the shots are its first n_anomaly.
    Raises:
      ValueError: an unknown setting or class, or more shots than anomalies.
    """
    if setting not in SETTINGS:
        raise UserError(f"data.setting={setting!r} is not a protocol; use general or hard")
    if n_anomaly < 1:
        raise UserError(f"data.n_anomaly={n_anomaly}: the few-shot protocol needs at least one "
                        f"labelled anomaly; set --config.data.n_anomaly to 1 or more (1 to 10 in "
                        f"the papers)")
    if not 0.0 <= contamination < 1.0:
        raise UserError(f"data.contamination={contamination} is not a rate; use a value in "
                        f"[0, 1), e.g. 0.1")
    rng = np.random.default_rng(seed)
    is_test = data.split == "test"
    train_normal = np.flatnonzero((data.labels == 0) & ~is_test)
    anomalies = np.flatnonzero(data.labels == 1)
    if setting == "hard":
        classes = data.anomaly_classes
        if known_class not in classes:
            raise UserError(f"data.known_class={known_class!r} is not an anomaly class of "
                            f"{data.name}; set --config.data.known_class to one of "
                            f"{', '.join(classes)}")
        if len(classes) < 2:
            raise UserError(f"the hard setting needs at least two anomaly classes and "
                            f"{data.name} has one ({classes[0]}); use "
                            f"--config.data.setting=general")
        pool_from = anomalies[data.classes[anomalies] == known_class]
    else:
        pool_from = anomalies
    if n_anomaly > len(pool_from):
        where = f"class {known_class!r}" if setting == "hard" else data.name
        raise UserError(f"data.n_anomaly={n_anomaly} but {where} has only {len(pool_from)} "
                        f"anomalies; lower --config.data.n_anomaly")
    pool = shot_order(rng, pool_from, max(shot_pool, n_anomaly))
    train_anomaly = np.sort(pool[:n_anomaly])
    leaving = set(pool.tolist())
    if setting == "hard":
        leaving |= set(pool_from.tolist())
    test = np.array([i for i in np.flatnonzero(is_test | (data.labels == 1))
                     if i not in leaving], dtype=np.int64)
    contam = np.zeros(0, np.int64)
    if contamination > 0:
        n_c = int(np.floor(len(train_normal) / (1.0 - contamination) * contamination))
        test_anoms = test[data.labels[test] == 1]
        if n_c > len(test_anoms):
            raise UserError(f"data.contamination={contamination} needs {n_c} unlabelled "
                            f"anomalies but the test set has {len(test_anoms)}; lower "
                            f"--config.data.contamination")
        contam = np.sort(rng.choice(test_anoms, size=n_c, replace=False))
        test = np.setdiff1d(test, contam)
        train_normal = np.concatenate([train_normal, contam])
    n_normal, n_anomalous = (int(np.sum(data.labels[test] == c)) for c in (0, 1))
    if not n_normal or not n_anomalous:
        why, fix = "", "add test images"
        if not n_anomalous:  # what took them: the contamination, the shot pool, the shots
            why, lower = ((" (data.contamination takes the rest)", "contamination")
                          if len(contam) else
                          (f" (the {len(pool)} anomalies drawn for the shots, data.shot_pool="
                           f"{shot_pool}, leave it)", "shot_pool") if len(pool) > n_anomaly
                          else ("", "n_anomaly"))
            fix += f" or lower --config.data.{lower}"
        raise UserError(f"{data.name}: the test set needs normals and anomalies and has "
                        f"{n_normal} normals and {n_anomalous} anomalies{why}; {fix}")
    assert NORMAL not in data.classes[train_anomaly]
    return Split(train_normal, train_anomaly, test, contam)
