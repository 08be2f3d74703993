"""Compile time and steady-state throughput of fsad's jitted steps, beside PyTorch.

For each method (DevNet, DRA and the AHL meta-step), batch size and compute dtype,
one run measures:
  * the train step's compile time (ahead of time, apart from the steps) and its
    images/s once warm (device-resident data, batch sampled inside the step), with
    its floating-point operations per image (its convolutions and matmuls, counted from
    its jaxpr alike on every backend: benchmarks/flop_count.py) and the rate that makes
    (DevNet and DRA);
  * the inference (scoring) step's compile time and images/s;
  * each program's working memory per device, as XLA planned it when compiling
    (`fsad.memory.program_bytes`: its temporaries and the outputs that do not reuse a
    donated argument; the state and the data it reads are not counted), in MiB; for the
    PyTorch steps on a GPU, the peak of allocated memory during a step above what was
    allocated before it (the model, its gradients and Adam's state, and the batch);
  * with --host_fed, the conventional host-sampled step, for the ratio;
  * with --seeds N, N seeds trained as one vmapped program against N separate steps;
  * the AHL meta-step with its tasks spread over every local device and, where there
    are several, the same step on one device, for the ratio;
  * with --torch (PyTorch installed), PyTorch versions of the released steps
    (benchmarks/torch_released.py: eager float32, AMP bf16 + channels_last, and
    torch.compile; for the AHL meta-step, whose released code cannot run, a torch.func
    version of the same second-order step on DRA's heads, eager float32, with its tasks
    one after another as the released loop and vmapped as fsad's), and fsad's ratio to
    the fastest of them. (fsad's meta-step also scores the importance pool
    under the T adapted heads, which the torch step leaves out.)
Warm-up calls are excluded and every clock read follows block_until_ready (or
torch.cuda.synchronize). Prints a table; --json writes the rows. --compile_only
compiles every step and reports its compile time and memory without running it. Flags
that no step of the run would read, and values no step could run with, are refused
before anything compiles (`check_args`); --check stops there and lists the rows.

    python benchmarks/throughput.py --img_size 448 --batches 48 --dtypes bfloat16 float32 --torch
    python benchmarks/throughput.py --methods devnet dra ahl --img_size 96 --batches 16 --steps 5
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.flop_count import step_flops  # noqa: E402
from fsad.buckets import ROWS_BUCKET, pad_to  # noqa: E402
from fsad.config import override  # noqa: E402
from fsad.memory import is_out_of_memory, oom_words, program_bytes  # noqa: E402
from fsad.mesh import batch_sharded, make_mesh, one_device_mesh, replicated  # noqa: E402
from fsad.methods import ahl, build_method  # noqa: E402
from fsad.models.backbone import BACKBONES, trunk_map_shape  # noqa: E402
from fsad.optim import optimizer_from_config  # noqa: E402
from fsad.train import (init_state, make_host_fed_step, make_score_fn,  # noqa: E402
                        make_train_step, put_train_data)
from fsad.workdir import write_json_atomic  # noqa: E402

CONFIGS = {"devnet": "configs.devnet", "dra": "configs.dra", "ahl": "configs.ahl_dra"}


def config_for(method: str, args, batch: int, dtype: str):
    c = importlib.import_module(CONFIGS[method]).get_config()
    c.batch_size = batch
    c.eval_batch_size = batch
    c.data.img_size = args.img_size
    c.model.backbone = args.backbone
    c.model.dtype = dtype
    c.model.pretrained = "none"
    return c


def timed(fn, state, steps: int, warmup: int) -> tuple[float, object]:
    """(seconds per call of state = fn(state) after warm-up calls, the final state): the
    state is threaded through, as donated buffers must be."""
    for _ in range(warmup):
        state = fn(state)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state = fn(state)
    jax.block_until_ready(state)
    return (time.perf_counter() - t0) / steps, state


def compile_seconds(jitted, *args, options: dict | None = None) -> tuple[float, object]:
    """(seconds to lower and compile `jitted` for `args`, with XLA `options`; the
    executable)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile(compiler_options=options or None)
    return time.perf_counter() - t0, compiled


def mib(compiled) -> float | None:
    """A compiled program's working memory per device in MiB (None: the backend does not
    say)."""
    n = program_bytes(compiled)
    return None if n is None else n / 2**20


def flop_rates(flops: float | None, batch: int, seconds: float
               ) -> tuple[float | None, float | None]:
    """(GFLOP per image, TFLOP/s) of one call of `flops` operations on `batch` images that
    took `seconds` (benchmarks/flop_count.py's count); (None, None) without a count."""
    return (flops / batch / 1e9, flops / seconds / 1e12) if flops else (None, None)


def model_flops(config, tx, mesh, state, data, key) -> float | None:
    """`flop_count.step_flops` of the config's train step with its trunk's convs routed as
    the plain model has them (model.depthwise_conv=grouped, model.stem=conv), so that a
    route does not change the count (benchmarks/flop_count.py); the parameters, and so
    `state`, are the same for every route. Traced, not compiled."""
    plain = copy.deepcopy(config)
    override(plain, "model.depthwise_conv", "grouped")
    override(plain, "model.stem", "conv")
    step = make_train_step(build_method(plain), tx, mesh, config.batch_size)
    return step_flops(step, state, data, key)


def train_setup(config, n_normal: int):
    """What timing a config's train step needs, on random uint8 images of the config's
    size (n_normal normals and 10 anomalies, device-resident): (method, tx, mesh, data,
    state, step, key, normal [n_normal, H, W, 3]); `step` is the jitted train step at the
    config's batch size, not yet compiled."""
    method = build_method(config)
    mesh = make_mesh()
    tx = method.optimizer(config.steps_per_epoch)
    rng = np.random.default_rng(0)
    shape = (config.data.img_size, config.data.img_size, 3)
    normal = rng.integers(0, 256, (n_normal, *shape), dtype=np.uint8)
    anomaly = rng.integers(0, 256, (10, *shape), dtype=np.uint8)
    data = put_train_data(normal, anomaly, mesh, bucket=ROWS_BUCKET)
    key = jax.random.key(0)
    state = init_state(method, key, data, tx, mesh)
    step = make_train_step(method, tx, mesh, config.batch_size)
    return method, tx, mesh, data, state, step, key, normal


def bench_train_and_score(method_name: str, args, batch: int, dtype: str,
                          torch_rows: dict, publish=lambda row: None) -> dict:
    """fsad's train and score steps of one method, batch and dtype (and with --torch,
    PyTorch's released step). publish(row) is called with the row as it stands once
    fsad's figures are in and after each PyTorch mode, so that a run cut short while
    PyTorch compiles keeps them."""
    config = config_for(method_name, args, batch, dtype)
    method, tx, mesh, data, state, step, key, normal = train_setup(config, args.n_normal)
    t_compile, compiled = compile_seconds(step, state, data, key)
    flops = model_flops(config, tx, mesh, state, data, key)  # before the state is donated
    per_step = float("nan")  # --compile_only: nothing runs, img/s nan
    if not args.compile_only:
        per_step, state = timed(lambda s: compiled(s, data, key)[0], state, args.steps,
                                args.warmup)
    gflop_per_img, tflop_per_s = flop_rates(flops, batch, per_step)
    row = {"method": method_name, "batch": batch, "dtype": dtype,
           "train_compile_s": t_compile, "train_img_per_s": batch / per_step,
           "train_step_mib": mib(compiled), "train_gflop_per_img": gflop_per_img,
           "train_tflop_per_s": tflop_per_s}

    variables = method.prepare_eval({"params": state.params, "batch_stats": state.batch_stats,
                                     "extras": state.extras})
    score = make_score_fn(method, mesh)
    images = jax.device_put(normal[:batch], batch_sharded(mesh))
    if method.random_scores:
        variables = {**variables, "key": key}
    t_compile, compiled_score = compile_seconds(score, variables, images)
    per_batch = float("nan")
    if not args.compile_only:
        per_batch, _ = timed(lambda vo: (vo[0], compiled_score(vo[0], images)),
                             (variables, None), args.steps, args.warmup)
    row.update(score_compile_s=t_compile, score_img_per_s=batch / per_batch,
               score_step_mib=mib(compiled_score))

    if args.host_fed:
        host = make_host_fed_step(method, tx, mesh)
        batch_dev = jax.device_put(method.sample_batch(data, key, batch, 0), batch_sharded(mesh))

        def host_run(s):
            b = jax.device_put(jax.device_get(batch_dev), batch_sharded(mesh))  # a host copy
            return host(s, b, key)[0]
        state = init_state(method, key, data, tx, mesh)
        row["host_fed_img_per_s"] = batch / timed(host_run, state, args.steps,
                                                  args.warmup)[0]
        row["speedup_vs_host_fed"] = row["train_img_per_s"] / row["host_fed_img_per_s"]

    if args.seeds > 1:
        row.update(bench_seeds(method, tx, mesh, data, batch, args))
    if args.torch and method_name in ("devnet", "dra"):
        def measure(on_mode) -> dict:  # once per method and batch, for every dtype's row
            if (method_name, batch) not in torch_rows:
                torch_rows[method_name, batch] = bench_torch(method_name, args, batch, on_mode)
            return torch_rows[method_name, batch]
        add_torch_figures(row, publish, measure)
    return row


def add_torch_figures(row: dict, publish, measure) -> None:
    """Adds to row PyTorch's figures, measure(on_mode), and fsad's ratio to the fastest
    PyTorch mode, publishing the row (partial) before them and after each mode that
    measure hands to on_mode, so that a run cut short keeps what it timed."""
    publish(row)

    def publish_with(figures: dict) -> None:  # PyTorch's modes timed so far
        publish({**row, **torch_ratio(row["train_img_per_s"], figures)})
    row.update(torch_ratio(row["train_img_per_s"], measure(publish_with)))


def torch_ratio(fsad_img_per_s: float, figures: dict) -> dict:
    """PyTorch's figures and fsad's ratio to the fastest of its modes among them."""
    out = dict(figures)
    speeds = [v for k, v in out.items() if k.endswith("_img_per_s")]
    if speeds:
        out["fsad_over_best_torch"] = fsad_img_per_s / max(speeds)
    return out


def bench_seeds(method, tx, mesh, data, batch, args) -> dict:
    """N seeds: one vmapped train step over stacked states against N separate steps."""
    n = args.seeds
    keys = jax.random.split(jax.random.key(1), n)
    states = [init_state(method, k, data, tx, mesh) for k in keys]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *states)
    step = make_train_step(method, tx, mesh, batch)
    sequential, _ = timed(lambda ss: [step(s, data, k)[0] for s, k in zip(ss, keys)], states,
                          args.steps, args.warmup)
    vstep = jax.jit(jax.vmap(lambda s, k: step(s, data, k)[0]))
    t_compile, compiled = compile_seconds(vstep, stacked, keys)
    vmapped, _ = timed(lambda s: compiled(s, keys), stacked, args.steps, args.warmup)
    return {"seeds": n, "seeds_sequential_img_per_s": n * batch / sequential,
            "seeds_vmapped_img_per_s": n * batch / vmapped,
            "seeds_vmapped_compile_s": t_compile, "seeds_vmapped_step_mib": mib(compiled),
            "vmapped_over_sequential": sequential / vmapped}


def bench_ahl(args, batch: int, dtype: str, publish=lambda row: None) -> dict:
    """AHL's meta-step (DRA heads, T = 7 tasks, second order) on random bank features of
    the trunk's map size; img/s counts the support and query samples it adapts on. The
    tasks are spread over every device (`make_mesh()`); with several, the row also has
    the same step on the first device alone and the ratio. The row times the first of
    --ahl_task_batching (`ahl.task_batching`: a device's tasks vmapped or one after
    another); each one's figures are in tasks_<vmap|map>_img_per_s and _compile_s, and
    with both, tasks_vmap_over_map."""
    config = config_for("ahl", args, batch, dtype)
    shapes = [trunk_map_shape(args.backbone, size)
              for size in (args.img_size, args.img_size // 2)]  # the pyramid's two scales
    nn_, na = args.ahl_normals, 10
    rng = np.random.default_rng(0)
    bank = [jnp.asarray(rng.normal(size=(nn_ + na + 3 * nn_, *shape)), jnp.float32)
            for shape in shapes]
    ref_means = [b[:5].mean(0) for b in bank]
    # the heads alone (the trunk is not in the meta-step): no ResNet init to compile
    heads = jax.jit(ahl.dra_heads(config).init)(jax.random.key(0), [b[:2] for b in bank],
                                                 ref_means)
    hm, params = ahl.head_model(config, {"params": {"heads": heads["params"]},
                                         "batch_stats": {"heads": heads["batch_stats"]}},
                                ref_means)
    clusters = np.array_split(np.arange(nn_), 3)
    tasks = ahl.build_tasks(clusters, nn_, na, seed=0, base="dra")
    # the bank, task sets and pool padded as a run pads them (`run_meta_training`)
    padded_bank = [pad_to(f, tasks.padded_bank_rows(ROWS_BUCKET)) for f in bank]
    tx = optimizer_from_config(config.ahl.optim, 1)
    w = jnp.full((tasks.num_tasks,), 1 / tasks.num_tasks)
    key = jax.random.key(0)

    def time_on(mesh, batching: str) -> tuple[float, float, float | None]:
        """(compile seconds, seconds per step, working MiB per device) with the tasks
        spread over `mesh`, each device's computed as `batching` says."""
        step, _, _ = ahl.make_meta_step(hm, tx, config.ahl.inner_steps,
                                        config.ahl.inner_lr, False, mesh, args.ahl_chunk,
                                        batching)
        p, o, b, arrays, ww, pool, consts = jax.device_put(
            (params, tx.init(params), padded_bank, tasks.device_arrays(ROWS_BUCKET), w,
             tasks.padded_pool_idx(ROWS_BUCKET), hm.consts), replicated(mesh))
        t_compile, compiled = compile_seconds(step.jitted, p, o, b, arrays, ww, pool, key,
                                              consts)
        if args.compile_only:
            return t_compile, float("nan"), mib(compiled)
        per, _ = timed(lambda po: compiled(po[0], po[1], b, arrays, ww, pool, key,
                                           consts)[:2], (p, o), args.steps, args.warmup)
        return t_compile, per, mib(compiled)

    mesh = make_mesh()
    batchings = args.ahl_task_batching
    samples = int(tasks.support_mask.sum() + tasks.query_mask.sum())
    timings = {}
    for b in batchings:
        timings[b] = time_on(mesh, b)
    t_compile, per, step_mib = timings[batchings[0]]
    row = {"method": "ahl_meta_step", "batch": samples, "dtype": "float32",
           "train_compile_s": t_compile, "train_img_per_s": samples / per,
           "train_step_mib": step_mib, "meta_steps_per_s": 1 / per, "tasks": tasks.num_tasks,
           "chunk": args.ahl_chunk, "task_batching": batchings[0]}
    if len(batchings) > 1:
        for b, (t_b, per_b, mib_b) in timings.items():
            row.update({f"tasks_{b}_img_per_s": samples / per_b, f"tasks_{b}_compile_s": t_b,
                        f"tasks_{b}_step_mib": mib_b})
        row["tasks_vmap_over_map"] = timings["map"][1] / timings["vmap"][1]
    if mesh.size > 1:  # the tasks spread over the devices against the same step on one
        row["one_device_meta_steps_per_s"] = 1 / time_on(one_device_mesh(), batchings[0])[1]
        row["meta_step_over_one_device"] = row["meta_steps_per_s"] / \
            row["one_device_meta_steps_per_s"]
    if args.torch:
        add_torch_figures(row, publish, lambda on_mode: bench_torch_ahl(
            args, tasks, [b.shape[1] for b in bank], bank[0].shape[-1], bank[0].shape[0],
            on_mode))
    return row


def bench_torch(kind: str, args, batch: int, on_mode=lambda out: None) -> dict:
    """PyTorch's released step in each of its modes in args.torch_modes
    (`torch_released.speed_step`: cuDNN's autotuning and fused Adam on a GPU, the released
    batch composition); on_mode(figures so far) after each mode."""
    return time_torch_modes(torch_modes_of(kind, args.torch_modes), lambda tr, mode, device: (
        *tr.speed_step(kind, args.img_size, batch, mode, device), batch), args, on_mode)


def bench_torch_ahl(args, tasks, maps: list[int], channels: int, bank_rows: int,
                    on_mode=lambda out: None) -> dict:
    """PyTorch's version of the same meta-step (benchmarks/torch_released.py
    `ahl_meta_step_for_benchmark`: DRA's heads, torch.func, second order, eager float32)
    on bank features of the same shapes, with the same task count and samples per task,
    in each of its modes in args.torch_modes (the tasks looped, eager_fp32, or vmapped,
    vmap_fp32); on_mode(figures so far) after each mode."""
    support = round(float(tasks.support_mask.sum()) / tasks.num_tasks)
    query = round(float(tasks.query_mask.sum()) / tasks.num_tasks)
    return time_torch_modes(torch_modes_of("ahl", args.torch_modes), lambda tr, mode, device:
                            tr.ahl_meta_step_for_benchmark(
                                channels, maps, tasks.num_tasks, support, query, base="dra",
                                bank_rows=bank_rows, device=device,
                                vmap_tasks=tr.AHL_MODES[mode]), args, on_mode)


def time_torch_modes(modes: list[str], make, args, on_mode=lambda out: None) -> dict:
    """{torch_<mode>_img_per_s (and on CUDA torch_<mode>_step_mib) or torch_<mode>_error}
    for each mode, make(torch_released, mode, device) -> (step, its args, images per
    step, made as fast as PyTorch runs it: `tune_for_speed`) timed as fsad's steps are
    (--steps after --warmup); a mode PyTorch cannot run is reported, not raised;
    on_mode(figures so far) after each."""
    import torch

    from benchmarks import torch_released as tr  # --torch: installed (check_torch_args)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = tr.default_device()
    out = {"torch_threads": torch.get_num_threads()}
    for mode in modes:
        try:
            step, step_args, n = make(tr, mode, device)
            out[f"torch_{mode}_img_per_s"] = tr.time_torch_step(
                step, step_args, n, steps=args.steps, warmup=args.warmup, device=device)
            peak = tr.step_peak_bytes(step, step_args, device)
            if peak is not None:
                out[f"torch_{mode}_step_mib"] = peak / 2**20
        except Exception as err:  # noqa: BLE001 - a mode torch cannot run here is reported
            out[f"torch_{mode}_error"] = f"{type(err).__name__}: {err}"[:200]
        on_mode(dict(out))
    return out


def torch_modes_of(method: str, modes: list[str]) -> list[str]:
    """The modes among `modes` that PyTorch's version of `method`'s step has: DevNet's and
    DRA's released steps `torch_released.MODES`, the AHL meta-step `AHL_MODES`."""
    from benchmarks.torch_released import AHL_MODES, MODES
    return [m for m in modes if m in (AHL_MODES if method == "ahl" else MODES)]


TRAIN_METHODS = ("devnet", "dra")  # the steps --batches, --dtypes, --host_fed, --seeds set
# --torch_modes: all of torch_released's, with --torch
ARG_DEFAULTS = {"batches": [48], "dtypes": ["bfloat16", "float32"], "ahl_normals": 300,
                "ahl_chunk": 0, "ahl_task_batching": ["vmap"]}
FLAG_OF_FIELD = {"data.img_size": "--img_size", "model.backbone": "--backbone",
                 "batch_size": "--batches"}


def check_args(ap: argparse.ArgumentParser, args) -> None:
    """Refuses, before anything compiles, flags that no step of the run would read and
    values no step could run with (argparse's one-line error, exit 2), then fills the
    defaults of the flags left out (None in the parser, so that "given" can be told)."""
    trains = [m for m in args.methods if m in TRAIN_METHODS]
    given = {f for f in ARG_DEFAULTS if getattr(args, f) is not None}
    given |= {f for f in ("host_fed", "torch", "torch_modes", "torch_threads")
              if getattr(args, f)}
    given |= {"seeds"} if args.seeds != 1 else set()

    def refuse_unread(flags, needed: bool, why: str) -> None:
        used = [f"--{f}" for f in flags if f in given]
        if used and not needed:
            ap.error(f"{' and '.join(used)}: {why}")

    refuse_unread(("batches", "dtypes", "host_fed", "seeds"), bool(trains),
                  "read only by DevNet's and DRA's steps, and --methods is ahl alone (the "
                  "AHL meta-step's samples are its tasks' sets, --ahl_normals, and its heads "
                  "run in float32): add devnet or dra to --methods, or leave them out")
    refuse_unread(("ahl_normals", "ahl_chunk", "ahl_task_batching"), "ahl" in args.methods,
                  "read only by the AHL meta-step, and --methods has no ahl: add ahl to "
                  "--methods, or leave them out")
    refuse_unread(("torch_modes", "torch_threads"), args.torch, "read only with --torch: "
                  "add --torch, or leave it out")
    if args.torch_threads < 0:
        ap.error(f"--torch_threads {args.torch_threads}: use 1 or more (0: PyTorch's own "
                 f"count)")
    refuse_unread(("host_fed", "seeds", "torch"), not args.compile_only, "timings, and "
                  "--compile_only runs no step: leave one or the other out")
    for field, default in ARG_DEFAULTS.items():
        if getattr(args, field) is None:
            setattr(args, field, default)
    args.ahl_task_batching = list(dict.fromkeys(args.ahl_task_batching))  # each once
    # a first call compiles PyTorch's compiled mode and the host-fed and seeds steps:
    # at least one untimed call keeps that out of their timings
    for flag, value, least in (("steps", args.steps, 1), ("warmup", args.warmup, 1),
                               ("seeds", args.seeds, 1), ("n_normal", args.n_normal, 1),
                               ("ahl_normals", args.ahl_normals, 3),
                               ("ahl_chunk", args.ahl_chunk, 0)):
        if value < least:
            ap.error(f"--{flag} {value}: use {least} or more")
    if trains and args.n_normal < max(args.batches):
        ap.error(f"--n_normal {args.n_normal} is fewer than the batch of "
                 f"{max(args.batches)} that the score step times: raise --n_normal to at "
                 f"least {max(args.batches)}")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        ap.error(f"--json {args.json}: its folder does not exist; make it first")
    if args.torch:
        check_torch_args(ap, args, trains)
    from fsad.validate import UserError, check_config
    steps = [(m, b) for m in trains for b in args.batches]
    steps += [("ahl", args.batches[0])] if "ahl" in args.methods else []
    for m, batch in steps:  # fsad's own rules (image size, batch), in this script's flags
        try:
            check_config(config_for(m, args, batch, args.dtypes[0]), len(jax.devices()))
        except UserError as err:
            # no advice to lower model.n_scales, which this script does not set
            ap.error(in_flags(re.sub(r" or lower model\.n_scales", "", str(err)),
                              FLAG_OF_FIELD))


def in_flags(words: str, flag_of_field: dict[str, str]) -> str:
    """fsad's advice said in a script's flags: "batch_size=1" -> "--batches 1"."""
    for field, flag in flag_of_field.items():
        words = re.sub(rf"(?<![\w.-])(?:--config\.)?{re.escape(field)}(=?)",
                       lambda f, flag=flag: flag + " " * len(f.group(1)), words)
    return words


def check_torch_args(ap: argparse.ArgumentParser, args, trains: list[str]) -> None:
    if importlib.util.find_spec("torch") is None:
        ap.error("--torch needs PyTorch, which is not installed: pip install torch, or "
                 "leave --torch out")
    from benchmarks.torch_released import AHL_MODES, MODES
    every = list(dict.fromkeys((*MODES, *AHL_MODES)))
    given = args.torch_modes
    args.torch_modes = given or every
    unknown = [m for m in args.torch_modes if m not in every]
    if unknown:
        ap.error(f"--torch_modes {' '.join(unknown)}: not a PyTorch configuration; use "
                 f"some of {' '.join(every)}")
    methods = trains + (["ahl"] if "ahl" in args.methods else [])
    unread = [m for m in given or () if not any(torch_modes_of(s, [m]) for s in methods)]
    if unread:
        ap.error(f"--torch_modes {' '.join(unread)}: no step of --methods "
                 f"{' '.join(args.methods)} has it in PyTorch (DevNet's and DRA's: "
                 f"{' '.join(MODES)}; the AHL meta-step's: {' '.join(AHL_MODES)}); leave "
                 f"it out, or add the method")
    if args.backbone != "resnet18" and trains:
        ap.error(f"the PyTorch DevNet and DRA steps run the released ResNet-18 trunk, so a "
                 f"ratio against {args.backbone} would compare two trunks: use --backbone "
                 f"resnet18 with --torch, or time only --methods ahl (heads alone)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["devnet", "dra", "ahl"],
                    choices=["devnet", "dra", "ahl"], help="the steps to time (ahl: the "
                    "AHL meta-step on DRA's heads)")
    ap.add_argument("--img_size", type=int, default=448, help="image side in pixels")
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="DevNet's and DRA's batch sizes, one row each (default 48; the AHL "
                    "meta-step's samples are its tasks' sets: --ahl_normals)")
    ap.add_argument("--dtypes", nargs="+", default=None, choices=["bfloat16", "float32"],
                    help="DevNet's and DRA's compute dtypes (model.dtype; default bfloat16 "
                    "float32; the AHL meta-step runs float32 heads)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps after the warm-up")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls of each step "
                    "(fsad's and PyTorch's) before the timed ones")
    ap.add_argument("--n_normal", type=int, default=1131,
                    help="device-resident training normals (ELPV's general 10-shot split)")
    ap.add_argument("--ahl_normals", type=int, default=None,
                    help="normals in the AHL meta-step's feature bank (default 300)")
    ap.add_argument("--ahl_chunk", type=int, default=None,
                    help="samples of a task's set the AHL meta-step takes at a time "
                    "(ahl.chunk_size; default 0: the whole set)")
    ap.add_argument("--ahl_task_batching", nargs="+", default=None, choices=ahl.TASK_BATCHINGS,
                    help="how the AHL meta-step computes a device's tasks (ahl.task_batching;"
                    " default vmap: as one batched program; map: one after another); with "
                    "vmap and map, both are timed and the row has the first")
    ap.add_argument("--compile_only", action="store_true",
                    help="compile every step and report its compile time and memory, "
                    "without running it (img/s nan)")
    ap.add_argument("--backbone", default="resnet18", choices=BACKBONES,
                    help="the trunk (model.backbone)")
    ap.add_argument("--host_fed", action="store_true",
                    help="also time the step fed batches from the host, for the ratio")
    ap.add_argument("--seeds", type=int, default=1, help="N > 1: also time N seeds trained "
                    "as one vmapped program against N separate steps")
    ap.add_argument("--torch", action="store_true",
                    help="also time PyTorch versions of the released steps (needs torch)")
    ap.add_argument("--torch_modes", nargs="+", default=None,
                    help="the PyTorch configurations to time (default all: DevNet's and "
                    "DRA's eager_fp32 amp_bf16_channels_last compile; the AHL meta-step's "
                    "eager_fp32, its tasks looped, and vmap_fp32, vmapped)")
    ap.add_argument("--torch_threads", type=int, default=0,
                    help="PyTorch's intra-op threads (0: its default, one per core); on a "
                    "CPU shared with other jobs its spinning OpenMP threads can slow a step "
                    "tenfold: 1 there. Recorded in the rows as torch_threads")
    ap.add_argument("--json", default="", help="write the rows here (after every row)")
    ap.add_argument("--check", action="store_true", help="check the flags as a run would "
                    "and list the rows it would time, then stop: nothing compiles")
    args = ap.parse_args(argv)
    check_args(ap, args)
    if args.check:
        for m, batch, dtype in planned_rows(args):
            step = (f"ahl meta-step, {args.ahl_normals} normals, float32 heads, tasks "
                    f"{' and '.join(args.ahl_task_batching)}") if m == "ahl" \
                else f"{m} batch {batch} {dtype}"
            modes = torch_modes_of(m, args.torch_modes) if args.torch else []
            torch_modes = f"; PyTorch {' '.join(modes)}" if modes else ""
            seeds = (f"; {args.seeds} seeds vmapped and one after another"
                     if args.seeds > 1 and m != "ahl" else "")
            print(f"{step}, {args.img_size} px, {args.backbone}{torch_modes}{seeds}",
                  flush=True)
        print("flags checked; nothing compiled or timed (--check)")
        return
    from fsad.compile_cache import disable_compilation_cache
    disable_compilation_cache()  # compile times measured, not read from disk
    rows, torch_rows = [], {}

    def described(row: dict) -> dict:
        return {**row, "backend": jax.default_backend(),
                "device": str(jax.devices()[0].device_kind),
                "devices": len(jax.local_devices()), "img_size": args.img_size,
                "backbone": args.backbone}

    def publish(row: dict) -> None:  # a row not finished yet, beside the finished ones
        if args.json:
            write_json_atomic(args.json, rows + [{**described(row), "partial": True}])

    for m, batch, dtype in planned_rows(args):
        try:
            row = bench_ahl(args, batch, dtype, publish) if m == "ahl" else \
                bench_train_and_score(m, args, batch, dtype, torch_rows, publish)
        except Exception as err:  # noqa: BLE001  (out of memory: the row says so)
            if not is_out_of_memory(err):
                raise
            row = {"method": "ahl_meta_step" if m == "ahl" else m, "batch": batch,
                   "dtype": dtype, "error": oom_words(err)[:160]}
        row = described(row)
        rows.append(row)
        print(row_line(row), flush=True)
        if args.json:  # after every row: a run cut short keeps what it measured
            write_json_atomic(args.json, rows)
    print(table(rows))


def planned_rows(args) -> list[tuple[str, int, str]]:
    """(method, batch, dtype) of each row in the order they are timed: the first dtype's
    rows of every method first (with PyTorch's figures, which the first row of a method
    and batch measures), so a run cut short by a time limit keeps them; the AHL meta-step
    has one row (its samples are its tasks' sets and its heads run in float32)."""
    return [(m, batch, dtype) for dtype in args.dtypes for m in args.methods
            for batch in args.batches
            if m != "ahl" or (dtype, batch) == (args.dtypes[0], args.batches[0])]


def table(rows) -> str:
    cols = ["method", "batch", "dtype", "train_compile_s", "train_img_per_s",
            "train_tflop_per_s", "train_step_mib", "score_compile_s", "score_img_per_s"]
    # the optional columns where a row has them: --seeds N, --torch, an error
    cols += [c for c in ("seeds_vmapped_img_per_s", "vmapped_over_sequential",
                         "fsad_over_best_torch", "torch_threads", "error")
             if any(c in r for r in rows)]
    cols += sorted({k for r in rows for k in r if k.startswith("torch_") and
                    k.endswith("img_per_s")})
    return markdown_table(rows, cols)


def row_line(row: dict) -> str:
    """A row as one line of key=value pairs (floats to 4 significant digits)."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in row.items())


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    """The rows' `cols` as a markdown table (floats to 3 significant digits; a cell a row
    lacks, or None, empty)."""
    def cell(v) -> str:
        return f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
