"""AITEX fabric defects -> AITEX (spec §9.1, the released ``convert_AITEX.py``).

Normals: every defect-free image is cut into 16 side-by-side tiles of 256 px.
Defects: ``ceil(width / height)`` tiles, the last one possibly narrower; a tile
is kept only if its mask tile has a non-zero pixel (clean tiles are dropped,
not added to the normals). Normal tiles are split 3:1 tile by tile. The class
comes from the 3-digit defect code. Fixes for the public release's quirks that
the released script does not handle (it crashes on them): ``_mask1``/``_mask2``
masks are OR-ed, an image without a mask is skipped with a warning, as is an
unknown defect code or a mask whose size differs from its image.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np

from fsad.data.convert.common import (Output, RawLayoutError, list_dirs, list_files, progress,
                                      read_rgb, require_dir, split_3_to_1, stem)

SUBSET = "AITEX"
LAYOUT = ("RAW_DIR/NODefect_images/<fabric>/<nnnn_000_ff>.png, "
          "RAW_DIR/Defect_images/Defect_images/<nnnn_ddd_ff>.png, "
          "RAW_DIR/Mask_images/Mask_images/<nnnn_ddd_ff>_mask.png (the archives unpacked "
          "into folders of their own names)")
DEFECT_CLASSES = {"002": "Broken_end", "006": "Broken_yarn", "010": "Broken_pick",
                  "016": "Weft_curling", "019": "Fuzzyball", "022": "Cut_selvage",
                  "023": "Crease", "025": "Warp_ball", "027": "Knots",
                  "029": "Contamination", "030": "Nep", "036": "Weft_crack"}
IMAGE_EXT = (".png", ".PNG", ".bmp", ".tif", ".jpg")


def _mask(mask_dir: str, name: str) -> np.ndarray | None:
    """<stem>_mask.png, or the OR of <stem>_mask1.png, _mask2.png ...; None if none."""
    single = os.path.join(mask_dir, f"{name}_mask.png")
    if os.path.isfile(single):
        return read_rgb(single)
    pattern = re.compile(rf"{re.escape(name)}_mask\d+\.png")
    parts = sorted(f for f in os.listdir(mask_dir) if pattern.fullmatch(f))
    if not parts:
        return None
    return np.maximum.reduce([read_rgb(os.path.join(mask_dir, f)) for f in parts])


def convert(raw_dir: str, out_dir: str, overwrite: bool = False, tile: int = 256,
            normal_tiles: int = 16):
    """Converts the raw AITEX download into OUT_DIR/AITEX.

    Args:
      raw_dir: the unpacked download (holds NODefect_images/, Defect_images/, Mask_images/).
      out_dir: output parent folder.
      overwrite: replace an existing OUT_DIR/AITEX.
      tile: tile width in pixels (256 as released; smaller for tests).
      normal_tiles: tiles cut from each defect-free image (16 as released).
    Returns:
      ConvertResult.
    """
    normal_root = require_dir(os.path.join(raw_dir, "NODefect_images"), "AITEX", LAYOUT)
    defect_root = require_dir(os.path.join(raw_dir, "Defect_images", "Defect_images"), "AITEX",
                              LAYOUT)
    mask_root = require_dir(os.path.join(raw_dir, "Mask_images", "Mask_images"), "AITEX", LAYOUT)
    # each folder listed once: its images, and the files that are no images of the layout
    # (the released script read every file, and stopped on one that is no image)
    fabrics = {d: list_files(os.path.join(normal_root, d)) for d in list_dirs(normal_root)}
    normals = [(d, f) for d, files in fabrics.items() for f in files if f.endswith(IMAGE_EXT)]
    if not normals:
        raise RawLayoutError(f"AITEX: no images under {normal_root!r}; expected the raw "
                             f"layout {LAYOUT}")
    in_defects = list_files(defect_root)
    defects = [f for f in in_defects if f.endswith(IMAGE_EXT)]
    others = [os.path.join(normal_root, f) for f in list_files(normal_root)]  # no fabric
    others += [os.path.join(normal_root, d, f) for d, files in fabrics.items() for f in files
               if not f.endswith(IMAGE_EXT)]
    others += [os.path.join(defect_root, f) for f in in_defects if not f.endswith(IMAGE_EXT)]
    with Output(out_dir, SUBSET, overwrite) as out:
        out.warn_skipped("AITEX", others, f"not images of the layout (its images end in "
                         f"{', '.join(IMAGE_EXT[:-1])} or {IMAGE_EXT[-1]}, the defect-free "
                         f"ones in a fabric's folder)")
        # every normal image gives `normal_tiles` tiles: name them, split the names, then cut
        names = [f"{d}_{stem(f)}_{i}" for d, f in normals for i in range(normal_tiles)]
        train, _ = split_3_to_1(names)
        train = set(train)
        for d, f in progress(normals, "AITEX normal images"):
            img = read_rgb(os.path.join(normal_root, d, f))
            for i in range(normal_tiles):
                name = f"{d}_{stem(f)}_{i}"
                patch = img[:, i * tile:(i + 1) * tile]
                if patch.shape[1] == 0:  # the released script crashes here
                    out.warn(f"AITEX: {d}/{f} is {img.shape[1]} px wide, too narrow for tile "
                             f"{i}; tile skipped")
                    continue
                out.save_png("train/good" if name in train else "test/good", name + ".png",
                             patch)
        for f in progress(defects, "AITEX defect images"):
            name = stem(f)
            code = name.split("_")[1] if name.count("_") >= 1 else ""
            if code not in DEFECT_CLASSES:
                out.warn(f"AITEX: {f} has defect code {code!r}, not in the released table; "
                         f"skipped")
                continue
            cls = DEFECT_CLASSES[code]
            mask = _mask(mask_root, name)
            if mask is None:
                out.warn(f"AITEX: {f} has no mask {name}_mask.png in {mask_root!r}; skipped")
                continue
            img = read_rgb(os.path.join(defect_root, f))
            if img.shape[0] == mask.shape[0] and img.shape[1] < mask.shape[1]:
                # a narrow image (0094_027_05) with a full-width mask: the released
                # script's tiles take the image's width of it
                out.warn(f"AITEX: {f} is {img.shape[1]} px wide and its mask "
                         f"{mask.shape[1]} px; the mask cut to the image's width")
                mask = mask[:, :img.shape[1]]
            if img.shape != mask.shape:
                out.warn(f"AITEX: {f} is {img.shape[:2]} but its mask is {mask.shape[:2]}; "
                         f"skipped")
                continue
            h, w = img.shape[:2]
            kept = 0
            for i in range(math.ceil(w / h)):  # the count uses the height, the tiles `tile`
                m = mask[:, i * tile:(i + 1) * tile]
                if m.size and m.max() != 0:
                    out.save_png(f"test/{cls}", f"{name}_{i}.png", img[:, i * tile:(i + 1) * tile])
                    out.save_png(f"ground_truth/{cls}", f"{name}_{i}_mask.png", m)
                    kept += 1
            if not kept:  # (0106_010_03's mask is all black: the released script too keeps none)
                out.warn(f"AITEX: {f}'s mask marks no defect pixel in any tile; no tile kept")
        return out.finish("AITEX", raw_dir, {"tile": tile, "normal_tiles": normal_tiles},
                          {"normal_images": len(normals), "defect_images": len(defects)})
