"""DRA in the hard setting of the procedural dataset: it detects classes it never saw."""

import pytest

from conftest import tiny_config
from fsad.data.synthetic import write_synthetic_dataset
from fsad.experiment import run_experiment, summary_text


@pytest.mark.slow
def test_dra_detects_unseen_classes(tmp_path):
    """Trained on scratches only, DRA scores spots and stains above normals.

    The pseudo head never sees a real anomaly of the test classes, so its AUROC is
    the open-set part of DRA. (A one-seed margin over DevNet on 44 test images was
    tried and dropped: DevNet's AUROC here moves from 0.48 to 0.78 with the summation
    order of one conv, DRA's from 0.80 to 0.87. The normality head, |.| of its output
    as released, from random init after 24 steps scored 0.58 here, so it is not
    asserted.)
    """
    root = write_synthetic_dataset(str(tmp_path / "syn96"), size=96, seed=0)
    config = tiny_config("dra", **{
        "data.root": root, "data.img_size": 96, "data.setting": "hard",
        "data.known_class": "scratch", "batch_size": 24, "epochs": 2, "steps_per_epoch": 12,
        "explain.enabled": False, "optim.decay_every_epochs": 0})
    dra = run_experiment(config, str(tmp_path / "dra"))
    print(summary_text(dra))
    assert dra["runs"][0]["split"]["test_anomaly_classes"] == ["spot", "stain"]
    s = dra["summary"]
    assert s["auroc"]["mean"] > 0.7, s["auroc"]
    assert s["auroc_pseudo"]["mean"] > 0.65, s["auroc_pseudo"]
