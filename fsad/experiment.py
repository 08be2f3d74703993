"""One experiment: data, protocol, training and evaluation over seeds -> results.json."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time

import jax
import numpy as np

from fsad.compile_cache import enable_compilation_cache
from fsad.data import load_imageset, make_split
from fsad.evaluate import image_metrics, mean_std, per_class_auroc
from fsad.explain import explain_run
from fsad.methods import build_method
from fsad.scoring import calibrate
from fsad.train import (fit, init_state, make_mesh, make_score_fn, put_train_data, score_images,
                        variables_of)


def software_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for pkg in ("fsad", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
                "scikit-learn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    out["devices"] = [str(d) for d in jax.local_devices()]
    return out


def _config_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


def check_stored_config(workdir: str, config, must_exist: bool = False) -> bool:
    """Compares config with workdir/config.json; True when one is stored.

    Raises:
      ValueError: the stored config differs.
      FileNotFoundError: none is stored and must_exist.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        if must_exist:
            raise FileNotFoundError(f"{workdir!r} holds no trained run (no config.json); train "
                                    f"it first with --mode train")
        return False
    with open(path) as f:
        stored = json.load(f)
    current = _config_json(config)
    if stored != current:
        diff = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        raise ValueError(f"{workdir!r} holds a run with a different config (fields {diff}); "
                         f"use a new --workdir, or delete it to start over")
    return True


def _check_workdir(workdir: str, config) -> None:
    """A workdir holds one config: refuse to resume a run made with another."""
    os.makedirs(workdir, exist_ok=True)
    if not check_stored_config(workdir, config):
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(_config_json(config), f, indent=2)


def load_outliers(config) -> np.ndarray | None:
    """Outlier-exposure images (config.dra.outlier_root), decoded at img_size, or None."""
    return load_folder_images(config.dra.outlier_root if "dra" in config else "", config)


def load_folder_images(root: str, config) -> np.ndarray | None:
    """Every image under `root` (recursively) decoded at img_size; None for no root."""
    if not root:
        return None
    from fsad.data.decode import decode_many
    from fsad.scoring import list_images_recursive
    files = list_images_recursive(root)
    return decode_many([os.path.join(root, f) for f in files], config.data.img_size,
                       desc=f"decoding {root}")


def run_seed(config, data, seed: int, workdir: str, mesh, pretrained=None) -> dict:
    """Trains and evaluates one seed; returns its metrics and split record.

    pretrained: trunk variables (from `fsad.weights.pretrained_variables`) or None.
    """
    seed_dir = os.path.join(workdir, f"seed_{seed}")
    done = os.path.join(seed_dir, "metrics.json")
    if os.path.exists(done):
        with open(done) as f:
            logging.info("seed %d already finished in %s", seed, seed_dir)
            return json.load(f)
    t0 = time.time()
    d = config.data
    split = make_split(data, d.setting, d.n_anomaly, d.known_class or None, d.contamination, seed,
                       d.shot_pool)
    method = build_method(config)
    key = jax.random.key(seed)
    k_init, k_train = jax.random.split(key)
    tx = method.optimizer(config.steps_per_epoch)
    train_data = put_train_data(data.images[split.train_normal], data.images[split.train_anomaly],
                                mesh, load_outliers(config))
    state = init_state(method, k_init, train_data, tx, mesh, pretrained)
    state, train_info = fit(method, state, tx, train_data, mesh, k_train, config.batch_size,
                            config.epochs, config.steps_per_epoch, seed_dir,
                            config.keep_checkpoints, desc=f"{method.name} seed {seed}")
    del train_data
    t_eval = time.time()
    scores = score_images(make_score_fn(method, mesh), variables_of(state),
                          data.images[split.test], mesh, config.eval_batch_size,
                          key=jax.random.key(seed + 10_000) if method.random_scores else None)
    labels = data.labels[split.test]
    metrics = image_metrics(labels, scores["score"])
    for head, s in scores.items():
        if head != "score":
            metrics[f"auroc_{head}"] = image_metrics(labels, s)["auroc"]
    cal = calibrate(scores["score"], config.loss.prior_mu, config.loss.prior_sigma,
                    config.explain.confidence)
    metrics["flagged_at_confidence"] = float(np.mean(cal["anomalous"]))
    if config.explain.enabled:
        t_explain = time.time()
        test_masks = data.masks[split.test] if data.masks is not None else None
        explained = explain_run(method, variables_of(state), data.images[split.test], labels,
                                test_masks, scores["score"], data.file_ids[split.test], config,
                                seed_dir)
        metrics.update({k: v for k, v in explained.items() if k.startswith("pixel_")})
        # (explanations are of the base network; AHL replaces only its heads)
        metrics["explain_seconds"] = time.time() - t_explain
    if config.method == "ahl":
        from fsad.methods.ahl import run_ahl
        ahl = run_ahl(config, method, variables_of(state), data.images[split.train_normal],
                      data.images[split.train_anomaly], data.images[split.test], mesh, seed,
                      seed_dir, load_folder_images(config.ahl.texture_root, config))
        base = {f"base_{k}": v for k, v in metrics.items() if k in ("auroc", "aupr")}
        same = image_metrics(labels, ahl.pop("base_scores"))
        scores = {"score": ahl.pop("scores"), "base_score": scores["score"]}
        metrics = {**image_metrics(labels, scores["score"]), **base,
                   "base_auroc_same_features": same["auroc"], **{
                       k: v for k, v in metrics.items() if k.startswith("pixel_")}}
        metrics["ahl"] = ahl
    result = {"seed": seed, **metrics,
              "per_class_auroc": per_class_auroc(labels, scores["score"], data.classes[split.test]),
              "split": split.describe(data), **train_info,
              "eval_seconds": time.time() - t_eval, "wall_seconds": time.time() - t0}
    os.makedirs(seed_dir, exist_ok=True)
    np.savez(os.path.join(seed_dir, "test_scores.npz"), file_ids=data.file_ids[split.test],
             labels=labels, p_value=cal["p_value"], **scores)  # p-values of the base scores
    with open(done, "w") as f:
        json.dump(result, f, indent=2)
    return result


def load_pretrained(config) -> tuple[dict | None, str]:
    """The trunk initialisation (`fsad.weights.pretrained_variables`), checked against
    the model's shapes before any data is decoded or any step is taken."""
    from fsad.weights import merge_variables, pretrained_variables
    pretrained, init = pretrained_variables(config.model)
    if pretrained is not None:
        size = config.data.img_size
        shapes = jax.eval_shape(build_method(config).init, jax.random.key(0),
                                jax.ShapeDtypeStruct((1, size, size, 3), np.float32))
        merge_variables(shapes, pretrained)  # raises UserError on keys or shapes that differ
    return pretrained, init


def run_experiment(config, workdir: str, devices=None) -> dict:
    """Runs every seed of a config in `workdir` and writes workdir/results.json."""
    t0 = time.time()
    _check_workdir(workdir, config)
    enable_compilation_cache()
    pretrained, init = load_pretrained(config)
    data = load_imageset(config.data)
    mesh = make_mesh(devices)
    runs = [run_seed(config, data, config.seed + i, workdir, mesh, pretrained)
            for i in range(config.num_seeds)]
    results = {
        "method": config.method if config.method != "ahl" else f"ahl({config.ahl.base})",
        "dataset": data.name,
        "init": init,
        "summary": mean_std(runs),
        "runs": runs,
        "dataset_counts": data.counts(),
        "config": _config_json(config),
        "versions": software_versions(),
        "wall_seconds": time.time() - t0,
    }
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def summary_text(results: dict) -> str:
    """A one-screen summary of results.json."""
    s = results["summary"]
    r0 = results["runs"][0]
    cfg = results["config"]
    d = cfg["data"]
    n = len(results["runs"])
    pm = lambda k: f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" if n > 1 else f"{s[k]['mean']:.3f}"  # noqa: E731
    setting = d["setting"] + (f" (known: {d['known_class']})" if d["setting"] == "hard" else "")
    lines = [
        f"fsad {results['method']} on {results['dataset']}: {setting}, {d['n_anomaly']}-shot, "
        f"{d['img_size']} px, {n} seed(s); trunk from {results.get('init', '?')}",
        f"  AUROC  {pm('auroc')}",
        f"  AUPR   {pm('aupr')}",
        f"  train: {r0['split']['train_normal']} normal + {r0['split']['train_anomaly']} seen "
        f"anomalies; test: {r0['split']['test_normal']} normal + "
        f"{r0['split']['test_anomaly']} anomalies ({', '.join(r0['split']['test_anomaly_classes'])})",
    ]
    for k in s:
        if k.startswith(("auroc_", "pixel_auroc", "base_auroc")):
            lines.append(f"  {k:<14} {pm(k)}")
    if "ahl" in r0:
        a = r0["ahl"]
        epoch_s = a["epoch_seconds"]  # None when a resumed run had no epoch left
        lines.append(f"  AHL: {a['tasks']} tasks on {a['cluster_on']} clusters "
                     f"{a['cluster_sizes']}, {100 * a['dead_normal_fraction']:.0f}% of normals "
                     f"with all-zero features"
                     + (f", {epoch_s:.1f} s per meta-epoch" if epoch_s else ""))
    lines.append(f"  per class AUROC (seed {r0['seed']}): " + ", ".join(
        f"{c} {v:.3f}" for c, v in r0["per_class_auroc"].items()))
    lines.append(f"  wall time {results['wall_seconds']:.1f} s "
                 f"({s['wall_seconds']['mean']:.1f} s per seed) on {jax.default_backend()}")
    return "\n".join(lines)


def print_summary(results: dict) -> None:
    print(summary_text(results), file=sys.stdout, flush=True)
