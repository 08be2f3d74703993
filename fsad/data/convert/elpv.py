"""ELPV -> elpv (spec §9.8, the released ``convert_elpv.py``).

Probability 0 is normal (mono and poly pooled, split 3:1 in ``labels.csv``
order), probability 1 goes to ``test/mono`` or ``test/poly`` by cell type,
1/3 and 2/3 are dropped; files copied unchanged. fsad also reads ELPV
directly from the `elpv-dataset` package (``data.name=elpv``); this converter
gives the folder the papers' code reads.
"""

from __future__ import annotations

import os

import numpy as np

from fsad.data.convert.common import (Output, RawLayoutError, progress, require_file,
                                      split_3_to_1)

SUBSET = "elpv"
LAYOUT = ("RAW_DIR/labels.csv (whitespace-separated: images/cellNNNN.png, probability, "
          "mono|poly) and RAW_DIR/images/cellNNNN.png; the elpv-dataset package ships them "
          "in elpv_dataset/data/")


def package_dir() -> str | None:
    """The data folder of the installed `elpv-dataset` package, if any."""
    try:
        import elpv_dataset
    except ImportError:
        return None
    return os.path.join(os.path.dirname(elpv_dataset.__file__), "data")


def convert(raw_dir: str, out_dir: str, overwrite: bool = False):
    """Converts an ELPV folder (labels.csv + images/) into OUT_DIR/elpv.

    Args:
      raw_dir: the folder holding labels.csv (e.g. elpv_dataset/data of the package).
      out_dir: output parent folder.
      overwrite: replace an existing OUT_DIR/elpv.
    Returns:
      ConvertResult.
    """
    csv = require_file(os.path.join(raw_dir, "labels.csv"), "ELPV", LAYOUT)
    # (the package's own reader takes |S19 and |S4: fields cut short there, e.g. a longer
    # file name or "polycrystalline", are read whole here and checked)
    try:
        table = np.genfromtxt(csv, dtype=["U4096", "<f8", "U64"],
                              names=["path", "probability", "type"], ndmin=1, encoding="utf-8")
    except ValueError as err:  # rows of another number of fields, each named by numpy
        rows = " ".join(str(err).replace("Some errors were detected !", "").split())
        raise RawLayoutError(f"ELPV: cannot read {csv!r}: {rows}; expected the raw layout "
                             f"{LAYOUT}") from err
    paths, probs = table["path"].tolist(), table["probability"]
    # (an unreadable probability is NaN, neither kept nor counted as dropped: refused)
    odd = [f"{p} ({q})" for p, q in zip(paths, probs) if not 0.0 <= q <= 1.0]
    if odd:
        raise RawLayoutError(f"ELPV: {csv!r} gives no defect probability in [0, 1] for "
                             f"{len(odd)} cell(s): {', '.join(odd[:3])}{', ...' * (len(odd) > 3)}"
                             f"; expected the raw layout {LAYOUT}")
    types = table["type"].tolist()
    odd = sorted({t for t in types if t not in ("mono", "poly")})
    if odd:
        raise RawLayoutError(f"ELPV: {csv!r} gives the cell type(s) {', '.join(map(repr, odd))}"
                             f"; expected mono or poly (the raw layout {LAYOUT})")
    normal = [p for p, q in zip(paths, probs) if q == 0.0]
    anomalies = [(p, f"test/{t}") for p, q, t in zip(paths, probs, types) if q == 1.0]
    if not normal or not anomalies:
        raise RawLayoutError(f"ELPV: {csv!r} lists {len(normal)} normal and {len(anomalies)} "
                             f"defective cells; expected the raw layout {LAYOUT}")
    train, test = split_3_to_1(normal)
    jobs = [(p, "train/good") for p in train] + [(p, "test/good") for p in test] + anomalies
    srcs = [require_file(os.path.join(raw_dir, p), "ELPV", LAYOUT) for p, _ in jobs]
    with Output(out_dir, SUBSET, overwrite) as out:
        for src, (_, rel) in progress(list(zip(srcs, jobs)), "ELPV"):
            out.copy(src, rel)
        return out.finish("ELPV", raw_dir, extra={"dropped_uncertain": int(np.sum(
            (probs > 0) & (probs < 1)))})
