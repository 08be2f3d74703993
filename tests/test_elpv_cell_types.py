"""benchmarks/elpv_cell_types.py on ELPV's real labels, with scores whose answer is known."""

import numpy as np
import pytest

from benchmarks import elpv_cell_types as script

pytest.importorskip("elpv_dataset")


def write_run(folder, file_ids, labels, scores):
    seed_dir = folder / "seed_0"
    seed_dir.mkdir(parents=True)
    np.savez(seed_dir / "test_scores.npz", file_ids=file_ids, labels=labels, score=scores)


def test_cell_type_and_defects_are_told_apart(tmp_path, capsys):
    from fsad.data.elpv import elpv_layout
    _, paths, classes, split = elpv_layout()
    test = split == "test"
    file_ids, labels = paths[test], (classes[test] != "good").astype(np.int8)
    types = script.elpv_types()
    mono = np.array([types[f] == "mono" for f in file_ids], np.float32)
    # a score that is the cell type only: perfect on the normals' type, blind to defects
    write_run(tmp_path / "type", file_ids, labels, mono)
    # a defect detector with a cell-type offset larger than its defect signal, as a
    # hard-setting run trained on mono defects: defective poly cells score below mono normals
    write_run(tmp_path / "both", file_ids, labels, 2.0 * mono + labels)
    rows = {r["run"]: r for r in script.main([str(tmp_path)])}
    assert set(rows) == {"type/seed_0", "both/seed_0"}
    only_type, both = rows["type/seed_0"], rows["both/seed_0"]
    assert only_type["type_auroc"] == 1.0
    assert only_type["within_mono"] == 0.5 and only_type["within_poly"] == 0.5
    assert both["type_auroc"] == 1.0
    assert both["within_mono"] == 1.0 and both["within_poly"] == 1.0
    assert both["auroc"] < 1.0  # defective poly cells (score 1) below mono normals (score 2)
    assert "| both/seed_0 | " in capsys.readouterr().out


def test_a_folder_without_scores_says_what_to_give(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        script.main([str(tmp_path)])
    assert exit_.value.code == 2
    assert "no seed_*/test_scores.npz under" in capsys.readouterr().err


def test_without_the_elpv_package_a_one_line_error(tmp_path, capsys, monkeypatch):
    """The scores are found first; ELPV's labels missing is the package's own message,
    not a traceback (gpu_session's first call has no ELPV wheel yet)."""
    from fsad.data import elpv
    from fsad.errors import UserError

    def missing():
        raise UserError("ELPV needs the elpv-dataset package")
    monkeypatch.setattr(elpv, "elpv_labels", missing)
    write_run(tmp_path / "run", ["a.png", "b.png"], [0, 1], [0.1, 0.9])
    with pytest.raises(SystemExit) as exit_:
        script.main([str(tmp_path)])
    assert exit_.value.code == 2
    assert "error: ELPV needs the elpv-dataset package" in capsys.readouterr().err
