"""Turns one of the papers' raw dataset downloads into the folder layout fsad reads.

    python -m fsad.convert DATASET RAW_DIR OUT_DIR [--overwrite]

writes OUT_DIR/<subset>/ (train/good, test/good, test/<class>, ground_truth/<class>,
manifest.json); train on it with

    python -m fsad.main --config configs/devnet.py --workdir runs/x \\
        --config.data.name=folder --config.data.root=OUT_DIR --config.data.subset=<subset>
"""

from __future__ import annotations

import argparse
import sys

from fsad.data.convert import CONVERTERS, convert, get_converter
from fsad.errors import UserError


def _parser() -> argparse.ArgumentParser:
    lines = [f"  {c.name:12s} -> OUT_DIR/{c.subset:14s} papers: {c.paper_counts}\n"
             f"  {'':12s}    raw: {c.layout}" for c in CONVERTERS.values()]
    p = argparse.ArgumentParser(
        prog="python -m fsad.convert", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert one of the papers' raw datasets into the MVTec layout fsad reads "
                    "(following the authors' released converter scripts).",
        epilog="datasets (train/good / test/good / anomalies):\n" + "\n".join(lines)
               + "\n\nMVTec AD needs no conversion: --config.data.name=folder "
                 "--config.data.root=MVTEC_ROOT --config.data.subset=bottle")
    p.add_argument("dataset", help=f"one of: {', '.join(CONVERTERS)}")
    p.add_argument("raw_dir", help="the unpacked raw download")
    p.add_argument("out_dir", help="output parent folder; OUT_DIR/<subset> is written")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR/<subset>")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        conv = get_converter(args.dataset)
        result = convert(args.dataset, args.raw_dir, args.out_dir, overwrite=args.overwrite)
    except UserError as err:
        print(f"fsad.convert: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the half-written folder is gone (Output's exit)
        print("fsad.convert: interrupted; nothing was written (OUT_DIR/<subset> is as it was)",
              file=sys.stderr)
        return 130
    normals = {k: v for k, v in result.counts.items() if k.endswith("/good")}
    anomalies = {k[5:]: v for k, v in result.counts.items()
                 if k.startswith("test/") and not k.endswith("/good")}
    classes = "class" if len(anomalies) == 1 else "classes"
    print(f"wrote {result.root}")
    print(f"  train/good {normals.get('train/good', 0)}, test/good {normals.get('test/good', 0)}, "
          f"anomalies {sum(anomalies.values())} in {len(anomalies)} {classes} "
          f"(papers: {conv.paper_counts})")
    for cls, n in anomalies.items():
        masks = result.counts.get(f"ground_truth/{cls}")
        print(f"    {cls}: {n}" + (f" ({masks} masks)" if masks else ""))
    for key, value in result.extra.items():
        print(f"  {key}: {value}")
    if result.warnings:
        print(f"  {len(result.warnings)} warning(s), listed in {result.root}/manifest.json")
    print(f"train with: --config.data.name=folder --config.data.root={args.out_dir} "
          f"--config.data.subset={conv.subset}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
