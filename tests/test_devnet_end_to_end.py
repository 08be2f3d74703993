"""DevNet trained end to end on the procedural dataset, through the API and the CLI."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, SIZE, tiny_config
from fsad.data.synthetic import write_synthetic_dataset
from fsad.experiment import run_experiment, summary_text


@pytest.mark.slow
def test_devnet_learns_the_synthetic_defects(tmp_path):
    # 96 px: the stride-32 map is 3x3, so top-K MIL has cells to rank (32 px gives 1x1)
    root = write_synthetic_dataset(str(tmp_path / "syn96"), size=96, n_train=60, n_test_good=20,
                                   n_per_class=12, seed=1)
    config = tiny_config(**{"data.root": root, "data.img_size": 96, "epochs": 4})
    results = run_experiment(config, str(tmp_path / "run"))
    auroc = results["summary"]["auroc"]["mean"]
    print(summary_text(results))
    assert auroc > 0.8, f"AUROC {auroc:.3f} on defects a blind guess scores 0.5 on"
    run = results["runs"][0]
    assert run["split"]["train_anomaly"] == 10 and len(run["split"]["seen_anomalies"]) == 10
    assert set(run["per_class_auroc"]) == {"scratch", "spot", "stain"}
    # explanation: gradient saliency against the synthetic masks (chance is 0.5)
    assert run["pixel_auroc_pooled"] > 0.65, run["pixel_auroc_pooled"]
    assert run["pixel_auroc_per_image_mean"] > 0.8, run["pixel_auroc_per_image_mean"]
    seed_dir = tmp_path / "run" / "seed_0"
    assert len(os.listdir(seed_dir / "overlays")) == 8
    assert (seed_dir / "auroc_f1_curve.png").exists()


@pytest.mark.slow
def test_cli_writes_results_and_resumes(synthetic_root, tmp_path):
    work = str(tmp_path / "cli")
    cmd = [sys.executable, "-m", "fsad.main", "--config", os.path.join(ROOT, "configs/devnet.py"),
           "--workdir", work, "--config.data.name=synthetic", f"--config.data.root={synthetic_root}",
           f"--config.data.img_size={SIZE}", "--config.data.cache_dir=", "--config.batch_size=16",
           "--config.epochs=1", "--config.steps_per_epoch=4", "--config.num_seeds=2",
           "--config.data.setting=hard", "--config.data.known_class=spot",
           "--config.data.n_anomaly=3", "--config.seed=2", "--config.model.pretrained=none"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "AUROC" in out.stdout and "known: spot" in out.stdout
    with open(os.path.join(work, "results.json")) as f:
        res = json.load(f)
    assert [r["seed"] for r in res["runs"]] == [2, 3]
    assert res["config"]["data"]["known_class"] == "spot"
    assert set(res["summary"]["auroc"]) == {"mean", "std"}
    assert res["versions"]["jax"] and res["dataset_counts"]["anomaly_spot"] == 12
    for r in res["runs"]:
        assert r["split"]["test_anomaly_classes"] == ["scratch", "stain"]
        assert all(f.startswith("test/spot/") for f in r["split"]["seen_anomalies"])
    assert os.listdir(os.path.join(work, "seed_2", "checkpoints"))
    # a rerun with the same workdir finds both seeds done and trains nothing
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step/s" not in again.stderr
    # scoring the test folder with the trained run reproduces the evaluation scores
    csv_path = os.path.join(work, "test_scores.csv")
    score_cmd = cmd + ["--mode=score", f"--input={os.path.join(synthetic_root, 'test')}",
                       f"--output={csv_path}", "--heatmaps"]
    scored = subprocess.run(score_cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert scored.returncode == 0, scored.stderr[-3000:]
    with open(csv_path) as f:
        rows = {r["file"]: r for r in csv.DictReader(f)}
    assert len(rows) == 20 + 36
    assert len(os.listdir(os.path.join(work, "heatmaps"))) == 20 + 36
    ev = np.load(os.path.join(work, "seed_2", "test_scores.npz"))
    assert len(ev["file_ids"]) == 20 + 24
    for fid, score, p in zip(ev["file_ids"], ev["score"], ev["p_value"]):
        row = rows[os.path.relpath(fid, "test")]
        assert float(row["score"]) == pytest.approx(float(score), rel=1e-4, abs=1e-5)
        assert float(row["p_value"]) == pytest.approx(float(p), rel=1e-3, abs=1e-6)
        assert row["anomalous"] == str(int(float(row["z"]) > 1.959964))
    # a different config in the same workdir is refused with a clear message
    bad = subprocess.run(cmd + ["--config.data.n_anomaly=2"], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert bad.returncode != 0 and "different config" in bad.stderr
