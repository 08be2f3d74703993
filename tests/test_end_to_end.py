"""DevNet, DRA and AHL trained end to end by the real command line on the procedural
dataset, each twice: once uninterrupted, once killed with SIGKILL mid-run (after its
first checkpoint; AHL during meta-training) and restarted with the same command. The
restarted run's test scores equal the uninterrupted run's bit for bit (so the same seed
and config give the same numbers), and the trained models serve every other check:
detection and localisation on known answers, open-set detection, the CLI's results,
rerun, scoring and config checks.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, SIZE
from fsad.data.synthetic import write_synthetic_dataset

pytestmark = pytest.mark.slow


def cli_args(config: str, workdir, root, *overrides, size: int = SIZE) -> list:
    return [sys.executable, "-m", "fsad.main", "--config", os.path.join(ROOT, config),
            "--workdir", str(workdir), "--config.data.name=folder", f"--config.data.root={root}",
            f"--config.data.img_size={size}", "--config.data.cache_dir=",
            "--config.model.pretrained=none", *overrides]


def env() -> dict:
    """One CPU device (the default), the suite's fsad cache (and compilation cache)."""
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    e["JAX_PLATFORMS"] = "cpu"
    return e


def run(args) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env(), timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def steps_in(folder) -> list:
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) \
        else []


def run_killed(args, checkpoints, after: int = 1) -> subprocess.CompletedProcess:
    """Starts the command, SIGKILLs it once `checkpoints` holds `after` finished
    checkpoints, then runs the same command to the end."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env())
    deadline = time.time() + 600
    while len(steps_in(checkpoints)) < after:
        assert proc.poll() is None, f"finished before the kill: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "no checkpoint in 10 minutes"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return run(args)


def results(workdir) -> dict:
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def test_scores(workdir, seed=0) -> dict:
    with np.load(os.path.join(workdir, f"seed_{seed}", "test_scores.npz")) as f:
        return {k: f[k] for k in f.files}


test_scores.__test__ = False  # a helper, not a test


def assert_same_scores(a, b):
    """Bit for bit: the same seed and config give the same numbers, killed or not."""
    sa, sb = test_scores(a), test_scores(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    ra, rb = results(a)["runs"][0], results(b)["runs"][0]
    for k in ("auroc", "aupr"):
        assert ra[k] == rb[k]


# ---------------------------------------------------------------- DevNet

@pytest.fixture(scope="module")
def devnet(tmp_path_factory):
    """DevNet by the command line, general 10-shot, 3 x 10 steps: (dataset root,
    uninterrupted workdir, killed-and-restarted workdir, restarted run's output)."""
    base = tmp_path_factory.mktemp("devnet")
    root = write_synthetic_dataset(str(base / "data"), size=SIZE, seed=1)
    over = ["--config.batch_size=16", "--config.epochs=3", "--config.steps_per_epoch=10",
            "--config.optim.decay_every_epochs=2"]
    run(cli_args("configs/devnet.py", base / "u", root, *over))
    killed = run_killed(cli_args("configs/devnet.py", base / "k", root, *over),
                        base / "k" / "seed_0" / "checkpoints")
    return root, base / "u", base / "k", over, killed


def test_devnet_detects_and_localises_the_defects(devnet):
    root, u, _, _, _ = devnet
    res = results(u)
    run0 = res["runs"][0]
    assert res["init"] == "random init (resnet18)"
    assert run0["auroc"] > 0.8, run0["auroc"]  # measured 0.88; a blind guess scores 0.5
    assert set(run0["per_class_auroc"]) == {"scratch", "spot", "stain"}
    assert run0["split"]["train_anomaly"] == 10 and len(run0["split"]["seen_anomalies"]) == 10
    # gradient saliency against the masks (chance is 0.5): measured 0.80 and 0.84
    assert run0["pixel_auroc_pooled"] > 0.65 and run0["pixel_auroc_per_image_mean"] > 0.7
    assert len(os.listdir(u / "seed_0" / "overlays")) == 8
    assert (u / "seed_0" / "auroc_f1_curve.png").exists()
    assert run0["compile_seconds"] > 0 and run0["step_seconds"] > 0


def test_devnet_killed_after_a_checkpoint_resumes_to_the_same_scores(devnet):
    _, u, k, _, killed = devnet
    run0 = results(k)["runs"][0]
    assert run0["resumed_from"] >= 10 and run0["steps"] <= 20  # resumed, not restarted
    assert_same_scores(u, k)


def test_rerun_scoring_and_another_config(devnet):
    root, u, _, over, _ = devnet
    args = cli_args("configs/devnet.py", u, root, *over)
    again = run(args)  # the finished seed is read back: no step is taken
    assert "step/s" not in again.stderr and "AUROC" in again.stdout
    csv_path = u / "scores.csv"
    scored = run(args + ["--mode=score", f"--input={os.path.join(root, 'test')}",
                         f"--output={csv_path}", "--heatmaps"])
    assert "scores:" in scored.stdout
    with open(csv_path) as f:
        rows = {r["file"]: r for r in csv.DictReader(f)}
    n_test = len(os.listdir(os.path.join(root, "test", "good"))) + 3 * 12
    assert len(rows) == n_test and len(os.listdir(u / "heatmaps")) == n_test
    ev = test_scores(u)
    for fid, score, p in zip(ev["file_ids"], ev["score"], ev["p_value"]):
        row = rows[os.path.relpath(str(fid), "test")]
        assert float(row["score"]) == pytest.approx(float(score), rel=1e-4, abs=1e-5)
        assert float(row["p_value"]) == pytest.approx(float(p), rel=1e-3, abs=1e-6)
        assert row["anomalous"] == str(int(float(row["z"]) > 1.959964))
    bad = subprocess.run(args + ["--config.data.n_anomaly=2"], capture_output=True, text=True,
                         cwd=ROOT, env=env(), timeout=300)
    assert bad.returncode == 2 and "different config" in bad.stderr
    assert bad.stderr.strip().startswith("fsad: error:")


# ---------------------------------------------------------------- DRA

@pytest.fixture(scope="module")
def dra(tmp_path_factory):
    """DRA in the hard setting (seen: scratch; unseen: spot, stain), 3 x 12 steps at
    64 px, uninterrupted and killed after its first checkpoint. (At 32 px, random-init
    DRA scored 0.47 to 0.71 over three seeds in 36 steps; at 64 px 0.77 to 0.98.)"""
    base = tmp_path_factory.mktemp("dra")
    root = write_synthetic_dataset(str(base / "data"), size=64, seed=0)
    over = ["--config.data.setting=hard", "--config.data.known_class=scratch",
            "--config.batch_size=24", "--config.epochs=3", "--config.steps_per_epoch=12",
            "--config.optim.decay_every_epochs=0", "--config.explain.enabled=False"]
    run(cli_args("configs/dra.py", base / "u", root, *over, size=64))
    run_killed(cli_args("configs/dra.py", base / "k", root, *over, size=64),
               base / "k" / "seed_0" / "checkpoints")
    return base / "u", base / "k"


def test_dra_detects_anomaly_classes_it_never_saw(dra):
    """Trained on scratches only, DRA scores spots and stains above normals. The pseudo
    head never sees a real anomaly of the test classes: its AUROC is DRA's open-set part.
    (The normality head, |.| as released, is not yet above chance this early.)"""
    u, _ = dra
    run0 = results(u)["runs"][0]
    assert run0["split"]["test_anomaly_classes"] == ["spot", "stain"]
    assert run0["auroc"] > 0.7, run0["auroc"]  # measured 0.98 (0.77 and 0.89 on seeds 1, 2)
    assert run0["auroc_pseudo"] > 0.75, run0["auroc_pseudo"]  # 0.97 (0.91, 0.89)
    assert set(run0) >= {"auroc_seen", "auroc_residual", "auroc_normality"}


def test_dra_is_deterministic_through_a_kill(dra):
    u, k = dra
    assert results(k)["runs"][0]["resumed_from"] >= 12
    assert_same_scores(u, k)


# ---------------------------------------------------------------- AHL

@pytest.fixture(scope="module")
def ahl_devnet(tmp_path_factory):
    """AHL on DevNet in the hard setting (seen: spot), 8 base steps and 6 meta-epochs,
    uninterrupted and killed after its second meta-training checkpoint."""
    base = tmp_path_factory.mktemp("ahl")
    root = write_synthetic_dataset(str(base / "data"), size=SIZE, seed=0)
    over = ["--config.data.setting=hard", "--config.data.known_class=spot",
            "--config.data.n_anomaly=6", "--config.batch_size=16", "--config.epochs=1",
            "--config.steps_per_epoch=8", "--config.ahl.epochs=6", "--config.ahl.history=2",
            "--config.ahl.psi_steps=5", "--config.explain.enabled=False"]
    run(cli_args("configs/ahl_devnet.py", base / "u", root, *over))
    run_killed(cli_args("configs/ahl_devnet.py", base / "k", root, *over),
               base / "k" / "seed_0" / "ahl_checkpoints", after=2)
    return base / "u", base / "k"


def test_ahl_devnet_end_to_end(ahl_devnet):
    u, _ = ahl_devnet
    res = results(u)
    run0 = res["runs"][0]
    assert res["method"] == "ahl(devnet)"
    assert run0["split"]["test_anomaly_classes"] == ["scratch", "stain"]
    info = run0["ahl"]
    assert info["tasks"] == 7 and len(info["loss"]) == 6 and len(info["weights"]) == 6
    assert len(info["weight_spread"]) == 6 and info["head_init"] == "base"
    assert all(f[0] != f[1] for f in info["families"])
    assert abs(sum(info["weights"][-1]) - 1) < 1e-5
    # weights[e] are those epoch e used: 1/T until psi has a K = 2 epoch window and its
    # next epoch, so from epoch index K + 1 = 3 on
    for e in range(3):
        assert info["weights"][e] == pytest.approx([1 / 7] * 7)
    assert info["weights"][3] != info["weights"][2] and info["weight_spread"][3] > 1.0
    # the base heads on the cached features reproduce the base model's own test scores
    assert run0["base_auroc_same_features"] == pytest.approx(run0["base_auroc"], abs=1e-6)
    assert 0.0 <= run0["auroc"] <= 1.0
    assert (u / "seed_0" / "ahl_features.npz").exists()


def test_ahl_killed_during_meta_training_resumes_to_the_same_scores(ahl_devnet):
    u, k = ahl_devnet
    assert_same_scores(u, k)
    np.testing.assert_array_equal(results(u)["runs"][0]["ahl"]["weights"],
                                  results(k)["runs"][0]["ahl"]["weights"])
