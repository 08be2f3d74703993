"""benchmarks/reproduce.py: a grid of cells on the procedural dataset, its table, and a
second invocation that reads every finished cell back instead of training again."""

import importlib.util
import json
import os

import pytest

from conftest import ROOT, SIZE

pytestmark = pytest.mark.slow


def load_reproduce():
    spec = importlib.util.spec_from_file_location(
        "reproduce", os.path.join(ROOT, "benchmarks", "reproduce.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_table_of_cells_resumes_and_reads_back(tmp_path, synthetic_root):
    reproduce = load_reproduce()
    out = tmp_path / "table"
    argv = ["--dataset", "folder", "--methods", "devnet", "--settings", "general", "hard",
            "--known_classes", "scratch", "spot", "--shots", "1", "--seeds", "1",
            "--paper_dataset", "elpv", "--out", str(out),
            *[f"--set={kv}" for kv in (
                f"data.root={synthetic_root}", f"data.img_size={SIZE}", "data.cache_dir=",
                "model.pretrained=none", "batch_size=16", "epochs=1", "steps_per_epoch=10",
                "optim.decay_every_epochs=2", "explain.enabled=False")]]
    assert reproduce.main(argv) == 0
    table = json.loads((out / "table.json").read_text())
    # general, hard with two known classes, and the hard mean over them
    assert [(r["setting"], r["shots"]) for r in table["rows"]] == [
        ("general", 1), ("hard (scratch known)", 1), ("hard (spot known)", 1),
        ("hard (mean over known classes)", 1)]
    for r in table["rows"]:
        assert r["seeds"] == 1 and 0.0 <= r["mean"] <= 1.0 and r["seconds"] > 0
    hard = table["rows"][1:3]
    assert table["rows"][3]["mean"] == pytest.approx((hard[0]["mean"] + hard[1]["mean"]) / 2)
    assert len(hard) == 2 and table["rows"][0]["paper"] == {"dra_paper": 0.514,
                                                            "ahl_paper": 0.810}
    for i, cell in enumerate(("general/1shot", "hard_scratch/1shot", "hard_spot/1shot")):
        res = json.loads((out / "devnet" / cell / "results.json").read_text())
        assert res["config"]["data"]["n_anomaly"] == 1 and len(res["runs"]) == 1
        if i:  # one Runner for the table: the train step compiled for the first cell
            assert res["runs"][0]["compile_seconds"] == 0.0
    md = (out / "table.md").read_text()
    assert "| devnet | general | 1 |" in md and "dra paper 0.514" in md

    # again: every seed is read back from its metrics.json (a retrained cell would have
    # another wall time), so an interrupted table resumes where it stopped
    assert reproduce.main(argv) == 0
    assert json.loads((out / "table.json").read_text())["rows"] == table["rows"]
