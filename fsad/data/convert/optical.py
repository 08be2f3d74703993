"""Optical (DAGM 2007) -> optical_class (spec §9.3, the released ``convert_optical.py``).

Classes 1 to 10, Train then Test, in ``Labels.txt`` line order: flag 0 joins
one normal pool shared by all ten textures, flag 1 goes to that class's
anomalies (DAGM's own train/test split is discarded). Normals are split 3:1;
all anomalies are test images. As released, the anomaly folders are numbered
from zero (``test/Class0`` holds DAGM Class1's defects ... ``test/Class9``
Class10's), files are named ``<ClassN>_<Train|Test>_<file>`` with the DAGM
class name (the released script takes it from a fixed depth of the path,
which only works for some paths: spec §9.3), and masks keep DAGM's names,
``ground_truth/ClassK/<ClassN>_<Train|Test>_<NNNN>_label.PNG`` (fsad's folder
reader finds ``_label`` masks). The papers count this as one anomaly class.
"""

from __future__ import annotations

import os

from fsad.data.convert.common import (Output, RawLayoutError, progress, require_dir,
                                      require_file, split_3_to_1)

SUBSET = "optical_class"
LAYOUT = ("RAW_DIR/ClassN/ClassN/{Train,Test}/NNNN.PNG with "
          "RAW_DIR/ClassN/ClassN/{Train,Test}/Label/Labels.txt and Label/NNNN_label.PNG, "
          "N = 1 ... 10")
N_CLASSES = 10


def _read_labels(path: str) -> list[tuple[str, str, str]]:
    """(flag, image file, label file) per line of a DAGM Labels.txt (header "1" skipped)."""
    rows = []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\r\n")
            if line == "1" or not line.strip():  # the header line is exactly "1"
                continue
            fields = line.split("\t")
            if len(fields) < 5:
                raise RawLayoutError(f"Optical: line {line!r} of {path!r} has {len(fields)} "
                                     f"tab-separated fields, expected 5 (index, flag, image, 0, "
                                     f"label); use DAGM 2007's own Labels.txt")
            if fields[1].strip() not in ("0", "1"):  # (the released script: any but 0 a defect)
                raise RawLayoutError(f"Optical: line {line!r} of {path!r} has the flag "
                                     f"{fields[1].strip()!r}; expected 0 (no defect) or 1")
            rows.append((fields[1].strip(), fields[2].strip(), fields[4].strip()))
    return rows


def convert(raw_dir: str, out_dir: str, overwrite: bool = False, n_classes: int = N_CLASSES):
    """Converts the raw DAGM 2007 download into OUT_DIR/optical_class.

    Args:
      raw_dir: holds Class1/Class1/ ... Class10/Class10/.
      out_dir: output parent folder.
      overwrite: replace an existing OUT_DIR/optical_class.
      n_classes: DAGM classes to read (10 as released).
    Returns:
      ConvertResult.
    """
    require_dir(raw_dir, "Optical", LAYOUT)
    normals = []  # (source path, output name)
    anomalies = []  # (anomaly folder, source image, output name, source label, label name)
    for k in range(1, n_classes + 1):
        cls = f"Class{k}"
        class_root = require_dir(os.path.join(raw_dir, cls, cls), "Optical", LAYOUT)
        for part in ("Train", "Test"):
            folder = os.path.join(class_root, part)
            labels = require_file(os.path.join(folder, "Label", "Labels.txt"), "Optical", LAYOUT)
            for flag, image, label in _read_labels(labels):
                src = require_file(os.path.join(folder, image), "Optical", LAYOUT)
                name = f"{cls}_{part}_{image}"
                if flag == "0":
                    normals.append((src, name))
                else:
                    lab = require_file(os.path.join(folder, "Label", label), "Optical", LAYOUT)
                    anomalies.append((f"Class{k - 1}", src, name, lab, f"{cls}_{part}_{label}"))
    if not normals or not anomalies:
        raise RawLayoutError(f"Optical: found {len(normals)} normal and {len(anomalies)} defect "
                             f"images under {raw_dir!r}; expected the raw layout {LAYOUT}")
    train, test = split_3_to_1(normals)
    with Output(out_dir, SUBSET, overwrite) as out:
        for rel, part in (("train/good", train), ("test/good", test)):
            for src, name in progress(part, f"Optical {rel}"):
                out.copy(src, rel, name)
        for folder, src, name, lab, lab_name in progress(anomalies, "Optical defects"):
            out.copy(src, f"test/{folder}", name)
            out.copy(lab, f"ground_truth/{folder}", lab_name)
        return out.finish("Optical", raw_dir, {"n_classes": n_classes})
