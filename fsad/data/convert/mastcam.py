"""Mastcam (Kerner et al., Zenodo) -> mastcam (spec §9.4, the released ``convert_MastCam.py``).

No re-split: ``train_typical`` -> ``train/good``, ``test_typical`` -> ``test/good``,
each ``test_novel/<class>`` -> ``test/<class>``; files are copied unchanged
(64x64x6 ``.npy`` arrays; fsad's reader casts them to uint8 and keeps the first
three channels, as the released loader does). ``validation_typical`` is not used.
"""

from __future__ import annotations

import os

from fsad.data.convert.common import (Output, RawLayoutError, list_dirs, list_files, progress,
                                      require_dir)

SUBSET = "mastcam"
LAYOUT = ("RAW_DIR/train_typical/*.npy, RAW_DIR/test_typical/*.npy, "
          "RAW_DIR/test_novel/<class>/*.npy")


def convert(raw_dir: str, out_dir: str, overwrite: bool = False):
    """Converts the raw Mastcam download into OUT_DIR/mastcam.

    Args:
      raw_dir: holds train_typical/, test_typical/ and test_novel/<class>/.
      out_dir: output parent folder.
      overwrite: replace an existing OUT_DIR/mastcam.
    Returns:
      ConvertResult.
    """
    jobs = []  # (source, output folder)
    for folder, rel in (("train_typical", "train/good"), ("test_typical", "test/good")):
        src = require_dir(os.path.join(raw_dir, folder), "Mastcam", LAYOUT)
        jobs += [(os.path.join(src, f), rel) for f in list_files(src)]
    novel = require_dir(os.path.join(raw_dir, "test_novel"), "Mastcam", LAYOUT)
    classes = list_dirs(novel)
    if not classes:
        raise RawLayoutError(f"Mastcam: {novel!r} has no class folders; expected the raw layout "
                             f"{LAYOUT}")
    for cls in classes:
        src = os.path.join(novel, cls)
        jobs += [(os.path.join(src, f), f"test/{cls}") for f in list_files(src)]
    with Output(out_dir, SUBSET, overwrite) as out:
        out.warn_skipped("Mastcam", [os.path.join(novel, f) for f in list_files(novel)],
                         "not a class folder of test_novel")  # the released script stops
        for src, rel in progress(jobs, "Mastcam"):
            out.copy(src, rel)
        return out.finish("Mastcam", raw_dir)
