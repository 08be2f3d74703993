"""Converters of the papers' raw downloads into the MVTec layout fsad reads (spec §9).

Each module follows one of the released scripts (``data/convert_*.py`` of the
DevNet and DRA repositories) and writes ``OUT_DIR/<subset>/``:

    train/good/  test/good/  test/<anomaly class>/  [ground_truth/<class>/<stem>_mask.png]
    manifest.json   (settings, counts, warnings and every file list)

Differences from the released scripts, all on purpose: folder listings are
sorted (the released ``os.listdir`` order depends on the filesystem, spec
§9.0), the output folder is written under a temporary name and only appears
when complete, raw quirks that crash the released scripts are skipped with a
warning (AITEX), and BrainMRI's extensions are normalised. MVTec AD and VisA
(in its MVTec-style layout) need no conversion.

    python -m fsad.convert DATASET RAW_DIR OUT_DIR
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from fsad.data.convert import aitex, brainmri, elpv, headct, hyperkvasir, mastcam, optical, sdd
from fsad.data.convert.common import ConvertResult, RawLayoutError
from fsad.errors import UserError


@dataclasses.dataclass(frozen=True)
class Converter:
    """One dataset's converter: its function, output folder, raw layout and paper counts."""

    name: str
    convert: Callable[..., ConvertResult]
    subset: str
    layout: str
    paper_counts: str


CONVERTERS = {c.name: c for c in (
    Converter("aitex", aitex.convert, aitex.SUBSET, aitex.LAYOUT,
              "1,692 train / 564 test normals, 183 anomalies in 12 classes"),
    Converter("sdd", sdd.convert, sdd.SUBSET, sdd.LAYOUT,
              "594 / 286 / 54; the script on the full release gives 857 / 286 / 54"),
    Converter("optical", optical.convert, optical.SUBSET, optical.LAYOUT,
              "10,500 / 3,500 / 2,100 (folders Class0..Class9)"),
    Converter("mastcam", mastcam.convert, mastcam.SUBSET, mastcam.LAYOUT,
              "9,302 / 426 / 451 in 11 classes"),
    Converter("brainmri", brainmri.convert, brainmri.SUBSET, brainmri.LAYOUT,
              "73 / 25 / 155"),
    Converter("headct", headct.convert, headct.SUBSET, headct.LAYOUT, "75 / 25 / 100"),
    Converter("hyperkvasir", hyperkvasir.convert, hyperkvasir.SUBSET, hyperkvasir.LAYOUT,
              "2,021 / 674 / 757 in 4 classes"),
    Converter("elpv", elpv.convert, elpv.SUBSET, elpv.LAYOUT,
              "1,131 / 377 / 715 (313 mono, 402 poly)"),
)}
ALIASES = {"kolektorsdd": "sdd", "dagm": "optical", "hyper-kvasir": "hyperkvasir",
           "hyper_kvasir": "hyperkvasir", "brain_mri": "brainmri", "head_ct": "headct"}


def get_converter(dataset: str) -> Converter:
    """The converter of `dataset` (case-insensitive; e.g. "AITEX", "SDD", "Hyper-Kvasir")."""
    key = dataset.lower()
    key = ALIASES.get(key, key)
    if key not in CONVERTERS:
        raise UserError(f"no converter for {dataset!r}; choose one of "
                        f"{', '.join(CONVERTERS)} (MVTec AD needs none)")
    return CONVERTERS[key]


def convert(dataset: str, raw_dir: str, out_dir: str, overwrite: bool = False,
            **kwargs) -> ConvertResult:
    """Converts `dataset`'s raw download in `raw_dir` into `out_dir/<subset>`.

    Raises:
      RawLayoutError: raw_dir does not exist, or lacks a file or folder of the layout.
    """
    converter = get_converter(dataset)
    if not os.path.isdir(raw_dir):
        state = "is not a folder" if os.path.exists(raw_dir) else "does not exist"
        raise RawLayoutError(f"{converter.name}: RAW_DIR {raw_dir!r} {state}; give "
                             f"the folder the download was unpacked into (expected the raw "
                             f"layout {converter.layout})")
    check_output_place(raw_dir, out_dir, converter.subset)
    return converter.convert(raw_dir, out_dir, overwrite=overwrite, **kwargs)


def check_output_place(raw_dir: str, out_dir: str, subset: str) -> None:
    """Refuses an output folder OUT_DIR/<subset> that holds the raw download (--overwrite
    replaced it, raw files and all: data/brainmri converted into data/), that lies inside
    it (a second conversion read its own output as raw data: Mastcam's earlier output
    became an anomaly class), or that is a file (as is OUT_DIR).

    Raises:
      UserError: naming the clash and the fix.
    """
    final = os.path.join(os.path.realpath(out_dir), subset)
    raw = os.path.realpath(raw_dir)
    for folder, what in ((out_dir, "OUT_DIR"), (final, "OUT_DIR/<subset>")):
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UserError(f"{what} {folder!r} is a file, not a folder; remove it or choose "
                            f"another OUT_DIR")
    if raw == final or raw.startswith(final + os.sep):
        raise UserError(f"RAW_DIR {raw_dir!r} lies inside the output folder {final!r}, which "
                        f"the conversion writes afresh (its files would be lost); move the "
                        f"raw download out of it (e.g. to raw/{subset}), or choose another "
                        f"OUT_DIR")
    if final.startswith(raw + os.sep):
        raise UserError(f"the output folder {final!r} lies inside RAW_DIR {raw_dir!r}: a "
                        f"later conversion would read it as raw data; choose an OUT_DIR "
                        f"outside RAW_DIR")


__all__ = ["CONVERTERS", "ConvertResult", "Converter", "RawLayoutError", "convert",
           "get_converter"]
