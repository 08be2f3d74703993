"""benchmarks/throughput.py's AHL meta-step row at a tiny size, with the PyTorch ratio
where torch is installed. Speeds are not asserted. The script runs in its own process,
since it turns the persistent compilation cache off to measure compile times. (The
DevNet and DRA rows, about 25 s each here, are left to `benchmarks/gpu_session.sh`'s
CPU check: the suite's time is spent where fsad's own functions are tested.)"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_the_ahl_row_at_a_tiny_size(tmp_path):
    out = tmp_path / "throughput.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"),
           "--methods", "ahl", "--img_size", "32", "--batches", "4",
           "--dtypes", "float32", "--steps", "1", "--warmup", "1", "--n_normal", "16",
           "--ahl_normals", "6", "--json", str(out)]
    with_torch = importlib.util.find_spec("torch") is not None
    if with_torch:
        cmd += ["--torch", "--torch_modes", "eager_fp32"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["ahl_meta_step"]
    row = rows[0]
    assert row["tasks"] == 7 and row["train_compile_s"] > 0 and row["train_img_per_s"] > 0
    assert row["train_step_mib"] > 0  # XLA's plan of the meta-step's working memory
    if with_torch:
        assert row["torch_eager_fp32_img_per_s"] > 0 and row["fsad_over_best_torch"] > 0, row
    assert "| ahl_meta_step |" in done.stdout  # the printed table
