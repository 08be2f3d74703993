"""Head CT (Kaggle "Head CT - hemorrhage") -> headct (spec §9.6, the released
``convert_HeadCT.py``): label 0 normal, 1 anomaly (``test/defect``); normals
split 3:1 in ``labels.csv`` order; files copied unchanged."""

from __future__ import annotations

import os

import numpy as np

from fsad.data.convert.common import (Output, RawLayoutError, progress, require_dir,
                                      require_file, split_3_to_1)

SUBSET = "headct"
LAYOUT = ("RAW_DIR/labels.csv (a header row, then integer rows 'id, hemorrhage') and "
          "RAW_DIR/head_ct/head_ct/NNN.png (the id zero-padded to 3 digits)")


def convert(raw_dir: str, out_dir: str, overwrite: bool = False):
    """Converts the raw Head CT download into OUT_DIR/headct.

    Args:
      raw_dir: holds labels.csv and head_ct/head_ct/.
      out_dir: output parent folder.
      overwrite: replace an existing OUT_DIR/headct.
    Returns:
      ConvertResult.
    """
    csv = require_file(os.path.join(raw_dir, "labels.csv"), "HeadCT", LAYOUT)
    images = require_dir(os.path.join(raw_dir, "head_ct", "head_ct"), "HeadCT", LAYOUT)
    try:
        table = np.loadtxt(csv, dtype=int, delimiter=",", skiprows=1, ndmin=2)
    except ValueError as err:
        raise RawLayoutError(f"HeadCT: cannot read {csv!r} as integer rows 'id, hemorrhage' "
                             f"({err}); expected the raw layout {LAYOUT}") from err
    if table.shape[1] != 2:
        raise RawLayoutError(f"HeadCT: {csv!r} has {table.shape[1]} column(s) per row; expected "
                             f"2, 'id, hemorrhage' (the raw layout {LAYOUT})")
    ids, labels = table[:, 0], table[:, 1]
    odd = sorted(set(labels.tolist()) - {0, 1})
    if odd:  # (the released script leaves such rows out without a word)
        raise RawLayoutError(f"HeadCT: {csv!r} gives the hemorrhage label(s) "
                             f"{', '.join(map(str, odd))}; expected 0 (normal) or 1")
    normal, anomaly = ids[labels == 0].tolist(), ids[labels == 1].tolist()
    if not normal or not anomaly:
        raise RawLayoutError(f"HeadCT: {csv!r} lists {len(normal)} normal and {len(anomaly)} "
                             f"hemorrhage images; expected both")
    train, test = split_3_to_1(normal)
    jobs = [(i, rel) for rel, part in (("train/good", train), ("test/good", test),
                                       ("test/defect", anomaly)) for i in part]
    srcs = [require_file(os.path.join(images, f"{i:03d}.png"), "HeadCT", LAYOUT)
            for i, _ in jobs]
    with Output(out_dir, SUBSET, overwrite) as out:
        for src, (_, rel) in progress(list(zip(srcs, jobs)), "HeadCT"):
            out.copy(src, rel)
        return out.finish("HeadCT", raw_dir)
