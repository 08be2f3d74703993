"""KolektorSDD -> SDD (spec §9.2, the released ``convert_SDD.py``).

Each image is cut into three bands along its height at ``h // 3`` and
``2h // 3``. A band is an anomaly if its label band has any non-zero pixel,
a normal otherwise (clean bands of defective parts are normals). Normal bands
are split 3:1; anomalies go to ``test/defect`` with their label bands as masks.
"""

from __future__ import annotations

import os

from fsad.data.convert.common import (Output, RawLayoutError, list_dirs, list_files, open_raw,
                                      progress, read_rgb, require_dir, require_file,
                                      split_3_to_1, stem)

SUBSET = "SDD"
LAYOUT = "RAW_DIR/<kosNN>/PartK.jpg with its label RAW_DIR/<kosNN>/PartK_label.bmp"


def _bands(h: int) -> list[slice]:
    return [slice(0, h // 3), slice(h // 3, 2 * h // 3), slice(2 * h // 3, h)]


def convert(raw_dir: str, out_dir: str, overwrite: bool = False):
    """Converts the raw KolektorSDD download into OUT_DIR/SDD.

    Args:
      raw_dir: the unpacked download (one folder per part series, kos01 ... kos50).
      out_dir: output parent folder.
      overwrite: replace an existing OUT_DIR/SDD.
    Returns:
      ConvertResult.
    """
    require_dir(raw_dir, "SDD", LAYOUT)
    # the released script takes the files whose names end in "jpg" as the images
    series = {d: list_files(os.path.join(raw_dir, d)) for d in list_dirs(raw_dir)}
    images = [(d, f) for d, files in series.items() for f in files if f.endswith("jpg")]
    labels = {(d, stem(f) + "_label.bmp") for d, f in images}
    others = list_files(raw_dir) + [os.path.join(d, f) for d, files in series.items()
                                    for f in files
                                    if not f.endswith("jpg") and (d, f) not in labels]
    if not images:
        raise RawLayoutError(f"SDD: no <kosNN>/*.jpg images under {raw_dir!r}; expected the "
                             f"raw layout {LAYOUT}")

    def label_of(d, f):
        return read_rgb(require_file(os.path.join(raw_dir, d, stem(f) + "_label.bmp"), "SDD",
                                     LAYOUT))

    # first pass: which bands are anomalous (labels only), so that the normals can be split
    flags = {}
    for d, f in progress(images, "SDD labels"):
        label = label_of(d, f)
        with open_raw(os.path.join(raw_dir, d, f)) as im:  # reads the header only
            if (im.height, im.width) != label.shape[:2]:
                raise RawLayoutError(f"SDD: {d}/{f} is {im.height}x{im.width} but its label is "
                                     f"{label.shape[0]}x{label.shape[1]}; the released script "
                                     f"stops here too (replace the damaged file)")
        flags[d, f] = [bool(label[rows].max() != 0) for rows in _bands(label.shape[0])]
    normal_names = [f"{d}_{stem(f)}_{i}" for (d, f), fl in flags.items()
                    for i, bad in enumerate(fl) if not bad]
    n_anomalies = sum(sum(fl) for fl in flags.values())
    train, _ = split_3_to_1(normal_names)
    train = set(train)
    with Output(out_dir, SUBSET, overwrite) as out:
        out.warn_skipped("SDD", others, "neither a part's image (<kosNN>/*.jpg) nor its "
                         "label (<kosNN>/*_label.bmp)")
        for d, f in progress(images, "SDD images"):
            img, label = read_rgb(os.path.join(raw_dir, d, f)), label_of(d, f)
            for i, rows in enumerate(_bands(img.shape[0])):
                name = f"{d}_{stem(f)}_{i}"
                if flags[d, f][i]:
                    out.save_png("test/defect", name + ".png", img[rows])
                    out.save_png("ground_truth/defect", name + "_mask.png", label[rows])
                else:
                    out.save_png("train/good" if name in train else "test/good", name + ".png",
                                 img[rows])
        return out.finish("SDD", raw_dir, extra={"images": len(images), "bands": 3 * len(images),
                                                 "anomalous_bands": n_anomalies})
