"""benchmarks/profile_step.py: the HLO reader and the trace reader on the shapes a GPU
gives (which no CPU run produces), and the whole script on a CPU at a tiny size. Speeds
are not asserted; the count of the step's operations is."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace as NS

import jax
import numpy as np
import pytest

from conftest import ROOT

from benchmarks import profile_step as ps

# jax 0.7.0 (.ci/lowest_versions.txt) traces but cannot read a trace back
READS_TRACES = getattr(jax.profiler, "ProfileData", None) is not None

# the shapes of XLA's GPU output: cuDNN convolutions and cuBLAS gemms as custom calls, a
# Triton gemm as a fusion, fusions without metadata of their own, tuple-typed results
FWD = 'metadata={op_name="jit(step)/loss_and_grad/jvp(DevNetModel)/'
BWD = 'metadata={op_name="jit(step)/loss_and_grad/transpose(jvp(DevNetModel))/'
GPU_HLO = "\n".join([
    "HloModule jit_step, is_scheduled=true, entry_computation_layout={()}",
    "",
    "%fused_reduce (p0: f32[48,64]) -> f32[64] {",
    "  %p0 = f32[48,64]{1,0} parameter(0)",
    "  %c = f32[] constant(0)",
    "  ROOT %r = f32[64]{0} reduce(%p0, %c), dimensions={0}, to_apply=%add, "
    + FWD + 'backbone/bn1/reduce_sum"}',
    "}",
    "",
    "%fused_flip (p0: bf16[3,3,64,64]) -> bf16[3,3,64,64] {",
    "  %p0 = bf16[3,3,64,64]{3,2,1,0} parameter(0)",
    "  %t = bf16[3,3,64,64]{2,3,1,0} transpose(%p0), dimensions={0,1,3,2}",
    "  ROOT %rev = bf16[3,3,64,64]{3,2,1,0} reverse(%t), dimensions={0,1}, "
    + BWD + 'backbone/layer1_0/conv1/rev"}',
    "}",
    "",
    "%triton_gemm (p0: bf16[48,512], p1: bf16[512,1]) -> bf16[48,1] {",
    "  %p0 = bf16[48,512]{1,0} parameter(0)",
    "  %p1 = bf16[512,1]{1,0} parameter(1)",
    "  ROOT %d = bf16[48,1]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, "
    "rhs_contracting_dims={0}",
    "}",
    "",
    "%fused_adam (p0: f32[64], p1: f32[64]) -> f32[64] {",
    "  %p0 = f32[64]{0} parameter(0)",
    "  %p1 = f32[64]{0} parameter(1)",
    "  ROOT %m = f32[64]{0} multiply(%p0, %p1)",
    "}",
    "",
    "ENTRY %main.1 (a: bf16[48,224,224,64], w: bf16[3,3,64,64]) -> f32[64] {",
    "  %a = bf16[48,224,224,64]{3,2,1,0} parameter(0)",
    "  %w = bf16[3,3,64,64]{3,2,1,0} parameter(1)",
    "  %cudnn-conv.1 = (bf16[48,224,224,64]{3,2,1,0}, u8[0]{0}) custom-call(%a, %w), "
    "window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, "
    'custom_call_target="__cudnn$convForward", '
    + FWD + 'backbone/layer1_0/conv1/conv_general_dilated"}',
    "  %cudnn-conv-bw-filter.2 = (bf16[3,3,64,64]{3,2,1,0}, u8[0]{0}) custom-call(%a, %a), "
    'custom_call_target="__cudnn$convBackwardFilter", '
    + BWD + 'backbone/layer1_0/conv1/conv_general_dilated"}',
    "  %cublas-gemm.3 = (f32[48,1]{1,0}, s8[4194304]{0}) custom-call(%a, %w), "
    'custom_call_target="__cublas$lt$matmul", ' + FWD + 'head/conv/dot_general"}',
    "  %gemm_fusion.4 = bf16[48,1]{1,0} fusion(%a, %w), kind=kCustom, calls=%triton_gemm, "
    'backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}',
    "  %input_reduce_fusion = f32[64]{0} fusion(%a), kind=kInput, calls=%fused_reduce",
    "  %flip_fusion = bf16[3,3,64,64]{3,2,1,0} fusion(%w), kind=kLoop, calls=%fused_flip",
    "  %sort.5 = (f32[48]{0}, s32[48]{0}) sort(%a, %a), dimensions={0}, is_stable=true, "
    "to_apply=%cmp, " + FWD + 'head/top_k"}',
    "  ROOT %adam_fusion = f32[64]{0} fusion(%a, %a), kind=kLoop, calls=%fused_adam, "
    'metadata={op_name="jit(step)/optimizer/mul"}',
    "}",
])


def test_the_hlo_reader_names_each_kind_and_part_of_gpu_style_output():
    ops = ps.hlo_ops(GPU_HLO)
    assert ps.module_name(GPU_HLO) == "jit_step"
    kinds = {name: ps.op_kind(op) for name, op in ops.items() if name in {
        "cudnn-conv.1", "cudnn-conv-bw-filter.2", "cublas-gemm.3", "gemm_fusion.4",
        "input_reduce_fusion", "flip_fusion", "sort.5", "adam_fusion"}}
    assert kinds == {"cudnn-conv.1": "convolution", "cudnn-conv-bw-filter.2": "convolution",
                     "cublas-gemm.3": "matmul", "gemm_fusion.4": "matmul",
                     "input_reduce_fusion": "reduction",
                     "flip_fusion": "copy / transpose / reverse", "sort.5": "sort / top-k",
                     "adam_fusion": "elementwise"}
    # fusions without an op_name of their own take their body's (the root's)
    assert ps.op_part(ops["input_reduce_fusion"].op_name) == ("backbone/bn1", "forward")
    assert ps.op_part(ops["flip_fusion"].op_name) == ("backbone/layer1", "backward")
    assert ps.op_part(ops["gemm_fusion.4"].op_name) == ("no op_name", "")
    assert ps.op_part(ops["cudnn-conv-bw-filter.2"].op_name) == ("backbone/layer1",
                                                                 "backward")
    assert ps.op_part(ops["adam_fusion"].op_name) == ("optimizer", "")
    assert ps.op_part("jit(step)/loss_and_grad/jvp(cast_to_compute_dtype)/convert") == \
        ("cast_to_compute_dtype", "forward")
    assert ps.op_part("jit(step)/loss_and_grad/jvp(DevNetModel)/resize") == \
        ("DevNetModel", "forward")
    # what a function called in the loss names (the prior's draw) is the loss's
    assert ps.op_part("jit(step)/loss_and_grad/jvp(jit(_normal))/jit(_uniform)/while/body/"
                      "add") == ("loss", "forward")
    assert ps.op_part("jit(step)/transpose(loss_and_grad)/jvp(DevNetModel)/backbone/layer3_0/"
                      "jit(relu)/max") == ("backbone/layer3", "backward")


def _event(name, ns, **stats):
    return NS(name=name, duration_ns=ns, stats=list(stats.items()))


def test_the_trace_reader_takes_the_device_s_times_of_the_step_s_module():
    host = NS(name="/host:CPU", lines=[NS(name="python", events=[
        _event("launch", 5.0, hlo_op="cudnn-conv.1", hlo_module="jit_step")])])
    gpu = NS(name="/device:GPU:0", lines=[
        NS(name="Stream #13(Compute)", events=[
            _event("sm90_xmma_fprop", 100.0, hlo_op="cudnn-conv.1", hlo_module="jit_step"),
            _event("sm90_xmma_fprop_2", 50.0, hlo_op="cudnn-conv.1", hlo_module="jit_step"),
            _event("loop_multiply", 7.0, hlo_op="adam_fusion", hlo_module="jit_step(42)"),
            _event("other_program", 999.0, hlo_op="fusion.9", hlo_module="jit_score")]),
        NS(name="Stream #14(MemcpyH2D)", events=[_event("memcpy", 3.0)])])
    times, source = ps.op_times([host, gpu], "jit_step")
    # the host's launch and the other program's kernel are not the step's device time;
    # an instruction's kernels add up
    assert times == {"cudnn-conv.1": 150.0, "adam_fusion": 7.0}
    assert source == "the device's kernels"
    gpu.lines.append(NS(name="XLA Ops", events=[_event("%cudnn-conv.1 = custom-call()", 140.0),
                                                _event("adam_fusion", 6.0)]))
    times, source = ps.op_times([host, gpu], "jit_step")
    assert times == {"cudnn-conv.1": 140.0, "adam_fusion": 6.0}
    assert source == "the device's XLA Ops line"
    # a CPU trace: no device plane; the threads' events that name an operation
    times, source = ps.op_times([host], "jit_step")
    assert times == {"cudnn-conv.1": 5.0} and source == "the threads' operations"

    b = ps.breakdown({"cudnn-conv.1": 3e6, "adam_fusion": 1e6, "mystery.7": 1e6},
                     ps.hlo_ops(GPU_HLO), steps=2, top=2)
    assert b["op_ms_per_step"] == pytest.approx(2.5) and b["matched"] == pytest.approx(0.8)
    assert [(k["kind"], k["ms"]) for k in b["by_kind"]] == [
        ("convolution", 1.5), ("elementwise", 0.5), ("unmatched", 0.5)]
    assert [r["op"] for r in b["top_ops"]] == ["cudnn-conv.1", "adam_fusion"]


def test_a_failed_trace_keeps_the_rows(tmp_path, monkeypatch):
    """A trace that fails (no CUPTI on a GPU) is reported where the breakdown would be,
    and every row is still timed and written; a trace that works is read back from a
    temporary folder that is then removed. A small jitted step stands in for the
    train step (the DevNet step runs in the next test)."""
    import tempfile

    import jax
    import jax.numpy as jnp
    step = jax.jit(lambda s, d, k: (jnp.tanh(s @ d) + s, {}))
    state, data = jnp.ones((64, 64)), jnp.eye(64) * 0.5
    monkeypatch.setattr(ps, "train_setup", lambda config, n: (None, None, None, data,
                                                               state, step, None, None))
    monkeypatch.setattr(ps, "model_flops", lambda *a: None)  # no config to count from
    args = ps.parser().parse_args(["--batch", "8", "--steps", "2", "--warmup", "1",
                                   "--trace_steps", "2", "--json", str(tmp_path / "p.json")])
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where the trace goes
    result = ps.profile(args, [("as released", None, {}),
                                 ("other", None, {"xla_gpu_autotune_level": 0})])
    if READS_TRACES:
        b = result["breakdown"]
        assert b["source"] == "the threads' operations" and b["matched"] > 0.99, b
        assert {k["kind"] for k in b["by_kind"]} >= {"matmul"}
    else:  # said in the breakdown's place, before anything was traced
        assert "cannot read a trace back" in result["breakdown_error"], result
    assert os.listdir(temp) == []  # the trace was removed

    def no_cupti(folder):
        raise RuntimeError("CUPTI could not be loaded")
    monkeypatch.setattr(ps.jax.profiler, "trace", no_cupti)
    if not READS_TRACES:  # a reader to be found, so that the trace itself is what fails
        monkeypatch.setattr(ps.jax.profiler, "ProfileData", object())
    result = ps.profile(args, [("as released", None, {}),
                                 ("other", None, {"xla_gpu_autotune_level": 0})])
    assert [r["variant"] for r in result["rows"]] == ["as released", "other"]
    assert "breakdown" not in result
    assert result["breakdown_error"] == "RuntimeError: CUPTI could not be loaded"
    assert json.loads((tmp_path / "p.json").read_text())["rows"][1]["variant"] == "other"
    assert "no breakdown: the trace failed (RuntimeError: CUPTI" in ps.tables(result)


@pytest.mark.slow
def test_the_devnet_step_profiled_on_a_cpu(tmp_path):
    """The released DevNet step and the same without the pyramid, at 64 px: the pyramid's
    half-size scale adds a quarter of the full scale's operations, which the count of
    the two programs shows; the trace's operations are all found in the program."""
    out = tmp_path / "profile.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "profile_step.py"),
           "--img_size", "64", "--batch", "4", "--dtype", "float32", "--steps", "1",
           "--warmup", "1", "--trace_steps", "1", "--n_normal", "8",
           "--ablate", "model.n_scales=1", "--json", str(out),
           "--trace_xla", "xla_gpu_enable_command_buffer="]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    released, one_scale = result["rows"]
    assert (released["variant"], one_scale["variant"]) == ("as released", "model.n_scales=1")
    assert released["img_per_s"] > 0 and one_scale["over_released"] > 0
    assert 1.15 < released["gflop_per_img"] / one_scale["gflop_per_img"] < 1.35, result["rows"]
    if not READS_TRACES:
        assert "cannot read a trace back" in result["breakdown_error"], result
        return
    b = result["breakdown"]
    assert b["source"] == "the threads' operations" and b["matched"] > 0.99, b["source"]
    assert b["xla_options"] == {"xla_gpu_enable_command_buffer": ""}  # traced as compiled
    parts = {(p["part"], p["pass"]) for p in b["by_part"]}
    assert {("sample_batch", ""), ("optimizer", ""), ("backbone/layer1", "forward"),
            ("backbone/layer4", "backward"), ("head/conv", "backward")} <= parts, parts
    assert sum(k["ms"] for k in b["by_kind"]) == pytest.approx(b["op_ms_per_step"])
    assert "| as released |" in done.stdout and "| kind | ms | share |" in done.stdout


@pytest.mark.parametrize("flags, words", [
    ("--ablate model.n_scale=1", "model.n_scale is not a config field (did you mean "
     "model.n_scales?)"),
    ("--ablate rotate", "--ablate 'rotate': write FIELD=VALUE"),
    ("--ablate model.n_scales=two", "model.n_scales='two' is not a int"),
    ("--img_size 16", "as released: --img_size 16 is smaller than the trunk's stride"),
    ("--batch 1", "as released: --batch 1: a batch holds normals and seen anomalies"),
    ("--steps 0", "--steps 0: use 1 or more"),
    ("--ablate xla_no_such_option=1", "xla_no_such_option=1: XLA refused the options "
     "{'xla_no_such_option': 1}"),
    ("--json {tmp}/no/p.json", "its folder does not exist"),
    ("--trace_xla model.n_scales=1", "--trace_xla 'model.n_scales=1': model.n_scales is "
     "not an XLA option"),
    ("--trace_xla xla_no_such_option=1", "--trace_xla: XLA refused the options"),
    ("--trace_xla xla_gpu_autotune_level=0 --trace_steps 0", "--trace_xla with "
     "--trace_steps 0: there is no trace"),
])
def test_bad_flags_are_refused_before_anything_compiles(flags, words, tmp_path, capsys,
                                                        monkeypatch):
    monkeypatch.setattr(ps, "compile_seconds",
                        lambda *a: pytest.fail("compiled before the flags were checked"))
    with pytest.raises(SystemExit) as exit_:
        ps.main(flags.format(tmp=tmp_path).split())
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in err and words in err, err


def test_check_lists_the_rows(capsys, monkeypatch):
    monkeypatch.setattr(ps, "compile_seconds",
                        lambda *a: pytest.fail("--check compiled"))
    ps.main(["--img_size", "64", "--batch", "8", "--check", "--ablate",
             "augment.rotate_degrees=0", "model.n_scales=1,augment.rotate_degrees=0",
             "model.backbone=efficientnet_lite0,xla_gpu_autotune_level=0"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == ["devnet as released: batch 8, 64 px, bfloat16, resnet18",
                     "devnet augment.rotate_degrees=0: batch 8, 64 px, bfloat16, resnet18",
                     "devnet model.n_scales=1,augment.rotate_degrees=0: batch 8, 64 px, "
                     "bfloat16, resnet18",
                     "devnet model.backbone=efficientnet_lite0,xla_gpu_autotune_level=0: "
                     "batch 8, 64 px, bfloat16, efficientnet_lite0 (XLA "
                     "{'xla_gpu_autotune_level': 0})",
                     "flags and configs checked; nothing compiled or timed (--check)"]


@pytest.mark.parametrize("text, value", [("0", 0), ("true", True), ("False", False),
                                         ("0.5", 0.5), ("fast", "fast")])
def test_xla_option_values_are_typed(text, value):
    got = ps.xla_option_value(text)
    assert got == value and type(got) is type(value)


def test_a_rows_xla_options_reach_its_compile():
    """compile_seconds hands the row's options to XLA: a name XLA does not know fails
    the compile, and a known one compiles (its number is this program's)."""
    import jax.numpy as jnp
    step = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jnp.ones((4, 4))
    with pytest.raises(Exception, match="xla_no_such_option"):
        ps.compile_seconds(step, x, options={"xla_no_such_option": 1})
    seconds, compiled = ps.compile_seconds(step, x, options={"xla_gpu_autotune_level": 0})
    assert seconds > 0 and float(compiled(x)[0, 0]) == pytest.approx(4 * np.sin(1.0))
