"""DRA against DevNet in the hard setting of the procedural dataset (unseen classes only)."""

import pytest

from conftest import tiny_config
from fsad.data.synthetic import write_synthetic_dataset
from fsad.experiment import run_experiment, summary_text


@pytest.mark.slow
def test_dra_beats_devnet_on_unseen_classes(tmp_path):
    root = write_synthetic_dataset(str(tmp_path / "syn96"), size=96, seed=0)
    common = {"data.root": root, "data.img_size": 96, "data.setting": "hard",
              "data.known_class": "scratch", "batch_size": 24, "epochs": 2,
              "steps_per_epoch": 12, "explain.enabled": False}
    devnet = run_experiment(tiny_config(**common), str(tmp_path / "devnet"))
    dra = run_experiment(tiny_config("dra", **common, **{"optim.decay_every_epochs": 0}),
                         str(tmp_path / "dra"))
    print(summary_text(devnet))
    print(summary_text(dra))
    assert dra["runs"][0]["split"]["test_anomaly_classes"] == ["spot", "stain"]
    a_dev = devnet["summary"]["auroc"]["mean"]
    a_dra = dra["summary"]["auroc"]["mean"]
    assert a_dra > a_dev + 0.08, (a_dra, a_dev)
