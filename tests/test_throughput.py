"""benchmarks/throughput.py's DevNet and AHL meta-step rows at a tiny size, with the
PyTorch ratio where torch is installed. Speeds are not asserted; the count of the step's
operations is. The script runs in its own process, since it turns the persistent
compilation cache off to measure compile times. (The DRA row, about 25 s here, is left
to `benchmarks/gpu_session.sh`: the suite's time is spent where fsad's own functions
are tested.)"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_the_devnet_and_ahl_rows_at_a_tiny_size(tmp_path):
    """DevNet's train and score steps and the AHL meta-step at 64 px, one process."""
    out = tmp_path / "throughput.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"),
           "--methods", "devnet", "ahl", "--img_size", "64", "--batches", "4", "--dtypes",
           "float32", "--n_normal", "8", "--steps", "1", "--warmup", "1",
           "--ahl_normals", "6", "--json", str(out)]
    with_torch = importlib.util.find_spec("torch") is not None
    if with_torch:  # the tasks looped, as the released code, and vmapped, as fsad's
        cmd += ["--torch", "--torch_modes", "eager_fp32", "vmap_fp32", "--torch_threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["devnet", "ahl_meta_step"]
    devnet, row = rows
    assert devnet["device"] == jax.devices()[0].device_kind and devnet["batch"] == 4
    assert devnet["train_img_per_s"] > 0 and devnet["score_img_per_s"] > 0
    # the count of benchmarks/flop_count.py (tests/test_flop_count.py), and its rate
    assert 0.8 < devnet["train_gflop_per_img"] < 1.5, devnet  # 1.09 at 64 px
    assert devnet["train_tflop_per_s"] == pytest.approx(
        devnet["train_gflop_per_img"] * devnet["train_img_per_s"] / 1e3)
    if with_torch:
        assert devnet["torch_eager_fp32_img_per_s"] > 0 and "torch_compile_img_per_s" \
            not in devnet  # the modes asked for, where the step has them
    assert row["tasks"] == 7 and row["train_compile_s"] > 0 and row["train_img_per_s"] > 0
    assert row["train_step_mib"] > 0  # XLA's plan of the meta-step's working memory
    if with_torch:
        speeds = [row["torch_eager_fp32_img_per_s"], row["torch_vmap_fp32_img_per_s"]]
        assert row["fsad_over_best_torch"] == pytest.approx(row["train_img_per_s"] /
                                                            max(speeds)), row
        assert row["torch_threads"] == 1  # as asked, and recorded
    assert "| ahl_meta_step |" in done.stdout  # the printed table


@pytest.mark.parametrize("flags, words", [
    # flags no step of the run reads (before: ignored, or the same AHL row once per batch)
    ("--methods ahl --batches 8 16", "--batches: read only by DevNet's and DRA's steps"),
    ("--methods ahl --dtypes float32 --seeds 2", "--dtypes and --seeds: read only by"),
    ("--methods ahl --host_fed", "--host_fed: read only"),
    ("--methods devnet --ahl_chunk 64", "--ahl_chunk: read only by the AHL meta-step, and "
     "--methods has no ahl"),
    ("--methods dra --ahl_task_batching map", "--ahl_task_batching: read only by the AHL "
     "meta-step"),
    ("--torch_modes compile", "--torch_modes: read only with --torch"),
    ("--torch_threads 1", "--torch_threads: read only with --torch"),
    ("--torch --torch_threads -1", "--torch_threads -1: use 1 or more"),
    ("--compile_only --seeds 2", "--seeds: timings, and --compile_only runs no step"),
    # values no step can run with (before: a ZeroDivisionError after the compile, or a
    # score img/s counted over images the step never had)
    ("--steps 0", "--steps 0: use 1 or more"),
    # the first call compiles PyTorch's compiled mode: it would be timed
    ("--warmup 0", "--warmup 0: use 1 or more"),
    ("--ahl_normals 2", "--ahl_normals 2: use 3 or more"),
    ("--methods devnet --batches 64 --n_normal 32", "--n_normal 32 is fewer than the batch "
     "of 64 that the score step times"),
    ("--json {tmp}/no/rows.json", "its folder does not exist"),
    # fsad's own rules, said in this script's flags
    ("--methods devnet --batches 1", "--batches 1: a batch holds normals and seen anomalies"),
    ("--img_size 16", "--img_size 16 is smaller than the trunk's stride of 32 pixels"),
    ("--backbone alexnet --img_size 64", "raise --img_size to at least 126"),
])
def test_flags_that_would_be_ignored_or_fail_later_are_refused(flags, words, tmp_path,
                                                               capsys, monkeypatch):
    """Refused by argparse (exit 2, one line) before anything compiles: compiling is
    made to fail the test."""
    from benchmarks import throughput
    monkeypatch.setattr(throughput, "compile_seconds",
                        lambda *a: pytest.fail("compiled before the flags were checked"))
    with pytest.raises(SystemExit) as exit_:
        throughput.main(flags.format(tmp=tmp_path).split())
    assert exit_.value.code == 2
    usage, err = capsys.readouterr().err.strip().splitlines()[-2:]
    assert usage.startswith("  ") or usage.startswith("usage"), usage  # argparse's usage
    assert ": error: " in err and words in err, err


def test_torch_flags_are_checked_before_the_run(capsys, monkeypatch):
    from benchmarks import throughput
    monkeypatch.setattr(throughput.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit):
        throughput.main(["--methods", "ahl", "--torch"])
    assert "--torch needs PyTorch, which is not installed" in capsys.readouterr().err
    monkeypatch.undo()
    pytest.importorskip("torch")
    with pytest.raises(SystemExit):
        throughput.main(["--torch", "--torch_modes", "eager_fp32", "fast"])
    assert "--torch_modes fast: not a PyTorch configuration" in capsys.readouterr().err
    # a mode that only the other methods' PyTorch steps have
    for methods, mode in (("devnet", "vmap_fp32"), ("ahl", "compile")):
        with pytest.raises(SystemExit):
            throughput.main(["--methods", methods, "--torch", "--torch_modes", mode])
        assert f"--torch_modes {mode}: no step of --methods {methods} has it in PyTorch" in \
            capsys.readouterr().err


def test_pytorch_modes_are_reported_as_each_finishes(tmp_path):
    """bench_torch hands over its figures after each PyTorch mode (the JSON then keeps
    fsad's row and the modes timed when a time limit stops a slow torch.compile), and
    times the released step on the released batch (DRA: normals, pseudo and seen
    anomalies)."""
    import types
    torch = pytest.importorskip("torch")
    from benchmarks import throughput, torch_released as tr
    args = types.SimpleNamespace(torch_modes=["eager_fp32", "amp_bf16_channels_last"],
                                 img_size=64, steps=1, warmup=1, torch_threads=0)
    seen = []
    out = throughput.bench_torch("dra", args, 6, seen.append)
    assert [sorted(k for k in s if k.endswith("img_per_s")) for s in seen] == [
        ["torch_eager_fp32_img_per_s"],
        ["torch_amp_bf16_channels_last_img_per_s", "torch_eager_fp32_img_per_s"]], seen
    assert seen[-1] == out and all(v > 0 for v in out.values())
    assert out["torch_threads"] == torch.get_num_threads()  # 0: torch's own count
    step, (images, labels, ref) = tr.speed_step("dra", 64, 6, "eager_fp32", "cpu")
    assert labels.tolist() == [0, 0, 2, 2, 1, 1] and ref.shape == (5, 3, 64, 64)
    ratio = throughput.torch_ratio(10.0, out)
    assert ratio["fsad_over_best_torch"] == pytest.approx(
        10.0 / max(v for k, v in out.items() if k.endswith("_img_per_s")))
    assert torch.backends.cudnn.benchmark is False  # set on CUDA only
