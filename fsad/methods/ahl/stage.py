"""AHL as its method's stage after base training: bank, tasks, meta-training and the
unified model's test scores (`run_ahl`, `ahl_stage`), and new images scored with a
finished run's unified heads (`score_unified`)."""

from __future__ import annotations

import logging
import os
import time

import jax
import numpy as np

from fsad.checkpoints import checkpoint_manager, restore_latest
from fsad.errors import UserError
from fsad.methods.ahl.bank import FAMILIES, load_or_build_bank, make_feature_fn
from fsad.methods.ahl.heads import HEAD_INITS, head_models, make_head_scorer
from fsad.methods.ahl.meta_train import run_meta_training
from fsad.methods.ahl.tasks import build_tasks, normal_clusters
from fsad.quick_compile import quick_jit
from fsad.train import score_images

def unified_heads_of(config, seed_dir: str) -> dict:
    """The unified head params a finished meta-training left in seed_dir/ahl_checkpoints
    (its newest checkpoint, restored in the structure it was saved with)."""
    folder, state = os.path.join(seed_dir, "ahl_checkpoints"), None
    if os.path.isdir(folder):
        mngr = checkpoint_manager(folder, 2)
        state = restore_latest(mngr)  # the newest readable one
        mngr.close()
    done = int(state["epoch"]) if state is not None else 0
    if done < config.ahl.epochs:
        where = f"it stopped after meta-epoch {done}" if done else "it has no checkpoint"
        raise UserError(f"AHL's meta-training in {seed_dir} is not finished ({where} of "
                        f"{config.ahl.epochs}); finish it with --mode train and the same "
                        f"config, then score")
    return state["params"]


def score_unified(config, method, base_variables, images: np.ndarray, mesh,
                  seed_dir: str, seed: int) -> np.ndarray:
    """New images scored as the AHL evaluation scores its test set: the trained base
    trunk's features, then the unified heads of seed_dir's finished meta-training.

    Args:
      method: the base model's `fsad.train.Method`; base_variables: its trained variables
        (after `method.prepare_eval`), as `ahl_stage` receives them.
      images: [N, H, W, 3] uint8.
    Returns:
      [N] anomaly scores.
    """
    params = unified_heads_of(config, seed_dir)
    hm, base_hm, _ = head_models(config, method, base_variables, seed)
    feats = score_images(make_feature_fn(config), base_variables, images, mesh,
                         config.eval_batch_size, desc="AHL features")
    return make_head_scorer(base_hm, config.eval_batch_size)(
        hm, params, [feats[k] for k in sorted(feats)])


def run_ahl(config, method, base_variables, normals, anomalies, test_images, mesh, seed: int,
            workdir: str, textures=None) -> dict:
    """Features (cached in workdir), HADG, CDL; returns test scores and AHL info.

    Args:
      method: the base model's `fsad.train.Method` (its test reference set for DRA).
    Returns:
      {"scores": [Nt] unified-model anomaly scores, "base_scores": [Nt] the base heads'
       scores on the same features, "tasks": T, "families": ..., "weights": ...}.
    """
    a = config.ahl
    if a.head_init not in HEAD_INITS:
        raise UserError(f"ahl.head_init={a.head_init!r}; use base (start from the trained "
                        f"base heads) or fresh (PyTorch's default init, the released code)")
    t0 = time.time()
    key = jax.random.key(seed + 20_000)
    k_bank, k_meta, k_init = jax.random.split(key, 3)
    bank, test = load_or_build_bank(config, base_variables, normals, anomalies, test_images,
                                    mesh, k_bank, workdir, textures)
    t_feat = time.time() - t0
    n_normal, n_anomaly = len(normals), len(anomalies)
    flat = bank[0][:n_normal].reshape(n_normal, -1)
    clusters, health = normal_clusters(flat, normals, a.clusters, seed, a.cluster_on)
    tasks = build_tasks(clusters, n_normal, n_anomaly, seed, a.pseudo_frac, base=a.base,
                        split_task=a.split_task)
    hm, base_hm, base_params = head_models(config, method, base_variables, seed)
    params_g = base_params if a.head_init == "base" else \
        quick_jit(hm.init_with)(k_init, [b[:1] for b in bank], hm.consts)
    params, info = run_meta_training(config, hm, params_g, bank, tasks, k_meta, workdir,
                                     mesh=mesh)
    scores_of = make_head_scorer(base_hm, config.eval_batch_size)
    logging.info("AHL: %d tasks, features %.1fs", tasks.num_tasks, t_feat)
    return {"scores": scores_of(hm, params, test),
            "base_scores": scores_of(base_hm, base_params, test),
            "tasks": tasks.num_tasks, "head_init": a.head_init,
            "cluster_sizes": [len(c) for c in clusters], **health,
            "families": [[FAMILIES[i] for i in f] for f in tasks.families.tolist()],
            "feature_seconds": t_feat, **info, "ahl_seconds": time.time() - t0}


def ahl_stage(runner, data, split, variables, scores: dict, metrics: dict, seed: int,
              seed_dir: str) -> tuple[dict, dict]:
    """AHL as its method's stage after base training (fsad.experiment.run_seed): meta-train
    the unified heads on the frozen base trunk, then report AHL's test metrics beside the
    base model's.

    Returns:
      (scores {"score": AHL's [Nt], "base_score": the base model's [Nt]}, metrics with
       AHL's auroc/aupr, base_auroc/base_aupr, base_auroc_same_features, pixel metrics of
       the base network, and "ahl": the stage's record).
    """
    from fsad.data.decode import load_image_folder
    from fsad.evaluate import image_metrics
    config = runner.config
    textures = load_image_folder(config.ahl.texture_root, config.data.img_size)
    info = run_ahl(config, runner.method, variables, data.images[split.train_normal],
                   data.images[split.train_anomaly], data.images[split.test], runner.mesh,
                   seed, seed_dir, textures)
    labels = data.labels[split.test]
    same = image_metrics(labels, info.pop("base_scores"))
    new_scores = {"score": info.pop("scores"), "base_score": scores["score"]}
    base = config.ahl.base_workdir or os.path.dirname(os.path.abspath(seed_dir))
    # (the loss of every meta-epoch was finite, meta_train.py: the last update diverged)
    kept = (f" with --config.ahl.base_workdir={base}, which keeps the trained base models"
            if config.keep_checkpoints or config.ahl.base_workdir else
            " (this run kept no checkpoint of its base models: keep_checkpoints=0)")
    diverged = (f"AHL's meta-training diverged; lower --config.ahl.optim.lr or "
                f"--config.ahl.inner_lr in a new --workdir{kept}")
    new_metrics = {**image_metrics(labels, new_scores["score"], diverged),
                   **{f"base_{k}": v for k, v in metrics.items() if k in ("auroc", "aupr")},
                   "base_auroc_same_features": same["auroc"],
                   **{k: v for k, v in metrics.items() if k.startswith("pixel_")},
                   "ahl": info}
    return new_scores, new_metrics
