"""Brain MRI (Kaggle "Brain MRI Images for Brain Tumor Detection") -> brainmri (spec §9.5).

As the released ``convert_BrainMRI.py``: ``no/`` split 3:1 into ``train/good``
and ``test/good``, everything in ``yes/`` to ``test/defect``, bytes unchanged.
One deliberate fix: the raw files mix extensions (``.jpg``, ``.JPG``,
``.jpeg``, ``.png``), and the released loader silently drops every name not
ending in png/PNG/jpg/npy, so the papers trained and tested on fewer images
than the 73 / 25 / 155 they report. Here the extension is normalised to
lower case with ``.jpeg`` -> ``.jpg`` (bytes unchanged), so every image is
used; the result's ``extra["released_filter_kept"]`` gives the counts the
released filter would have kept.
"""

from __future__ import annotations

import os

from fsad.data.convert.common import (Output, RawLayoutError, list_files, progress, require_dir,
                                      split_3_to_1)

SUBSET = "brainmri"
LAYOUT = "RAW_DIR/no/*.jpg (healthy) and RAW_DIR/yes/*.jpg (tumour), mixed extensions"
RELEASED_SUFFIXES = ("png", "PNG", "jpg", "npy")  # the released loader's test on name[-3:]


def normalised_name(name: str) -> str:
    """`name` with a lower-case extension, .jpeg as .jpg ("N1.JPG" -> "N1.jpg")."""
    base, ext = os.path.splitext(name)
    ext = ext.lower()
    return base + (".jpg" if ext == ".jpeg" else ext)


def convert(raw_dir: str, out_dir: str, overwrite: bool = False):
    """Converts the raw Brain MRI download into OUT_DIR/brainmri.

    Args:
      raw_dir: holds no/ and yes/ (the archive's copy under brain_tumor_dataset/ is the same).
      out_dir: output parent folder.
      overwrite: replace an existing OUT_DIR/brainmri.
    Returns:
      ConvertResult; extra["released_filter_kept"] has the counts the released loader keeps.
    """
    no = list_files(require_dir(os.path.join(raw_dir, "no"), "BrainMRI", LAYOUT))
    yes = list_files(require_dir(os.path.join(raw_dir, "yes"), "BrainMRI", LAYOUT))
    if not no or not yes:
        raise RawLayoutError(f"BrainMRI: no/ has {len(no)} files and yes/ {len(yes)}; expected "
                             f"the raw layout {LAYOUT}")
    train, test = split_3_to_1(no)
    parts = (("train/good", "no", train), ("test/good", "no", test), ("test/defect", "yes", yes))
    kept = {rel: sum(f[-3:] in RELEASED_SUFFIXES for f in files) for rel, _, files in parts}
    with Output(out_dir, SUBSET, overwrite) as out:
        renamed = 0
        for rel, folder, files in parts:
            for f in progress(files, f"BrainMRI {rel}"):
                out.copy(os.path.join(raw_dir, folder, f), rel, normalised_name(f))
                renamed += normalised_name(f) != f
        return out.finish("BrainMRI", raw_dir, {"normalise_extensions": True},
                          {"released_filter_kept": kept, "renamed_extensions": renamed})
