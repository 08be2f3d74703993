"""Image-level metrics and their aggregation over seeds."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


BASE_DIVERGED = ("training diverged; lower --config.optim.lr in a new --workdir (this one "
                 "holds the config that diverged)")


def image_metrics(labels: np.ndarray, scores: np.ndarray,
                  diverged: str = BASE_DIVERGED) -> dict[str, float]:
    """AUROC and AUPR (average precision) of anomaly scores.

    Args:
      labels: [N] {0, 1}, 1 anomalous.
      scores: [N] float, higher is more anomalous.
      diverged: what the error says where a score is not finite (what diverged, and the
        setting to change).
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, np.float64)
    if not np.all(np.isfinite(scores)):
        from fsad.errors import UserError
        raise UserError(f"the anomaly scores are not finite: {diverged}")
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


def mean_std(runs: list[dict], labels: tuple[str, ...] = ("seed", "resumed_from")
             ) -> dict[str, dict[str, float]]:
    """Mean and (population) std of every numeric key over the runs that give it a number,
    except the keys in `labels` (numbers that name a run, such as its seed or the step
    it resumed at, not measure it) and booleans. A run may give None or nothing for a key
    (a seed resumed at its last step has no step time or last loss of its own): the key's
    figures are then those of the other runs, and "n" says how many gave it where that is
    not every run."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    keys = list(dict.fromkeys(k for r in runs for k, v in r.items()
                              if number(v) and k not in labels))
    out = {}
    for k in keys:
        values = [r[k] for r in runs if number(r.get(k))]
        out[k] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
        if len(values) < len(runs):
            out[k]["n"] = len(values)
    return out
