"""The training loop shared by every method: device-resident data, the jitted step, `fit`.

Design:
* The training images live on the devices (replicated) as uint8; every step
  samples its batch inside the jitted function from the step key, so there is
  no host round trip per step.
* One `Mesh` over the run's devices (`fsad.mesh`; every host's in a multi-host run,
  `fsad.hosts`) with a ``data`` axis: the sampled batch is sharded along it, parameters and
  optimiser state are replicated. One device is the degenerate case; results match
  to float tolerance.
* `state` is a plain pytree; every step's randomness derives from the run's key
  and ``state.step``, so a resumed run draws the same batches as an
  uninterrupted one; `fit` saves an Orbax checkpoint at the end of every epoch
  (`fsad.checkpoints`) and resumes from the newest.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from fsad.buckets import pad_to, rows_with_anomaly_room
from fsad.checkpoints import (PacedCheckpoints, adopt_checkpoint, checkpoint_manager, is_whole,
                             restore_latest)
from fsad.data.protocols import batch_counts
from fsad.errors import UserError
from fsad.hosts import progress, put, to_host
from fsad.interrupts import shielded
from fsad.mesh import batch_sharded, check_batch, mesh_batch, padded_batches, replicated
from fsad.models.resnet import normalize_uint8
from fsad.quick_compile import quick_jit


@flax.struct.dataclass
class TrainData:
    """Device-resident training set; normals first, then labelled anomalies.

    Attributes:
      images: [N, H, W, 3] uint8.
      n_normal: [] int32, rows [0, n_normal) are normal (label 0).
      n_anomaly: [] int32, rows [n_normal, n_normal + n_anomaly) are seen anomalies.
      outliers: [No, H, W, 3] uint8 external images for outlier exposure (one black
        image and n_outlier = 0 when there are none).
      n_outlier: [] int32.
    """

    images: jax.Array
    n_normal: jax.Array
    n_anomaly: jax.Array
    outliers: jax.Array
    n_outlier: jax.Array


@flax.struct.dataclass
class TrainState:
    """Everything a step updates, and what a checkpoint keeps.

    step []; params, batch_stats, opt_state: pytrees; extras: method state that
    is not trained (DRA's fixed test reference set), a dict of arrays.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    extras: Any


@dataclasses.dataclass(frozen=True)
class Method:
    """What a method (DevNet, DRA) supplies to the shared loop.

    init(key, images [B,H,W,3] float) -> {"params", "batch_stats"}
    init_extras(key, data: TrainData) -> dict of arrays kept in the state (may be empty)
    sample_batch(data: TrainData, key, batch_size, step) -> dict of [B, ...] arrays; key
      is the run's sampling key, the same at every step, and step the step number
    loss(params, batch_stats, batch, key) -> (loss [], (metrics dict, new batch_stats))
    score(variables, images [B,H,W,3] float) -> dict of [B] scores; "score" is the image score
    optimizer(steps_per_epoch) -> optax.GradientTransformation
    reference(variables) -> [R, H, W, 3] uint8 test reference set, or None (DRA's residual
      head; AHL reads it to build its reference means)
    prepare_eval(variables) -> variables with what every test batch shares computed once
      (DRA: the fixed reference set's feature means); identity by default
    """

    name: str
    init: Callable
    sample_batch: Callable
    loss: Callable
    score: Callable
    optimizer: Callable
    init_extras: Callable = lambda key, data: {}
    random_scores: bool = False  # score() reads variables["key"] (see score_images)
    reference: Callable | None = None
    prepare_eval: Callable = lambda variables: variables


def put_train_data(images_normal: np.ndarray, images_anomaly: np.ndarray, mesh: Mesh,
                   outliers: np.ndarray | None = None, bucket: int = 1) -> TrainData:
    """Copies the training images onto every device of the mesh.

    Args:
      images_normal: [Nn, H, W, 3] uint8.
      images_anomaly: [Na, H, W, 3] uint8 (Na >= 1).
      outliers: optional [No, H, W, 3] uint8 outlier-exposure images.
      bucket: above 1, the image rows are padded (with black images no step draws) to a
        multiple of this that leaves room for `ANOMALY_ROOM` seen anomalies, so that the
        splits of a protocol (1 to 10 shots, every seed) share one array shape and one
        compiled train step.
    """
    images = np.concatenate([images_normal, images_anomaly]).astype(np.uint8)
    images = pad_to(images, rows_with_anomaly_room(len(images_normal), len(images_anomaly),
                                                   bucket))
    n_out = 0 if outliers is None else len(outliers)
    if not n_out:
        outliers = np.zeros((1, *images.shape[1:]), np.uint8)
    data = TrainData(images, np.int32(len(images_normal)), np.int32(len(images_anomaly)),
                     np.asarray(outliers, np.uint8), np.int32(n_out))
    return put(data, replicated(mesh))


def cycle_draw(key: jax.Array, step: jax.Array, count: int, n: jax.Array,
               capacity: int) -> jax.Array:
    """Rows drawn as the released `BalancedBatchSampler` draws them: a stream that walks
    through successive random permutations of range(n), `count` rows per step.

    Step s takes stream positions s * count ... s * count + count - 1; position p is
    row perm_c[p mod n] of permutation c = p // n (a fresh permutation each time the
    previous one is used up), so within a cycle no row repeats and every row is seen.

    Args:
      key: the stream's key, the same at every step (permutation c is drawn from
        fold_in(key, c)).
      step: [] int, the training step.
      count: rows per step (static).
      n: [] int, the number of rows to draw from (may be traced).
      capacity: a static bound on n (the permutation is an argsort of that many keys).
    Returns:
      [count] int32 in [0, n).
    """
    pos = step * count + jnp.arange(count)
    cycle, offset = pos // n, pos % n

    def row(c, o):
        u = jax.random.uniform(jax.random.fold_in(key, c), (capacity,))
        return jnp.argsort(jnp.where(jnp.arange(capacity) < n, u, 2.0))[o]

    return jax.vmap(row)(cycle, offset).astype(jnp.int32)


def sample_balanced(data: TrainData, key: jax.Array, step: jax.Array, batch_size: int,
                    anomaly_fraction: float) -> tuple[jax.Array, jax.Array]:
    """A batch of normals, then seen anomalies, each from its own permutation stream
    (`cycle_draw`), as the released balanced sampler draws them.

    Args:
      key: the run's sampling key (the same at every step); step: [] int.
    Returns:
      images: [B, H, W, 3] uint8; labels: [B] int32 (0 normal, 1 seen anomaly).
    """
    n_norm, n_anom = batch_counts(batch_size, anomaly_fraction)
    k_n, k_a = jax.random.split(key)
    cap = data.images.shape[0]
    idx_n = cycle_draw(k_n, step, n_norm, data.n_normal, cap)
    idx_a = data.n_normal + cycle_draw(k_a, step, n_anom, data.n_anomaly, cap)
    idx = jnp.concatenate([idx_n, idx_a])
    labels = jnp.concatenate([jnp.zeros(n_norm, jnp.int32), jnp.ones(n_anom, jnp.int32)])
    return data.images[idx], labels


def rotate_batch(key: jax.Array, images: jax.Array, max_degrees: float) -> jax.Array:
    """Every image of [B, H, W, 3] rotated by its own U(-max_degrees, max_degrees)
    (torchvision RandomRotation: nearest, zero fill); max_degrees 0 returns images."""
    if not max_degrees:
        return images
    from fsad.data.augment import random_rotation
    return jax.vmap(lambda k, im: random_rotation(k, im, max_degrees))(
        jax.random.split(key, images.shape[0]), images)


def _update(method: Method, tx, state: TrainState, batch: dict, key: jax.Array):
    """One optimiser step on a given batch: (state, metrics)."""
    grad_fn = jax.value_and_grad(method.loss, has_aux=True)
    with jax.named_scope("loss_and_grad"):  # names for profiles (benchmarks/profile_step.py)
        (loss, (metrics, batch_stats)), grads = grad_fn(state.params, state.batch_stats,
                                                        batch, key)
    with jax.named_scope("optimizer"):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    new_state = TrainState(state.step + 1, params, batch_stats, opt_state, state.extras)
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}


def make_train_step(method: Method, tx: optax.GradientTransformation, mesh: Mesh,
                    batch_size: int) -> Callable:
    """Builds the jitted step: (state, data: TrainData, key) -> (state, metrics).

    `key` is the run's training key, the same at every step: the batch and the loss's
    randomness derive from it and `state.step`, so a resumed run draws what an
    uninterrupted one draws. The batch is sampled on device from `data` and sharded
    over the mesh.
    """
    check_batch(batch_size, mesh)
    shard, rep = batch_sharded(mesh), replicated(mesh)

    def constrain(a):  # batch-sized leaves are split over devices; others (references) not
        return jax.lax.with_sharding_constraint(a, shard if a.shape[0] == batch_size else rep)

    def step(state: TrainState, data: TrainData, key: jax.Array):
        k_batch, k_loss = jax.random.split(key)
        with jax.named_scope("sample_batch"):
            batch = jax.tree.map(constrain, method.sample_batch(data, k_batch, batch_size,
                                                                state.step))
        return _update(method, tx, state, batch, jax.random.fold_in(k_loss, state.step))

    return jax.jit(step, donate_argnums=(0,), out_shardings=replicated(mesh))


def make_host_fed_step(method: Method, tx: optax.GradientTransformation,
                       mesh: Mesh) -> Callable:
    """The conventional alternative, for benchmarks: (state, batch, key) -> (state, metrics)
    with the batch sampled on the host and copied in every step."""
    return jax.jit(lambda state, batch, key: _update(method, tx, state, batch, key),
                   donate_argnums=(0,), out_shardings=replicated(mesh))


def make_score_fn(method: Method, mesh: Mesh) -> Callable:
    """Jitted eval-mode scorer: (variables, images uint8 [B,H,W,3]) -> dict of [B] scores."""
    shard = batch_sharded(mesh)

    def score(variables, images):
        images = jax.lax.with_sharding_constraint(images, shard)
        return method.score(variables, normalize_uint8(images))

    return jax.jit(score)


def score_images(score_fn: Callable, variables, images: np.ndarray, mesh: Mesh,
                 batch_size: int = 64, desc: str = "scoring",
                 key: jax.Array | None = None) -> dict[str, np.ndarray]:
    """Scores a uint8 array in fixed-size batches (last one padded). Returns dict of [N].

    With `key`, batch i sees variables["key"] = fold_in(key, i): methods whose
    test scores are random per batch (DRA's released reference draw) use it. Every
    batch has the one size, however few the images (one image scored alone gets the
    numbers it gets among others, bit for bit: one program).
    """
    batch_size = mesh_batch(batch_size, mesh)
    chunks = []
    for i, batch, n in padded_batches(images, batch_size, desc):
        v = variables if key is None else {**variables, "key": jax.random.fold_in(key, i)}
        out = score_fn(v, put(batch, batch_sharded(mesh)))
        chunks.append(jax.tree.map(lambda a, n=n: to_host(a)[:n], out))
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def init_state(method: Method, key: jax.Array, data: TrainData, tx, mesh: Mesh,
               pretrained: Mapping | None = None) -> TrainState:
    """Initialises params (optionally overwritten by `pretrained` variables), optimiser
    and the method's extras (drawn from the training data)."""
    k_init, k_extras = jax.random.split(key)
    # one compiled program (op by op, a ResNet-18's init compiles each layer's ops apart:
    # 14 s against 5 s on a 2-core CPU), without the backend optimisations, which took
    # longer to compile than the program takes to run (fsad.quick_compile)
    variables = quick_jit(method.init)(k_init, jnp.zeros((1, *data.images.shape[1:]),
                                                         jnp.float32))
    params = variables["params"]
    extras = method.init_extras(k_extras, data)  # (drawn from the data, not the weights)
    state = TrainState(jnp.int32(0), params, variables.get("batch_stats", {}), tx.init(params),
                       extras)
    if pretrained is not None:
        return with_pretrained(state, pretrained, tx, mesh)
    return put(state, replicated(mesh))


def with_pretrained(state: TrainState, pretrained: Mapping, tx, mesh: Mesh) -> TrainState:
    """A state at its start with the `pretrained` variables (e.g. {"params": {"backbone":
    ...}, "batch_stats": {...}}) written over its own, and its optimiser state made
    afresh for those params (`fsad.weights.merge_variables` checks paths and shapes).
    init_state(..., pretrained) is init_state(...) then this."""
    from fsad.weights import merge_variables
    variables = merge_variables({"params": state.params, "batch_stats": state.batch_stats},
                                pretrained)
    params = variables["params"]
    return put(dataclasses.replace(state, params=params,
                                   batch_stats=variables.get("batch_stats", {}),
                                   opt_state=tx.init(params)), replicated(mesh))


def fit(method: Method, state: TrainState, tx, data: TrainData, mesh: Mesh, key: jax.Array,
        batch_size: int, epochs: int, steps_per_epoch: int, workdir: str | None,
        keep_checkpoints: int = 3, desc: str = "train",
        make_step: Callable | None = None,
        start_from: str | None = None,
        checkpoint_seconds: float = 0.0,
        trunk: Callable[[], Mapping | None] | None = None) -> tuple[TrainState, dict]:
    """Runs (or resumes) training to epochs * steps_per_epoch steps.

    Checkpoints go to ``workdir/checkpoints`` at the end of an epoch when one is due
    (`SavePace`: `checkpoint_seconds` after the last, 0 for every epoch), after the
    last step, and on Ctrl-C (`save_on_ctrl_c`); when one exists, training resumes from
    it.

    Args:
      make_step: state -> (the train step for that state's shapes, seconds spent
        compiling it), called only when steps remain (a finished or fully resumed run
        compiles nothing); when None, `make_train_step` (compiled at its first call).
      start_from: another run's checkpoint folder to start from when workdir has no
        checkpoint (AHL's ahl.base_workdir); it is read, never written. Its newest
        checkpoint is adopted into workdir's (`adopt_checkpoint`: hard links where it
        can), so that the run holds its own start.
      trunk: -> the pretrained variables to start from (`with_pretrained`; None: the
        state's own init), called only when no checkpoint was restored: a seed that
        resumes, or starts from another run's base, loads no weights (their file may be
        gone since).
    Returns:
      the final state and {"train_seconds", "steps", "resumed_from", "loss",
      "step_seconds" (median wall time of a step after the first), "compile_seconds"}.
    """
    total = epochs * steps_per_epoch
    if workdir and start_from:  # the start kept in workdir too: scoring needs no source
        adopt_checkpoint(start_from, os.path.join(workdir, "checkpoints"))
    mngr = (checkpoint_manager(os.path.join(workdir, "checkpoints"), keep_checkpoints,
                               clean_tmp=True) if workdir else None)
    if mngr is not None:
        try:
            state = restore_latest(mngr, state, resume=True)
        except UserError as err:
            if not start_from:
                raise
            raise UserError(f"{err}. Its checkpoint was copied from the base run's "
                            f"{start_from}, whose newest checkpoint is then unreadable too: "
                            f"resume that run (its own command sets the damaged one aside), "
                            f"then start this one again in a new --workdir") from err
    if start_from and int(state.step) == 0:
        source = checkpoint_manager(start_from, keep_checkpoints)
        state = restore_latest(source, state)
        source.close()
    start = int(state.step)
    if start == 0 and trunk is not None and (pretrained := trunk()) is not None:
        state = with_pretrained(state, pretrained, tx, mesh)
    step_fn, compile_seconds = None, 0.0
    if start < total:  # a finished run (or one resumed at its end) compiles nothing
        step_fn, compile_seconds = (make_step(state) if make_step is not None
                                    else (make_train_step(method, tx, mesh, batch_size), 0.0))
    t0 = time.time()
    saver = PacedCheckpoints(mngr, checkpoint_seconds) if mngr is not None else None
    losses = []
    finished_at = []  # wall times of the first finished steps, for the CPU ETA check
    # (step, its loss, its gradients' norm) of the previous and the newest step
    in_flight = newest = None
    if 0 < start < total:  # said on the bar, which starts at `start`
        desc = f"{desc} (resumed at step {start})"

    def finish(bar, step_loss) -> None:
        """Checks a finished step's loss and gradients and counts the step on the bar,
        with that loss (shown at the bar's next refresh)."""
        step, loss, grad_norm = step_loss
        loss = check_finite(float(loss), step + 1, float(grad_norm))
        bar.set_postfix({"loss": f"{loss:.4f}", "epoch": step // steps_per_epoch + 1},
                        refresh=False)  # the loss first, where a narrow terminal cuts
        bar.update(1)

    with progress(total=total, initial=start, desc=desc, unit="step",
                  dynamic_ncols=True) as bar:
        try:
            for step in range(start, total):
                state, metrics = step_fn(state, data, key)
                newest = (step, metrics["loss"], metrics["grad_norm"])
                if in_flight is not None:
                    # One step stays queued behind the running one, so the device never
                    # idles, while the bar (and its ETA) counts finished steps, not
                    # dispatched ones; each finished step's loss is checked.
                    finish(bar, in_flight)
                    finished_at.append(time.time())
                    if len(finished_at) == 3:  # the first step may hold a compilation
                        per_step = (finished_at[2] - finished_at[0]) / 2
                        warn_if_long_on_cpu(per_step * (total - step), total)
                in_flight = newest
                if (step + 1) % steps_per_epoch == 0 or step + 1 == total:
                    loss = check_finite(float(metrics["loss"]), step + 1,
                                        float(metrics["grad_norm"]))
                    losses.append(loss)
                    if saver is not None:
                        saver.epoch_end(step + 1, state, step + 1 == total)
        except KeyboardInterrupt:
            if saver is not None:  # a second press waits: it cut the save short
                with shielded("saving the newest step"):
                    save_on_ctrl_c(saver, state, [in_flight, newest])
            raise
        if in_flight is not None:
            finish(bar, in_flight)
    if mngr is not None:
        mngr.close()
    jax.block_until_ready(state)
    seconds = time.time() - t0
    gaps = np.diff(finished_at)
    return state, {"train_seconds": seconds, "steps": total - start, "resumed_from": start,
                   "loss": losses[-1] if losses else None,
                   "step_seconds": float(np.median(gaps)) if len(gaps) else None,
                   "compile_seconds": compile_seconds}


def save_on_ctrl_c(saver: PacedCheckpoints, state: TrainState,
                   unchecked: list[tuple | None]) -> None:
    """On Ctrl-C: the newest state saved (`PacedCheckpoints.interrupted`) when it is whole
    (not given to a step already), it is the output of the newest step, and the losses
    the loop has not checked yet are finite; the run resumes from that step (its batches
    and schedule follow from the step alone).

    unchecked: (step, its loss, its gradients' norm) of the previous and the newest
    dispatched step (None before any). A Ctrl-C mostly lands while the loop waits for
    the previous step's loss, when `state` is already the newest step's output.
    """
    pending = [p for p in unchecked if p is not None]
    if not pending or not is_whole(state):  # a state given to a step: gone
        return
    step = int(state.step)
    if pending[-1][0] + 1 == step and all(np.isfinite(float(loss)) and np.isfinite(float(g))
                                          for _, loss, g in pending):
        saver.interrupted(step, state)


def check_finite(loss: float, step: int, grad_norm: float = 0.0) -> float:
    """The loss, or a UserError naming the step where training diverged (the last
    checkpoint, saved before it, stays the latest) and the fix: another config, which
    the workdir, holding this one's checkpoints, refuses. Gradients that are not finite
    under a finite loss diverge too: the step's parameters are (a checkpoint of them
    was saved, and a resumed run diverged at once, "from before it")."""
    if not np.isfinite(loss):
        raise UserError(f"training diverged: the loss became {loss} at step {step} (the "
                        f"checkpoints kept are from before it); lower --config.optim.lr (or "
                        f"raise optim.clip_norm) in a new --workdir: this one holds the "
                        f"config that diverged")
    if not np.isfinite(grad_norm):  # (clipping makes an infinite gradient NaN: no help)
        raise UserError(f"training diverged: the gradients' norm became {grad_norm} at step "
                        f"{step}, its loss {loss:.4g} (the checkpoints kept are from before "
                        f"it); lower --config.optim.lr in a new --workdir: this one holds the "
                        f"config that diverged")
    return loss


def warn_if_long_on_cpu(eta_seconds: float, total_steps: int, limit: float = 3600.0) -> bool:
    """Warns once, early, when a CPU run would take more than `limit` seconds."""
    if jax.default_backend() != "cpu" or eta_seconds <= limit:
        return False
    logging.warning(
        "this run needs about %.1f hours more on the CPU (%d steps): the paper protocol "
        "(448 px) is meant for a GPU (pip install -e '.[cuda12]'); the :quick variant "
        "(96 px, 100 steps) runs the whole pipeline in minutes, e.g. "
        "--config configs/devnet.py:quick,lite0", eta_seconds / 3600, total_steps)
    return True


def variables_of(state: TrainState) -> dict:
    """What a method's score function takes: params, batch_stats and extras."""
    return {"params": state.params, "batch_stats": state.batch_stats, "extras": state.extras}
