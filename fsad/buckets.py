"""Array lengths rounded up to buckets, so that the arrays whose length differs from seed
to seed and from setting to setting (the training images; AHL's task sets, importance
pool and feature bank) take one shape per protocol, and one compiled program serves
every seed and setting of a run (README "Reliability": compilation is paid once). The
padding rows are zeros that nothing draws, or that weigh 0."""

from __future__ import annotations

import numpy as np

ROWS_BUCKET = 64  # lengths padded to a multiple of this

# the training images and AHL's bank leave room for this many seen anomalies in their
# bucket: 1 to 10 shots of the same normals are then one shape, wherever their count falls
ANOMALY_ROOM = 16


def bucketed(n: int, bucket: int = ROWS_BUCKET) -> int:
    """n rounded up to a multiple of bucket (n itself for bucket 1)."""
    return -(-n // bucket) * bucket


def rows_with_anomaly_room(n_rest: int, n_anomaly: int, bucket: int = ROWS_BUCKET) -> int:
    """The length of n_rest rows and n_anomaly seen anomalies padded to a multiple of
    bucket that leaves room for `ANOMALY_ROOM` anomalies (n_rest + n_anomaly for bucket
    1): 1 to 10 shots with the same other rows are one length."""
    if bucket == 1:
        return n_rest + n_anomaly
    return bucketed(n_rest + max(n_anomaly, ANOMALY_ROOM), bucket)


def coarse_bucketed(n: int, bucket: int = ROWS_BUCKET) -> int:
    """n rounded up to a multiple of a quarter of the power of two at or below it, and
    of `bucket` at least: four lengths per doubling (2048, 2560, 3072, 3584, 4096, ...),
    at most 25% more than n where n > 4 * bucket (below, a multiple of bucket). For a
    length that varies by hundreds from seed to seed (AHL's importance pool: 1,987 to
    2,275 samples in the 18 AHL seeds of the ELPV grid, 1,131 normals; README). n itself
    for bucket 1, as `bucketed`."""
    if bucket == 1:
        return n
    if n <= bucket:
        return bucket
    return bucketed(n, max(bucket, 2 ** (n.bit_length() - 1) // 4))


def pad_to(a: np.ndarray, length: int, axis: int = 0) -> np.ndarray:
    """a with zeros appended along `axis` up to `length` (a itself where it is as long).

    Args:
      a: an array of any shape, a.shape[axis] <= length.
    Returns:
      the array with a.shape[axis] replaced by length.
    """
    a = np.asarray(a)
    missing = length - a.shape[axis]
    if missing < 0:
        raise ValueError(f"cannot pad {a.shape[axis]} rows to {length}")
    if not missing:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, missing)
    return np.pad(a, widths)
