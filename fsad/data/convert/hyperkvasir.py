"""Hyper-Kvasir -> hyperkvasir (spec §9.7, the released ``convert_hyperkvasir.py``).

Normals: every image under ``upper-gi-tract/anatomical-landmarks/<landmark>/``
(pylorus, retroflex-stomach, z-line), pooled, split 3:1, copied flat into
``train/good`` and ``test/good``. Anomalies: each
``upper-gi-tract/pathological-findings/<finding>/`` -> ``test/<finding>``.
Lower-GI images are not used.
"""

from __future__ import annotations

import os

from fsad.data.convert.common import (Output, RawLayoutError, list_dirs, list_files, progress,
                                      require_dir, split_3_to_1)

SUBSET = "hyperkvasir"
LAYOUT = ("RAW_DIR = the labeled-images folder: "
          "RAW_DIR/upper-gi-tract/anatomical-landmarks/{pylorus,retroflex-stomach,z-line}/*.jpg, "
          "RAW_DIR/upper-gi-tract/pathological-findings/<finding>/*.jpg")


def convert(raw_dir: str, out_dir: str, overwrite: bool = False):
    """Converts the raw Hyper-Kvasir labeled-images folder into OUT_DIR/hyperkvasir.

    Args:
      raw_dir: the labeled-images folder.
      out_dir: output parent folder.
      overwrite: replace an existing OUT_DIR/hyperkvasir.
    Returns:
      ConvertResult.
    """
    if (not os.path.isdir(os.path.join(raw_dir, "upper-gi-tract"))
            and os.path.isdir(os.path.join(raw_dir, "labeled-images"))):
        raise RawLayoutError(f"Hyper-Kvasir: {raw_dir!r} holds labeled-images/ but no "
                             f"upper-gi-tract/; pass {os.path.join(raw_dir, 'labeled-images')!r} "
                             f"as RAW_DIR")
    landmarks = require_dir(os.path.join(raw_dir, "upper-gi-tract", "anatomical-landmarks"),
                            "Hyper-Kvasir", LAYOUT)
    findings = require_dir(os.path.join(raw_dir, "upper-gi-tract", "pathological-findings"),
                           "Hyper-Kvasir", LAYOUT)
    normals = [os.path.join(landmarks, d, f) for d in list_dirs(landmarks)
               for f in list_files(os.path.join(landmarks, d))]
    anomalies = [(os.path.join(findings, d, f), f"test/{d}") for d in list_dirs(findings)
                 for f in list_files(os.path.join(findings, d))]
    if not normals or not anomalies:
        raise RawLayoutError(f"Hyper-Kvasir: found {len(normals)} landmark and {len(anomalies)} "
                             f"finding images; expected the raw layout {LAYOUT}")
    loose = [os.path.join(root, f) for root in (landmarks, findings) for f in list_files(root)]
    train, test = split_3_to_1(normals)
    jobs = [(s, "train/good") for s in train] + [(s, "test/good") for s in test] + anomalies
    with Output(out_dir, SUBSET, overwrite) as out:
        # (the released script stops on these)
        out.warn_skipped("Hyper-Kvasir", loose, "outside a class folder")
        for src, rel in progress(jobs, "Hyper-Kvasir"):
            out.copy(src, rel)
        return out.finish("Hyper-Kvasir", raw_dir)
