"""Where a train step's time goes: fsad's jitted DevNet or DRA train step traced with the
JAX profiler, its device time split by kind of operation and by part of the step, and
its images/s with parts of the released step switched off (`--ablate`).

Each row (the config as released, then one per `--ablate`) is compiled ahead of time and
timed over `--steps` calls after `--warmup`, with `block_until_ready` before every clock
read, as in benchmarks/throughput.py; it also gives the step's floating-point
operations (its convolutions and matmuls: benchmarks/flop_count.py) and the rate that
makes. An `--ablate` field named xla_... is an option of XLA's compile of that row instead of a
config field (e.g. xla_gpu_autotune_level=0: no timing of candidate GPU kernels), so a
row's compile_s and img/s show what the option saves and costs. The first
row is then traced over `--trace_steps` calls and the trace read back
(`jax.profiler.ProfileData`): each XLA operation's time, matched by name to the compiled
program's HLO, is put under
  * a kind: convolution, matmul, reduction (BatchNorm's statistics, the loss), elementwise
    (the fusions of everything else), gather / scatter, sort / top-k, copy / transpose /
    reverse (the moves of data alone, such as a kernel flipped for a gradient);
  * a part of the step: the batch draw (`sample_batch`: sampling, rotation, DRA's pseudo
    anomalies), the model's modules forward and backward (the trunk by stage), the loss,
    the optimizer update (the named scopes of `fsad.train`, and Flax's module names).
On a GPU the times are the device's (its kernels, each naming its instruction; or a
device plane's "XLA Ops" line where the trace has one); on a CPU they are the threads'
times of each operation, summed over threads, so they may add up to more than the step's
wall time. `--trace_dir` keeps the trace for TensorBoard or Perfetto. On a GPU, XLA runs
much of a step as command buffers (CUDA graphs), whose kernels a trace does not name (41%
of the DevNet step's kernel time on an H100, 2026-12-05): `--trace_xla
xla_gpu_enable_command_buffer=` traces the step compiled again without them (the rows
keep XLA's defaults), so that every kernel is named, at the cost of their launches.

    python benchmarks/profile_step.py --method devnet --img_size 448 --batch 48 \\
        --dtype bfloat16 --ablate model.n_scales=1 augment.rotate_degrees=0 \\
        model.n_scales=1,augment.rotate_degrees=0 --json profile.json
    python benchmarks/profile_step.py --img_size 64 --batch 8 --dtype float32 --steps 2
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import glob
import os
import re
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.throughput import (compile_seconds, config_for, flop_rates,  # noqa: E402
                                   in_flags, markdown_table, mib, model_flops, row_line,
                                   timed, train_setup)
from fsad.config import override  # noqa: E402
from fsad.errors import UserError  # noqa: E402
from fsad.models.backbone import BACKBONES  # noqa: E402
from fsad.workdir import write_json_atomic  # noqa: E402


# ---------------------------------------------------------------------------------------
# The compiled program's operations, from its optimized HLO text

@dataclasses.dataclass(frozen=True)
class HloOp:
    """One instruction of a compiled program: its opcode, the opcodes of the computations
    it calls (a fusion's body), a custom call's target and the JAX op_name it came from."""
    name: str
    opcode: str
    inner: frozenset
    target: str
    op_name: str


_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*[(\s].*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLS = re.compile(r"\bcalls=\{?([^}]*?)\}?(?:,\s*\w+=|$)")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')


def _opcode(rest: str) -> str:
    """The opcode of an instruction's right-hand side "TYPE OPCODE(...)...", where TYPE
    may be a tuple "(f32[2]{0}, s32[])"."""
    i = 0
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        i += 1
    else:
        while i < len(rest) and not rest[i].isspace():
            i += 1
    m = re.match(r"\s*([\w\-]+)\(", rest[i:])
    return m.group(1) if m else ""


def hlo_ops(text: str) -> dict[str, HloOp]:
    """{instruction name: HloOp} for every instruction of an optimized HLO module's text
    (`Compiled.as_text()`); a fusion's `inner` holds the opcodes of its body and of the
    computations that body calls. An instruction without an op_name of its own (fusions
    XLA made) takes its body's (the root's where it has one)."""
    computations: dict[str, list[tuple[str, str, list[str], str, str]]] = {}
    current = None
    for line in text.splitlines():
        if not line.startswith(" "):
            m = _HEADER.match(line)
            current = computations.setdefault(m.group(1), []) if m else None
            continue
        m = _INSTRUCTION.match(line)
        if current is None or not m:
            continue
        root, name, rest = m.groups()
        calls = _CALLS.search(rest)
        called = [c.strip().lstrip("%") for c in calls.group(1).split(",")] if calls else []
        target = _TARGET.search(rest)
        op_name = _OP_NAME.search(rest)
        entry = (name, _opcode(rest), called, target.group(1) if target else "",
                 op_name.group(1) if op_name else "")
        if root:  # the root first
            current.insert(0, entry)
        else:
            current.append(entry)

    def opcodes(comp: str, seen: frozenset = frozenset()) -> set[str]:
        out = set()
        for _, opcode, called, _, _ in computations.get(comp, []):
            out.add(opcode)
            for c in called:
                if c not in seen:
                    out |= opcodes(c, seen | {comp})
        return out

    def body_op_name(comp: str) -> str:
        return next((n for *_, n in computations.get(comp, []) if n), "")

    ops = {}
    for instructions in computations.values():
        for name, opcode, called, target, op_name in instructions:
            inner = frozenset().union(*(opcodes(c) for c in called)) if called else frozenset()
            op_name = op_name or next((n for n in map(body_op_name, called) if n), "")
            ops[name] = HloOp(name, opcode, inner, target, op_name)
    return ops


LAYOUT_OPS = {"copy", "transpose", "bitcast", "parameter", "tuple", "get-tuple-element",
              "reshape", "broadcast", "constant", "slice", "concatenate", "pad", "reverse",
              "iota"}


def op_kind(op: HloOp) -> str:
    """The kind of work an instruction does: a cuDNN convolution is a custom call (or a
    cuDNN fusion) on a GPU and an XLA `convolution` on a CPU, a cuBLAS or Triton gemm a
    custom call or a fusion with a `dot`."""
    ops = op.inner if op.opcode == "fusion" else op.inner | {op.opcode}
    target = op.target.lower()
    if "conv" in target or "convolution" in ops:
        return "convolution"
    if "gemm" in target or "matmul" in target or "dot" in ops:
        return "matmul"
    if "sort" in ops or "topk" in target:
        return "sort / top-k"
    if ops & {"gather", "scatter"}:
        return "gather / scatter"
    if ops & {"reduce", "reduce-window", "select-and-scatter"}:
        return "reduction"
    if ops <= LAYOUT_OPS:
        return "copy / transpose / reverse"
    if op.opcode == "fusion" or ops & {"add", "multiply", "maximum", "select", "convert"}:
        return "elementwise"
    if op.opcode.startswith(("all-", "collective", "reduce-scatter")):
        return "collective"
    return f"other ({op.opcode})"


_TRANSFORM = re.compile(r"^(?:jvp|transpose|vmap|remat|checkpoint)\((.*)\)$")


def _scope(segment: str) -> str:
    """An op_name segment without its transforms ("transpose(jvp(DevNetModel))" ->
    "DevNetModel"); "" for an empty one ("jvp()")."""
    while m := _TRANSFORM.match(segment):
        segment = m.group(1)
    return segment


def op_part(op_name: str) -> tuple[str, str]:
    """(part of the train step, pass) of an instruction from its JAX op_name, e.g.
    "jit(step)/loss_and_grad/transpose(jvp(DevNetModel))/backbone/layer1_0/conv1/conv"
    -> ("backbone/layer1", "backward"). The parts: "sample_batch" and "optimizer"
    (fsad.train's named scopes; pass ""); the model's modules (two levels of Flax names,
    block indices dropped; the model's class name for its own ops, such as the pyramid);
    another named scope within loss_and_grad (fsad.precision's cast_to_compute_dtype);
    "loss" (the rest of loss_and_grad); "other"; "no op_name" (operations XLA made)."""
    if not op_name:
        return "no op_name", ""
    raw = op_name.split(";")[0].split("/")
    backward = any(s.startswith("transpose(") for s in raw)
    segments = [_scope(s) for s in raw]
    for scope in ("sample_batch", "optimizer"):
        if scope in segments:
            return scope, ""
    if "loss_and_grad" not in segments:
        return "other", ""
    direction = "backward" if backward else "forward"
    inner = []  # named scopes and module names, up to the first function called (jit(f))
    for s in segments[segments.index("loss_and_grad") + 1:-1]:
        if "(" in s:
            break
        inner += [s] if s else []
    model = next((i for i, s in enumerate(inner) if s[0].isupper()), None)
    if model is None:
        return (inner[0] if inner else "loss"), direction
    path = inner[model + 1:]
    group = "/".join(re.sub(r"_\d+$", "", p) for p in path[:2]) or inner[model]
    return group, direction


# ---------------------------------------------------------------------------------------
# The trace

def traced_op_times(trace_dir: str, module: str) -> tuple[dict[str, float], str]:
    """op_times(planes, module) of the newest trace under trace_dir."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        raise UserError(f"no *.xplane.pb under {trace_dir}: the profiler wrote no trace")
    planes = list(jax.profiler.ProfileData.from_file(paths[-1]).planes)
    times, source = op_times(planes, module)
    if not times:  # what the trace has, for whoever reads the output
        source += "; its planes and lines: " + "; ".join(
            f"{p.name} [{', '.join(ln.name for ln in list(p.lines)[:8])}]" for p in planes)
    return times, source


def op_times(planes, module: str) -> tuple[dict[str, float], str]:
    """({HLO instruction name: nanoseconds summed over the trace}, where they came from)
    for the program named `module` (its HLO module's name, e.g. "jit_step"), from a
    trace's planes (`ProfileData.planes`: each with .name and .lines, each line with
    .name and .events, each event with .name, .duration_ns and .stats pairs). Taken from
    the first of these that has any: the device planes' "XLA Ops" lines (TPU, and GPU
    traces that have the line), the device planes' kernels (GPU: each kernel names its
    instruction in an `hlo_op` statistic; an instruction's kernels add up), every
    plane's events with an `hlo_op` (CPU: the threads that ran each operation). Events
    of other modules are left out, unless no event names this one."""
    planes = list(planes)
    device = [p for p in planes if p.name.startswith("/device:")]
    sources = (("the device's XLA Ops line",
                [ln for p in device for ln in p.lines if ln.name == "XLA Ops"]),
               ("the device's kernels", [ln for p in device for ln in p.lines]),
               ("the threads' operations", [ln for p in planes for ln in p.lines]))
    for source, lines in sources:
        times: dict[str, float] = collections.defaultdict(float)
        others: dict[str, float] = collections.defaultdict(float)
        for line in lines:
            for event in line.events:
                stats = dict(event.stats)
                name = stats.get("hlo_op") or (event.name if line.name == "XLA Ops" else "")
                name = str(name).lstrip("%")
                if not name or name.startswith("end: "):
                    continue
                name = re.split(r"[\s=]", name, maxsplit=1)[0]
                mod = re.sub(r"\(\d+\)$", "", str(stats.get("hlo_module", module)))
                (times if mod == module else others)[name] += event.duration_ns
        if times:
            return dict(times), source
        if others:  # a backend that names modules otherwise
            return dict(others), f"{source}, of every module (none was named {module})"
    return {}, "no event names an XLA operation"


def breakdown(times: dict[str, float], ops: dict[str, HloOp], steps: int,
              top: int = 15) -> dict:
    """Milliseconds per step by kind, by (part, pass) and for the `top` slowest
    instructions, from traced_op_times' nanoseconds over `steps` steps; `matched` is the
    share of the traced time whose instruction is in the compiled program's HLO."""
    total = sum(times.values())

    def ms(ns: float) -> float:  # per step
        return ns / steps / 1e6

    def share(ns: float) -> float:
        return ns / total if total else 0.0

    by_kind: dict[str, float] = collections.defaultdict(float)
    by_part: dict[tuple, float] = collections.defaultdict(float)
    matched = 0.0
    rows = []
    for name, ns in times.items():
        op = ops.get(name)
        kind, part = (op_kind(op), op_part(op.op_name)) if op else ("unmatched", ("?", ""))
        matched += ns if op else 0.0
        by_kind[kind] += ns
        by_part[part] += ns
        rows.append({"op": name, "kind": kind, "part": part[0], "pass": part[1],
                     "ms": ms(ns), "op_name": op.op_name[:160] if op else ""})
    return {
        "op_ms_per_step": ms(total), "matched": share(matched), "ops": len(times),
        "by_kind": [{"kind": k, "ms": ms(v), "share": share(v)}
                    for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])],
        "by_part": [{"part": p, "pass": s, "ms": ms(v), "share": share(v)}
                    for (p, s), v in sorted(by_part.items(), key=lambda kv: -kv[1])],
        "top_ops": sorted(rows, key=lambda r: -r["ms"])[:top],
    }


def module_name(hlo_text: str) -> str:
    m = re.match(r"HloModule\s+([\w.\-]+)", hlo_text)
    return m.group(1) if m else ""


# ---------------------------------------------------------------------------------------
# The rows

def parse_ablation(text: str) -> list[tuple[str, str]]:
    """"model.n_scales=1,augment.rotate_degrees=0" -> [(field, value), ...]."""
    pairs = []
    for item in text.split(","):
        field, eq, value = item.partition("=")
        if not eq or not field:
            raise UserError(f"--ablate {text!r}: write FIELD=VALUE[,FIELD=VALUE...], e.g. "
                            f"--ablate model.n_scales=1,augment.rotate_degrees=0")
        pairs.append((field.strip(), value.strip()))
    return pairs


FLAG_OF_FIELD = {"data.img_size": "--img_size", "model.backbone": "--backbone",
                 "batch_size": "--batch"}
XLA_OPTION = "xla_"  # an --ablate field named so is an XLA option of the row's compile


def xla_option_value(text: str) -> bool | int | float | str:
    """An XLA option's value as written: true or false, an integer, a float, else text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def check_xla_options(label: str, options: dict) -> None:
    """Refuses options this jaxlib's XLA does not take (a tiny program compiled with them:
    seconds, not a train step's compile)."""
    if options:
        try:
            jax.jit(lambda x: x + 1).lower(1.0).compile(compiler_options=options)
        except Exception as err:  # noqa: BLE001 - XLA's error names the option
            raise UserError(f"{label}: XLA refused the options {options}: "
                            f"{str(err).splitlines()[0]}") from None


def row_configs(args) -> list[tuple[str, object, dict]]:
    """[(label, config, XLA options)] of the rows: the config as released, then one per
    --ablate, each checked by fsad's own rules and XLA's (UserError naming the row).
    Fields that start with "xla_" (e.g. xla_gpu_autotune_level=0) go to XLA's compile
    of the row's step instead of the config."""
    from fsad.validate import check_config
    out = []
    for label in ["as released", *args.ablate]:
        c = config_for(args.method, args, args.batch, args.dtype)
        options = {}
        for field, value in (parse_ablation(label) if label != "as released" else []):
            if field.startswith(XLA_OPTION):
                options[field] = xla_option_value(value)
            else:
                override(c, field, value)
        try:
            check_config(c, len(jax.devices()))
        except UserError as err:
            raise UserError(f"{label}: {in_flags(str(err), FLAG_OF_FIELD)}") from None
        check_xla_options(label, options)
        out.append((label, c, options))
    return out


def trace_options(text: str) -> dict:
    """--trace_xla's options ({} for none), checked as a row's are (UserError)."""
    if not text:
        return {}
    options = {}
    for field, value in parse_ablation(text):
        if not field.startswith(XLA_OPTION):
            raise UserError(f"--trace_xla {text!r}: {field} is not an XLA option (they start "
                            f"with {XLA_OPTION}); a config field goes in --ablate")
        options[field] = xla_option_value(value)
    check_xla_options("--trace_xla", options)
    return options


def traced_breakdown(run, state, compiled, args) -> tuple[dict, object]:
    """(breakdown of `--trace_steps` calls of state = run(state) traced with the JAX
    profiler, the state after them); the trace goes to --trace_dir, or to a temporary
    folder removed after it is read."""
    if getattr(jax.profiler, "ProfileData", None) is None:  # jax 0.7.0: a None shim
        raise UserError(f"jax {jax.__version__} cannot read a trace back (it has no "
                        f"jax.profiler.ProfileData); the rows are timed, the breakdown "
                        f"needs a newer jax")
    text = compiled.as_text()
    with contextlib.ExitStack() as stack:
        trace_dir = args.trace_dir or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="fsad_trace_"))
        t0 = time.perf_counter()
        with jax.profiler.trace(trace_dir):
            state, _ = timed(run, state, args.trace_steps, 0)
        wall = time.perf_counter() - t0
        times, source = traced_op_times(trace_dir, module_name(text))
    out = {"source": source, "traced_steps": args.trace_steps,
           "trace_wall_ms_per_step": wall / args.trace_steps * 1e3,
           **breakdown(times, hlo_ops(text), args.trace_steps, args.top)}
    return ({**out, "trace_dir": trace_dir} if args.trace_dir else out), state


def profile(args, configs, trace_xla: dict | None = None) -> dict:
    """The rows of `configs` (row_configs) and the first row's breakdown, traced as
    compiled with the XLA options `trace_xla` added (trace_options). A trace that
    fails (a GPU without the CUPTI library the profiler needs) is reported in the
    breakdown's place, and the rows go on."""
    rows, result = [], {}

    def save():  # after every row: a run cut short keeps what it measured
        if args.json:
            write_json_atomic(args.json, {"setup": setup_of(args), **result})

    for i, (label, config, options) in enumerate(configs):
        _, tx, mesh, data, state, step, key, _ = train_setup(config, args.n_normal)
        t_compile, compiled = compile_seconds(step, state, data, key, options=options)
        flops = model_flops(config, tx, mesh, state, data, key)  # before it is donated
        run = lambda s: compiled(s, data, key)[0]  # noqa: E731
        per_step, state = timed(run, state, args.steps, args.warmup)
        gflop_per_img, tflop_per_s = flop_rates(flops, args.batch, per_step)
        row = {"variant": label, "compile_s": t_compile, "img_per_s": args.batch / per_step,
               "step_ms": per_step * 1e3, "step_mib": mib(compiled),
               "gflop_per_img": gflop_per_img, "tflop_per_s": tflop_per_s}
        if rows:
            row["over_released"] = row["img_per_s"] / rows[0]["img_per_s"]
        rows.append(row)
        result["rows"] = rows
        print(row_line(row), flush=True)
        save()
        if i == 0 and args.trace_steps:
            try:
                traced = compiled
                if trace_xla:  # the same step compiled again for the trace alone, and
                    traced = compile_seconds(step, state, data, key,  # run once before it
                                             options={**options, **trace_xla})[1]
                    state = jax.block_until_ready(traced(state, data, key)[0])
                result["breakdown"], state = traced_breakdown(
                    lambda s: traced(s, data, key)[0], state, traced, args)
                result["breakdown"]["xla_options"] = trace_xla or {}
            except Exception as err:  # noqa: BLE001 - the rows are still worth having
                result["breakdown_error"] = f"{type(err).__name__}: {err}"[:400]
                print(f"the trace failed: {result['breakdown_error']}", flush=True)
            save()
        state = data = None  # freed before the next row's arrays
    return result


def setup_of(args) -> dict:
    return {"method": args.method, "img_size": args.img_size, "batch": args.batch,
            "dtype": args.dtype, "backbone": args.backbone, "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind), "devices": len(jax.local_devices())}


def tables(result: dict) -> str:
    parts = [markdown_table(result["rows"], ["variant", "img_per_s", "over_released",
                                             "step_ms", "compile_s", "gflop_per_img",
                                             "tflop_per_s", "step_mib"])]
    if "breakdown_error" in result:
        parts.append(f"\nno breakdown: the trace failed ({result['breakdown_error']})")
    b = result.get("breakdown")
    if b:
        parts.append(f"\nthe as-released step traced over {b['traced_steps']} calls: "
                     f"{b['trace_wall_ms_per_step']:.3g} ms per step (wall), "
                     f"{b['op_ms_per_step']:.3g} ms of operations ({b['source']}); "
                     f"{b['matched']:.1%} of it matched to the compiled program's HLO\n")
        parts.append(markdown_table(b["by_kind"], ["kind", "ms", "share"]))
        parts.append("")
        parts.append(markdown_table(b["by_part"], ["part", "pass", "ms", "share"]))
        parts.append("")
        parts.append(markdown_table(b["top_ops"], ["op", "kind", "part", "pass", "ms",
                                                   "op_name"]))
    return "\n".join(parts)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--method", default="devnet", choices=["devnet", "dra"])
    ap.add_argument("--img_size", type=int, default=448, help="image side in pixels")
    ap.add_argument("--batch", type=int, default=48, help="the train step's batch")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="the compute dtype (model.dtype)")
    ap.add_argument("--backbone", default="resnet18", choices=BACKBONES,
                    help="the trunk (model.backbone)")
    ap.add_argument("--ablate", nargs="*", default=[], metavar="FIELD=VALUE[,...]",
                    help="one more row per argument, with these config fields set, e.g. "
                    "model.n_scales=1 (no pyramid) or augment.rotate_degrees=0; a field "
                    "named xla_... is an XLA option of the row's compile, e.g. "
                    "xla_gpu_autotune_level=0")
    ap.add_argument("--steps", type=int, default=20, help="timed steps after the warm-up")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls before the timed")
    ap.add_argument("--trace_steps", type=int, default=5,
                    help="calls of the as-released step to trace (0: no trace)")
    ap.add_argument("--trace_xla", default="", metavar="FIELD=VALUE[,...]",
                    help="XLA options of the traced step's own compile, e.g. "
                    "xla_gpu_enable_command_buffer= (no CUDA graphs: the trace then names "
                    "every kernel); the rows are timed as XLA compiles them by default")
    ap.add_argument("--trace_dir", default="", help="keep the trace here (default: a "
                    "temporary folder)")
    ap.add_argument("--top", type=int, default=15, help="the slowest operations to list")
    ap.add_argument("--n_normal", type=int, default=256,
                    help="device-resident training normals the step samples from")
    ap.add_argument("--json", default="", help="write the rows and the breakdown here")
    ap.add_argument("--check", action="store_true", help="check the flags and every row's "
                    "config, list the rows, then stop: nothing compiles")
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    for flag, least in (("steps", 1), ("warmup", 1), ("trace_steps", 0), ("top", 1),
                        ("n_normal", 1)):
        if getattr(args, flag) < least:
            ap.error(f"--{flag} {getattr(args, flag)}: use {least} or more")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        ap.error(f"--json {args.json}: its folder does not exist; make it first")
    try:
        configs = row_configs(args)
        trace_xla = trace_options(args.trace_xla)
        if trace_xla and not args.trace_steps:
            raise UserError("--trace_xla with --trace_steps 0: there is no trace to compile "
                            "for; drop --trace_xla or trace some steps")
        if args.check:
            for label, c, options in configs:
                xla = f" (XLA {options})" if options else ""
                print(f"{args.method} {label}: batch {c.batch_size}, {c.data.img_size} px, "
                      f"{c.model.dtype}, {c.model.backbone}{xla}")
            if trace_xla:
                print(f"the trace: {configs[0][0]} compiled again with XLA {trace_xla}")
            print("flags and configs checked; nothing compiled or timed (--check)")
            return
        from fsad.compile_cache import disable_compilation_cache
        disable_compilation_cache()  # compile times measured, not read from disk
        result = profile(args, configs, trace_xla)
    except UserError as err:
        ap.error(str(err))
    print(tables(result))


if __name__ == "__main__":
    main()
