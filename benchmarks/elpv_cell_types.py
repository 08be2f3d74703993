"""ELPV's anomaly classes are cell types: how much of a run's AUROC is the cell type.

ELPV's two anomaly classes, ``mono`` and ``poly``, are the defective cells of two
kinds of solar cell (monocrystalline and polycrystalline), and the normal cells are of
both kinds too. In the hard setting a model sees defective cells of one kind only, and
can learn "this kind of cell" instead of "defect": it then scores the normal cells of the
known kind above the defective cells of the other kind, and the hard setting's AUROC
falls below chance although the model does find defects within a kind.

For every run folder given (a fsad workdir, or a `benchmarks/reproduce.py` --out with
many), this prints per seed, from `seed_<s>/test_scores.npz`:
  auroc        the run's AUROC (all test normals against the test anomalies);
  type_auroc   the AUROC of the scores on the test normals alone, mono against poly
               (0.5: the score ignores the cell type; 1: mono normals score above every
               poly normal; 0: the other way round);
  within_mono, within_poly  the AUROC within one kind of cell (its normals against its
               defective cells), where both are in the test set.

    python benchmarks/elpv_cell_types.py runs/elpv_table
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np
from sklearn.metrics import roc_auc_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fsad.errors import UserError  # noqa: E402


def cell_type_aurocs(file_ids, labels, scores, types_by_path: dict[str, str]) -> dict:
    """AUROC overall, of the cell type on the normals, and within each cell type.

    Args:
      file_ids: [N] paths relative to the ELPV package's data folder.
      labels: [N] {0, 1}, 1 defective.
      scores: [N] anomaly scores, higher is more anomalous.
      types_by_path: path -> "mono" | "poly", for every path in file_ids.
    """
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    types = np.array([types_by_path[str(f)] for f in file_ids])
    normal = labels == 0
    out = {"auroc": float(roc_auc_score(labels, scores)),
           "type_auroc": float(roc_auc_score(types[normal] == "mono", scores[normal]))}
    for kind in ("mono", "poly"):
        keep = types == kind
        if len(set(labels[keep].tolist())) == 2:
            out[f"within_{kind}"] = float(roc_auc_score(labels[keep], scores[keep]))
    return out


def elpv_types() -> dict[str, str]:
    """Every ELPV path (as fsad's file_ids write it) -> its cell type."""
    from fsad.data.elpv import elpv_labels
    _, paths, _, types = elpv_labels()
    return dict(zip(paths.tolist(), types.tolist()))


def score_files(folder: str) -> list[str]:
    """Every seed_<s>/test_scores.npz under folder, in name order."""
    return sorted(glob.glob(os.path.join(folder, "**", "seed_*", "test_scores.npz"),
                            recursive=True))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", help="fsad workdirs or reproduce.py --out folders")
    args = parser.parse_args(argv)
    files_of = {folder: score_files(folder) for folder in args.folders}
    for folder, files in files_of.items():
        if not files:
            parser.error(f"no seed_*/test_scores.npz under {folder}: give a finished "
                         "fsad workdir or a benchmarks/reproduce.py --out folder")
    try:
        types = elpv_types()
    except UserError as err:
        parser.error(str(err))
    rows = []
    for folder, files in files_of.items():
        for path in files:
            z = np.load(path)
            row = {"run": os.path.relpath(os.path.dirname(path), folder),
                   **cell_type_aurocs(z["file_ids"], z["labels"], z["score"], types)}
            rows.append(row)
    keys = ["auroc", "type_auroc", "within_mono", "within_poly"]
    print("| run | " + " | ".join(keys) + " |")
    print("| --- |" + " --- |" * len(keys))
    for row in rows:
        print(f"| {row['run']} | " + " | ".join(
            f"{row[k]:.3f}" if k in row else "–" for k in keys) + " |")
    return rows


if __name__ == "__main__":
    main()
