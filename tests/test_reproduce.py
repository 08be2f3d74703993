"""benchmarks/reproduce.py: a grid of cells on the procedural dataset, its table, and a
second invocation that reads every finished cell back instead of training again."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, coordinator_address, cpu_env

pytestmark = pytest.mark.slow


def load_reproduce():
    spec = importlib.util.spec_from_file_location(
        "reproduce", os.path.join(ROOT, "benchmarks", "reproduce.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_table_of_cells_resumes_and_reads_back(tmp_path, synthetic_root, capsys):
    """Three DevNet cells in one process, then the same table resumed. (DevNet's DS
    variant on one scale of AlexNet, the trunk that compiles fastest: the check is of the
    table, and with ResNet-18 it took 28 s instead of 6 s. That ablation has a figure in
    DevNet-TPAMI's Table 5, so the general row still carries the papers' figure.)"""
    reproduce = load_reproduce()
    out = tmp_path / "table"
    argv = ["--dataset", "folder", "--methods", "devnet", "--settings", "general", "hard",
            "--known_classes", "scratch", "spot", "--shots", "10", "--seeds", "1",
            "--paper_dataset", "elpv", "--out", str(out),
            *[f"--set={kv}" for kv in (
                f"data.root={synthetic_root}", "data.img_size=64", "data.cache_dir=",
                "model.pretrained=none", "model.backbone=alexnet", "model.n_scales=1",
                "devnet.variant=DS", "batch_size=16", "epochs=1", "steps_per_epoch=5",
                "optim.decay_every_epochs=2", "explain.enabled=False")]]
    assert reproduce.main(argv) == 0
    table = json.loads((out / "table.json").read_text())
    # general, hard with two known classes, and the hard mean over them
    assert [(r["setting"], r["shots"]) for r in table["rows"]] == [
        ("general", 10), ("hard (scratch known)", 10), ("hard (spot known)", 10),
        ("hard (mean over known classes)", 10)]
    for r in table["rows"]:
        assert r["seeds"] == 1 and 0.0 <= r["mean"] <= 1.0 and r["seconds"] > 0
    hard = table["rows"][1:3]
    assert table["rows"][3]["mean"] == pytest.approx((hard[0]["mean"] + hard[1]["mean"]) / 2)
    # DevNet-TPAMI Table 5's figure for this ablation (DS on AlexNet; general 10-shot
    # only) for the dataset named by --paper_dataset
    assert table["rows"][0]["paper"] == {"devnet_table5": 0.705}
    assert all(r["paper"] == {} for r in table["rows"][1:])
    for i, cell in enumerate(("general/10shot", "hard_scratch/10shot", "hard_spot/10shot")):
        res = json.loads((out / "devnet" / cell / "results.json").read_text())
        assert res["config"]["data"]["n_anomaly"] == 10 and len(res["runs"]) == 1
        if i:  # one Runner for the table: the train step compiled for the first cell
            assert res["runs"][0]["compile_seconds"] == 0.0
    md = (out / "table.md").read_text()
    assert "| devnet | general | 10 |" in md and "devnet table5 0.705" in md
    # --check with another seed, one cell's started: what each cell would read back and
    # resume (partly done cells read "to run" before)
    (out / "devnet" / "general" / "10shot" / "seed_1" / "checkpoints" / "3").mkdir(
        parents=True)
    seeds = argv.index("--seeds")
    capsys.readouterr()
    assert reproduce.main(argv[:seeds + 1] + ["2"] + argv[seeds + 2:] + ["--check"]) == 0
    said = [line.split(" (", 1)[1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("[")]
    assert said == ["1 of 2 seeds finished; seed 1 resumes from checkpoints step 3)",
                    "1 of 2 seeds finished)", "1 of 2 seeds finished)"], said
    shutil.rmtree(out / "devnet" / "general" / "10shot" / "seed_1")

    # again, with 2-shot cells added and a spent time budget: every finished seed is read
    # back from its metrics.json (a retrained cell would have another wall time), so an
    # interrupted table resumes where it stopped, and no new cell starts
    shots = argv.index("--shots")
    again = argv[:shots + 1] + ["2"] + argv[shots + 1:] + ["--budget_minutes", "0"]
    capsys.readouterr()
    assert reproduce.main(again) == 0
    said = capsys.readouterr().out
    assert re.search(r"^\[2/6\] devnet general 10-shot -> .* \(finished: read back\)$",
                     said, flags=re.M), said
    cut = json.loads((out / "table.json").read_text())
    assert cut["rows"] == table["rows"]
    assert [(c["setting"], c["known_class"], c["shots"]) for c in cut["skipped"]] == [
        ("general", "", 2), ("hard", "scratch", 2), ("hard", "spot", 2)]
    assert not (out / "devnet" / "general" / "2shot").exists()
    assert "Not run (the time budget was spent): devnet general 2-shot; " in (
        out / "table.md").read_text()
    # a --set changed since the cells ran: refused before any cell, --check too (it
    # said "finished" for them, and the run stopped at the first one after the new cells
    # before it had trained; a review's finding)
    changed = [a.replace("steps_per_epoch=5", "steps_per_epoch=6") for a in argv]
    for check in ([], ["--check"]):
        capsys.readouterr()
        assert reproduce.main(changed + check) == 2
        err = capsys.readouterr().err
        assert "devnet general 10-shot: " in err and (
            "holds a run of another config (field steps_per_epoch; in the run: 5); pass those "
            "values with --set to resume or extend this table, or use a new --out") in err


def test_a_table_on_two_hosts(tmp_path, synthetic_root):
    """The table run by two processes joined by jax.distributed (one CPU device each,
    the host flags of fsad.main): a DevNet cell, then an AHL(DevNet) cell that must find
    the DevNet cell finished on both hosts (the first host wrote it; both wait for it
    before the next cell) and start from its trained model (no step of its own; its
    base AUROC is that cell's). The first host alone prints the progress and the table
    and writes the files. (One scale of AlexNet, the trunk that compiles fastest: the
    check is of the table across hosts, and ResNet-18 took it from 23 s to 45 s.)"""
    out = tmp_path / "table"
    argv = [sys.executable, os.path.join(ROOT, "benchmarks", "reproduce.py"), "--dataset",
            "folder", "--methods", "devnet", "ahl_devnet", "--shots", "1", "--seeds", "1",
            "--out", str(out), "--coordinator_address", coordinator_address(),
            "--num_processes", "2",
            *[f"--set={kv}" for kv in (
                f"data.root={synthetic_root}", "data.img_size=64", "data.cache_dir=",
                "model.pretrained=none", "model.backbone=alexnet", "model.n_scales=1",
                "batch_size=8", "epochs=1", "steps_per_epoch=2",
                "explain.enabled=False", "ahl.epochs=2", "ahl.history=2", "ahl.psi_steps=2",
                "ahl.first_order=True")]]
    procs = [subprocess.Popen(argv + ["--process_id", str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, env=cpu_env())
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    first, second = outs[0][0], outs[1][0]
    assert "[1/2] devnet general 1-shot" in first and "| ahl_devnet | general | 1 |" in first
    assert [ln for ln in second.splitlines() if not ln.startswith("[Gloo]")] == []
    table = json.loads((out / "table.json").read_text())
    assert [r["method"] for r in table["rows"]] == ["devnet", "ahl_devnet"]
    ahl = json.loads((out / "ahl_devnet" / "general" / "1shot" / "results.json").read_text())
    assert ahl["config"]["ahl"]["base_workdir"] == str(out / "devnet" / "general" / "1shot")
    assert ahl["runs"][0]["steps"] == 0 and ahl["runs"][0]["resumed_from"] == 2
    assert ahl["runs"][0]["compile_seconds"] == 0.0  # no train step compiled for no step
    assert ahl["versions"]["processes"] == 2
    assert table["rows"][1]["base_mean"] == pytest.approx(table["rows"][0]["mean"], abs=1e-6)


def test_incomplete_host_flags_are_refused_in_one_line(tmp_path, capsys):
    reproduce = load_reproduce()
    assert reproduce.main(["--out", str(tmp_path), "--num_processes", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reproduce: error: a multi-host run given its hosts needs all of "
                          "--coordinator_address") and len(err.splitlines()) == 1
    assert not os.listdir(tmp_path)


def test_a_cell_the_data_cannot_give_stops_the_table_before_any_cell_runs(
        tmp_path, synthetic_root, capsys):
    """The last cell asks 13 shots of scratch, which has 12 anomalies: the three cells
    before it would have trained first. Said from the folder's listing, before any image
    is decoded (the cache stays empty) or any cell's workdir is made."""
    out, cache = tmp_path / "table", tmp_path / "cache"
    argv = ["--dataset", "folder", "--methods", "devnet", "--settings", "general", "hard",
            "--known_classes", "scratch", "--shots", "1", "13", "--seeds", "2",
            "--out", str(out),
            *[f"--set={kv}" for kv in (
                f"data.root={synthetic_root}", f"data.cache_dir={cache}", "data.img_size=64",
                "model.pretrained=none", "model.backbone=alexnet", "model.n_scales=1",
                "batch_size=8", "epochs=1", "steps_per_epoch=2", "explain.enabled=False")]]
    assert load_reproduce().main(argv) == 2
    assert capsys.readouterr().err == (
        "reproduce: error: data.n_anomaly=13 but class 'scratch' has only 12 anomalies; "
        "lower --shots\n")
    assert not cache.exists() and not (out / "devnet").exists()



def test_a_resumed_cell_on_changed_images_stops_the_table_before_any_cell_runs(
        tmp_path, synthetic_root, capsys):
    """The last cell's seed kept a checkpoint of other training images (its split.json
    records them; the folder changed since): the table stops before its first cell,
    from the folder's listing, where it stopped only when that cell's seed started."""
    out, cache = tmp_path / "table", tmp_path / "cache"
    seed_dir = out / "devnet" / "general" / "1shot" / "seed_0"
    (seed_dir / "checkpoints" / "2").mkdir(parents=True)
    (seed_dir / "split.json").write_text(json.dumps(
        {"train_files_sha1": "0" * 40, "train_normal": 7, "train_anomaly": 1}))
    argv = ["--dataset", "folder", "--methods", "devnet", "--settings", "general",
            "--shots", "10", "1", "--seeds", "1", "--out", str(out),
            *[f"--set={kv}" for kv in (
                f"data.root={synthetic_root}", f"data.cache_dir={cache}", "data.img_size=64",
                "model.pretrained=none", "model.backbone=alexnet", "model.n_scales=1",
                "batch_size=8", "epochs=1", "steps_per_epoch=2", "explain.enabled=False")]]
    assert load_reproduce().main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("reproduce: error: the training images of seed 0 differ from "
                          f"those its checkpoints in {seed_dir} were trained on (7 normals "
                          "and 1 seen anomalies then, ") and len(err.splitlines()) == 1, err
    assert not cache.exists() and not (out / "devnet" / "general" / "10shot").exists()

def test_flags_that_would_be_ignored_are_refused(tmp_path, capsys):
    """--known_classes without the hard setting were ignored: the table ran the general
    setting alone."""
    argv = ["--dataset", "synthetic", "--known_classes", "spot", "--out", str(tmp_path)]
    assert load_reproduce().main(argv) == 2
    assert capsys.readouterr().err == (
        "reproduce: error: --known_classes is read only by the hard setting and --settings "
        "is general; add --settings hard (or general hard)\n")
    # a misspelt --paper_dataset left the papers' column empty
    argv = ["--dataset", "synthetic", "--paper_dataset", "elvp", "--out", str(tmp_path)]
    assert load_reproduce().main(argv) == 2
    err = capsys.readouterr().err
    assert "--paper_dataset 'elvp' is not a dataset of the papers' tables; use one of " \
        "aitex, brainmri, elpv," in err and ", or a subset of MVTec AD (carpet, grid, " in err


def test_protocol_order_puts_the_methods_side_by_side():
    reproduce = load_reproduce()
    by_method = reproduce.cells(["devnet", "dra"], ["general", "hard"], [10, 1], ["mono"])
    by_protocol = reproduce.cells(["devnet", "dra"], ["general", "hard"], [10, 1], ["mono"],
                                  order="protocol")
    key = lambda c: (c["method"], c["setting"], c["known_class"], c["shots"])  # noqa: E731
    assert sorted(map(key, by_method)) == sorted(map(key, by_protocol)) and len(by_method) == 8
    assert [key(c) for c in by_protocol[:4]] == [
        ("devnet", "general", "", 10), ("dra", "general", "", 10),
        ("devnet", "general", "", 1), ("dra", "general", "", 1)]
    assert [c["method"] for c in by_method] == ["devnet"] * 4 + ["dra"] * 4


def test_ahl_rows_show_their_base_models_auroc():
    """An AHL cell's row carries the mean AUROC of its base model in the same runs, and
    the hard-setting mean row the mean over known classes; other methods' rows none."""
    reproduce = load_reproduce()
    cell = {"setting": "hard", "shots": 10, "paper": {}, "seconds": 1.0}
    results = [{**cell, "method": "ahl_dra", "known_class": "mono", "auroc": [0.8, 0.6],
                "base_auroc": [0.7, 0.5]},
               {**cell, "method": "ahl_dra", "known_class": "poly", "auroc": [0.9, 0.7],
                "base_auroc": [0.6, 0.6]},
               {**cell, "method": "dra", "known_class": "mono", "auroc": [0.5], "base_auroc": []}]
    rows = reproduce.rows_of(results, "elpv")
    # the mean row right after its cells, not after every method's
    assert [(r["method"], r["setting"]) for r in rows] == [
        ("ahl_dra", "hard (mono known)"), ("ahl_dra", "hard (poly known)"),
        ("ahl_dra", "hard (mean over known classes)"), ("dra", "hard (mono known)")]
    assert [r["base_mean"] for r in rows[:2]] == pytest.approx([0.6, 0.6])
    assert rows[3]["base_mean"] is None
    assert rows[2]["mean"] == pytest.approx(0.75) and rows[2]["base_mean"] == pytest.approx(0.6)
    md = reproduce.markdown({"dataset": "elpv", "init": ["x"], "variants": "", "overrides": [],
                             "rows": rows})
    assert "| ahl_dra | hard (mono known) | 10 | 0.700 ± 0.100 (its base 0.600) |" in md
    assert "| dra | hard (mono known) | 10 | 0.500 | 1 |" in md  # no std of one seed
    assert "population std over seeds" in md and "its wall time is its cells' sum" in md
    one_seed = reproduce.markdown({"dataset": "elpv", "init": ["x"], "variants": "",
                                   "overrides": [], "rows": rows[3:]})
    assert "population std" not in one_seed and "mean row" not in one_seed  # nothing absent
    # ELPV's mean over mono and poly sits beside the papers' mean; one over some of the
    # papers' known classes (a budget spent after 2 of AITEX's 6) beside none, and says so
    assert rows[2]["paper"] == {"ahl_paper": 0.788}
    aitex = [{**r, "method": "ahl_dra", "known_class": k} for r, k in zip(
        results, ("Nep", "Fuzzyball"))]
    (mean,) = [r for r in reproduce.rows_of(aitex, "aitex") if "mean" in r["setting"]]
    assert mean["setting"] == "hard (mean over 2 of the papers' 6 known classes)"
    assert mean["paper"] == {}
    # a note's <placeholder> and a | in a class name, as markdown shows them
    shown = reproduce.markdown({"dataset": "x", "init": ["x"], "variants": "", "overrides": [],
                                "rows": [{**rows[3], "setting": "hard (a|b known)"}],
                                "notes": ["pass --set dra.outlier_root=<a folder>"]})
    assert "hard (a\\|b known)" in shown and "=&lt;a folder&gt;." in shown


def test_devnet_ablations_are_set_beside_table_5_not_devnets_figures():
    """A DevNet cell with another devnet.variant, or DevNet-TPAMI's AlexNet or ResNet-50
    trunk, shows that ablation's Table 5 figure (general 10-shot only), not DevNet's."""
    reproduce = load_reproduce()
    cell = {"method": "devnet", "setting": "general", "shots": 10, "known_class": ""}
    figures = reproduce.reference_auroc_or_empty
    assert figures("elpv", cell) == {"dra_paper": 0.846, "ahl_paper": 0.843}
    # Lite0 (the one pretrained trunk reachable offline) stands in for ResNet-18
    assert figures("elpv", cell, "MIL-DS", "efficientnet_lite0") == figures("elpv", cell)
    assert figures("elpv", cell, "DS", "alexnet") == {"devnet_table5": 0.705}
    assert figures("ELPV", cell, "Rep") == {"devnet_table5": 0.755}
    assert figures("mvtec", cell, "Patch-DS", "efficientnet_lite0") == {"devnet_table5": 0.923}
    assert figures("aitex", cell, "DS", "resnet50") == {"devnet_table5": 0.859}
    for variant, trunk, other in (("MIL-DS", "alexnet", {}), ("DS", "resnet18", {"shots": 1}),
                                  ("Rep", "resnet18", {"setting": "hard"})):
        assert figures("elpv", {**cell, **other}, variant, trunk) == {}, (variant, trunk)
    assert figures("mastcam", cell, "DS") == {}  # not in Table 5
    dra = {**cell, "method": "dra"}  # only DevNet has ablation figures
    assert figures("elpv", dra, "MIL-DS", "alexnet") == {"dra_paper": 0.845, "ahl_paper": 0.843}
    # the hard setting's mean row asks with its cells' variant and trunk
    rows = reproduce.rows_of([{**cell, "setting": "hard", "known_class": k, "auroc": [0.6],
                               "base_auroc": [], "paper": {}, "seconds": 1.0,
                               "variant": "DS", "backbone": "resnet18"}
                              for k in ("mono", "poly")], "elpv")
    assert rows[-1]["setting"] == "hard (mean over known classes)" and rows[-1]["paper"] == {}


def test_an_override_goes_to_the_methods_that_have_the_field():
    from fsad.errors import UserError
    reproduce = load_reproduce()
    configs = reproduce.method_configs(["devnet", "ahl_dra"], "", ["ahl.epochs=2",
                                                                   "batch_size=8"], "synthetic")
    assert configs["ahl_dra"].ahl.epochs == 2 and "ahl" not in configs["devnet"]
    assert configs["devnet"].batch_size == 8 == configs["ahl_dra"].batch_size
    # named with the field it likely meant, of the one method that has it
    with pytest.raises(UserError, match=r"ahl.epoch is not a config field \(did you mean "
                       r"ahl.epochs\?\)"):
        reproduce.method_configs(["devnet", "ahl_dra"], "", ["ahl.epoch=2"], "synthetic")
    with pytest.raises(UserError, match="data.zzz is not a config field; check"):
        reproduce.method_configs(["devnet"], "", ["data.zzz=2"], "synthetic")


def test_dra_on_a_medical_dataset_without_outlier_exposure_is_noted_beside_the_table():
    """The DRA paper took its medical datasets' pseudo anomalies from LAG (outlier
    exposure): a table of DRA or AHL(DRA) there without dra.outlier_root says so, once per
    method, and its markdown carries the note under the figures it differs from."""
    reproduce = load_reproduce()
    base = reproduce.method_configs(["devnet", "dra", "ahl_dra", "ahl_devnet"], "", [],
                                    "synthetic")
    notes = reproduce.protocol_notes(base, "Hyper-Kvasir")
    assert [n.split(":")[0] for n in notes] == ["dra on Hyper-Kvasir", "ahl_dra on Hyper-Kvasir"]
    assert "--set dra.outlier_root=" in notes[0] and "0.844 with LAG" in notes[0]
    assert len(reproduce.protocol_notes(base, "headct")) == 2
    assert reproduce.protocol_notes(base, "elpv") == []  # CutPaste, as the papers
    assert reproduce.protocol_notes(base, "my_scans") == []  # no papers' figures
    for config in base.values():
        if "dra" in config:
            config.dra.outlier_root = "/data/lag"
    assert reproduce.protocol_notes(base, "brainmri") == []
    md = reproduce.markdown({"dataset": "hyperkvasir", "init": ["x"], "variants": "",
                             "overrides": [], "rows": [], "notes": notes[:1]})
    assert md.endswith(f"\nNote: {reproduce.md(notes[0])}.\n") and "=&lt;a folder" in md
    # the dataset of a config without data.subset: a folder's own name, a TFDS name
    # without fsad's prefix (the note was missed on both, a walkthrough's finding)
    from fsad.paper_figures import config_protocol_note, dataset_of
    dra = base["dra"]
    dra.dra.outlier_root = ""
    for fields, name in (({"name": "folder", "root": "/data/hyperkvasir/"}, "hyperkvasir"),
                         ({"name": "tfds", "tfds_name": "fsad_brainmri"}, "brainmri"),
                         ({"name": "elpv"}, "elpv")):
        dra.data.update(fields)
        assert dataset_of(dra) == name
    dra.data.update({"name": "folder", "root": "/data/hyperkvasir/"})
    assert config_protocol_note(dra).startswith("dra on hyperkvasir: the DRA paper took")


def test_ctrl_c_says_what_is_kept_in_one_line(tmp_path, capsys):
    """Ctrl-C (KeyboardInterrupt, here raised where the cells run) ends the table with
    exit status 130 and one line on stderr, not a traceback; it names the checkpoints
    of the cell it stopped in (not a finished seed's)."""
    reproduce = load_reproduce()
    cell = tmp_path / "dra" / "general" / "10shot"

    def interrupted(args, on_cell, on_start):
        if (tmp_path / "table.md").exists():
            on_start(str(cell))
        raise KeyboardInterrupt

    reproduce.run_table = interrupted
    argv = ["--dataset", "synthetic", "--methods", "devnet", "--out", str(tmp_path)]
    assert reproduce.main(argv) == 130
    assert capsys.readouterr().err == (
        "reproduce: interrupted (no cell had finished); run the same command to resume "
        "(finished cells are read back, the unfinished one resumes from its checkpoints)\n")
    (tmp_path / "table.md").write_text("| a row |\n")
    for seed, step in (("seed_0", "40"), ("seed_1", "20")):
        (cell / seed / "checkpoints" / step).mkdir(parents=True)
    (cell / "seed_0" / "metrics.json").write_text("{}")
    assert reproduce.main(argv) == 130
    assert capsys.readouterr().err == (
        f"reproduce: interrupted (the table of the finished cells is {tmp_path / 'table.md'}; "
        f"the cell it stopped in: seed_0 finished; checkpoints kept in {cell}: "
        f"seed_1/checkpoints step 20); run the same command to resume (finished cells are "
        f"read back, the unfinished one resumes from its checkpoints)\n")


def test_errors_give_their_advice_in_this_scripts_flags():
    """fsad's one-line errors name --config.FIELD and variants after the config file; the
    script takes them as --set FIELD=VALUE and --variants, and the fields every cell sets
    (shots, setting, known class, seeds) as its own flags, where a --set is refused."""
    from fsad.errors import UserError
    reproduce = load_reproduce()
    assert reproduce.in_reproduce_terms(
        "lower --config.batch_size (now 48) or --config.data.img_size (now 448); on a CPU the "
        "quick variant (--config FILE:quick) trains at 96 px; pass --config.data.root=/x") == (
        "lower --set batch_size (now 48) or --set data.img_size (now 448); on a CPU the quick "
        "variant (--variants quick) trains at 96 px; pass --set data.root=/x")
    # the fields a cell sets are this script's own flags
    assert reproduce.in_reproduce_terms(
        "set --config.data.known_class to one of mono, poly; lower --config.data.n_anomaly; "
        "use --config.data.setting=general; set --config.num_seeds to 1") == (
        "set --known_classes to one of mono, poly; lower --shots; use --settings general; "
        "set --seeds to 1")
    with pytest.raises(UserError, match="every cell of a table sets data.n_anomaly; pass it "
                                        "as --shots"):
        reproduce.method_configs(["devnet"], "", ["data.n_anomaly=1"], "synthetic")
    # each AHL cell set its own over it, silently (a review's finding)
    with pytest.raises(UserError, match="--set ahl.base_workdir=runs/dra: every AHL cell sets "
                                        "its own"):
        reproduce.method_configs(["ahl_dra"], "", ["ahl.base_workdir=runs/dra"], "synthetic")
    # a value given twice is one cell (it made two rows, and weighed a class twice)
    assert reproduce.cells(["dra", "dra"], ["hard", "hard"], [10, 1, 10], ["a", "b", "a"]) \
        == reproduce.cells(["dra"], ["hard"], [10, 1], ["a", "b"])


def test_the_hard_setting_runs_the_known_classes_the_papers_average_over(capsys):
    """AITEX's and Mastcam's hard means leave out their classes of a few images (a
    10-shot cell on one of those would stop the table); a dataset without such a list
    runs every anomaly class, and --known_classes overrides both."""
    import numpy as np

    class Data:
        classes = np.array(["good", "Broken_end", "Nep", "Knots", "Crease", "Nep", "good"])
        labels = np.array([0, 1, 1, 1, 1, 1, 0])

    pick = load_reproduce().hard_known_classes
    assert pick(None, Data, "AITEX") == ["Broken_end", "Nep"]
    assert "Broken_pick, Cut_selvage, Fuzzyball, Weft_crack are not in the data" in (
        capsys.readouterr().out)
    assert pick(None, Data, "my_fabric") == ["Broken_end", "Crease", "Knots", "Nep"]
    assert pick(["Knots"], Data, "AITEX") == ["Knots"]
