"""Image-level metrics and their aggregation over seeds."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUROC and AUPR (average precision) of anomaly scores.

    Args:
      labels: [N] {0, 1}, 1 anomalous.
      scores: [N] float, higher is more anomalous.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, np.float64)
    if not np.all(np.isfinite(scores)):
        from fsad.errors import UserError
        raise UserError("the anomaly scores are not finite: training diverged; lower "
                        "--config.optim.lr in a new --workdir (this one holds the config "
                        "that diverged)")
    return {"auroc": float(roc_auc_score(labels, scores)),
            "aupr": float(average_precision_score(labels, scores))}


def per_class_auroc(labels, scores, classes) -> dict[str, float]:
    """AUROC of each anomaly class against all normals. classes: [N] str."""
    labels, scores, classes = map(np.asarray, (labels, scores, classes))
    out = {}
    for c in sorted(set(classes[labels == 1].tolist())):
        keep = (labels == 0) | (classes == c)
        out[c] = float(roc_auc_score(labels[keep], scores[keep]))
    return out


def mean_std(runs: list[dict], labels: tuple[str, ...] = ("seed",)) -> dict[str, dict[str, float]]:
    """Mean and (population) std of every numeric key over runs, except the keys in
    `labels` (numbers that name a run, such as its seed, not measure it) and booleans."""
    keys = [k for k, v in runs[0].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in labels]
    return {k: {"mean": float(np.mean([r[k] for r in runs])),
                "std": float(np.std([r[k] for r in runs]))} for k in keys}
