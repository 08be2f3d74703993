"""AHL's meta-training loop: CDL epochs with importance weights, checkpointed at the end
of an epoch when one is due (`PacedCheckpoints`, config.checkpoint_seconds) and on Ctrl-C,
and resumable (`MetaState`)."""

from __future__ import annotations

import functools
import os
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

from fsad.buckets import ROWS_BUCKET, pad_to
from fsad.checkpoints import PacedCheckpoints, checkpoint_manager, restore_latest
from fsad.errors import UserError
from fsad.hosts import progress, put
from fsad.interrupts import shielded
from fsad.mesh import one_device_mesh, replicated
from fsad.methods.ahl.heads import HeadModel
from fsad.methods.ahl.importance import (generalisation_errors, make_psi_fns,
                                         released_errors, weight_spread,
                                         weights_from_errors)
from fsad.methods.ahl.meta_step import fitted_meta_step
from fsad.methods.ahl.tasks import Tasks
from fsad.optim import optimizer_from_config

@flax.struct.dataclass
class MetaState:
    """What a meta-training checkpoint keeps. history: [epochs, P, T] pool scores;
    weights: [T] for the next epoch; weights_log: [epochs, T] the importance weights w
    each epoch used (`weighting=released` weighs its query losses by 0.5 + 0.5 w);
    losses: [epochs] its L_cdl."""

    epoch: jax.Array
    params: dict
    opt_state: tuple
    psi_params: dict
    psi_opt: tuple
    history: jax.Array
    weights: jax.Array
    weights_log: jax.Array
    losses: jax.Array


def released_reads_psi(epoch: int, history: int) -> bool:
    """Whether the released code's weighting reads psi's weights at (0-based) meta-epoch
    `epoch`: from epoch `history` + 2 on (its main.py reads psi only once
    `epoch > sequence_len + 1`)."""
    return epoch > history + 1


def weights_in_use(w: jax.Array, epoch: int, history: int, weighting: str) -> jax.Array:
    """[T] the importance weights that (0-based) meta-epoch `epoch` uses: psi's w [T]
    as soon as they exist (from epoch `history` + 1 on), or, with the released code's
    weighting, once it reads them (`released_reads_psi`); 1/T before."""
    if weighting == "released" and not released_reads_psi(epoch, history):
        return jnp.full_like(w, 1.0 / w.shape[0])  # w's placement: the step's inputs
    return w


def query_weights(w: jax.Array, epoch: int, history: int, weighting: str) -> jax.Array:
    """[T] the weights of the T query losses at (0-based) meta-epoch `epoch`, from psi's
    importance weights w [T] (1/T until psi has run): `weights_in_use` itself ("paper"),
    or the released code's 0.5 + 0.5 w once it reads psi's weights ("released"), the
    plain 1/T before that (its loss_q[-1] / episode_num: they sum to 1)."""
    used = weights_in_use(w, epoch, history, weighting)
    if weighting == "released" and released_reads_psi(epoch, history):
        return 0.5 + 0.5 * used
    return used


def run_meta_training(config, hm: HeadModel, params_g, bank, tasks: Tasks, key,
                      workdir: str | None, stop_after: int | None = None,
                      mesh=None) -> tuple[dict, dict]:
    """Runs CDL with importance weights for config.ahl.epochs epochs (resumable).

    stop_after: end after this epoch (checkpointed), as an interruption would.
    mesh: where the state, bank and tasks live, replicated, and the devices the meta-step
      spreads the tasks over (default: the first local device). Every epoch's inputs
      have the same placement, so the meta-step and psi's steps compile once: a fresh
      array (uncommitted) and a step's output (committed to the mesh) would otherwise be
      two programs.

    Returns:
      (unified head params, info: {"weights" [epochs, T] the importance weights each
       epoch used (`MetaState.weights_log`),
       "weight_spread" [epochs] max/min of those, "loss" [epochs], "epoch_seconds",
       "resumed_from": the meta-epochs restored from a checkpoint}).
    """
    a = config.ahl
    T, K, E = tasks.num_tasks, a.history, a.epochs
    tx = optimizer_from_config(a.optim, 1)
    if mesh is None:
        mesh = one_device_mesh()
    psi_init, psi_train, psi_predict = make_psi_fns(T, a)
    k_psi, k_meta = jax.random.split(key)
    psi_params, psi_opt = psi_init(k_psi, K)
    # psi's dropout masks and released initial states: a stream of k_meta (whose epoch
    # keys are fold_in(k_meta, epoch), epoch < E), k_psi being spent on psi's init
    k_psi_run = jax.random.fold_in(k_meta, 2 ** 32 - 1)
    state = MetaState(jnp.int32(0), params_g, tx.init(params_g), psi_params, psi_opt,
                      jnp.zeros((E, len(tasks.pool_idx), T), jnp.float32),
                      jnp.full((T,), 1.0 / T, jnp.float32), jnp.zeros((E, T), jnp.float32),
                      jnp.zeros((E,), jnp.float32))
    on_mesh = functools.partial(put, sharding=replicated(mesh))
    state = on_mesh(state)  # restore_latest keeps these shardings
    mngr = checkpoint_manager(os.path.join(workdir, "ahl_checkpoints"), 2, clean_tmp=True) \
        if workdir else None
    if mngr is not None:
        state = restore_latest(mngr, state, resume=True)
    # the bank (the largest input) and the pool straight from the host arrays to the
    # mesh, not through the default device first. The bank's rows and the task sets'
    # widths are padded to a multiple of ROWS_BUCKET, the pool to one of four lengths per
    # doubling (zeros that weigh 0 or are left out; `fsad.buckets`), so that other seeds
    # and settings, whose lengths differ, reuse the compiled meta-step and psi's steps
    # (from the persistent compilation cache)
    bank_dev = on_mesh([pad_to(b, tasks.padded_bank_rows(ROWS_BUCKET)) for b in bank])
    task_arrays = on_mesh(tasks.device_arrays(ROWS_BUCKET))
    pool_idx = on_mesh(tasks.padded_pool_idx(ROWS_BUCKET))
    n_pool = len(tasks.pool_idx)  # P; the padded pool_idx holds P' >= P

    def pool_padded(x: jax.Array) -> jax.Array:
        """[P, ...] -> [P', ...], psi's inputs on the padded pool (zeros after row P)."""
        return jnp.pad(x, [(0, len(pool_idx) - n_pool)] + [(0, 0)] * (x.ndim - 1))

    in_query = tasks.pool_in_query_sets()  # [T, P]
    # the rows of psi's steps: the whole pool psi_steps times, or (the released fit) each
    # task's query set once, in task order; 0 on the padding
    psi_rows = on_mesh(pad_to(in_query if a.psi_fit == "query_sets" else
                              np.ones((a.psi_steps, n_pool), np.float32),
                              len(pool_idx), axis=1))
    pool_classes = tasks.pool_classes()

    def errors(pred: np.ndarray) -> np.ndarray:
        """[T] the models' generalisation errors r from psi's predictions [P, T] (the
        released errors: [Q, P, T], each query set's)."""
        if a.errors == "released":
            return released_errors(pred, pool_classes, in_query, a.error_scale)
        return generalisation_errors(pred, tasks.pool_lab, tasks.pool_coef, a.error_scale)
    step = fitted_meta_step(hm, tx, a, mesh, (
        state.params, state.opt_state, bank_dev, task_arrays, state.weights, pool_idx,
        jax.random.fold_in(k_meta, 0), hm.consts))

    def run_epoch(state: MetaState, epoch: int) -> tuple[MetaState, float]:
        w = weights_in_use(state.weights, epoch, K, a.weighting)
        qw = query_weights(state.weights, epoch, K, a.weighting)
        params, opt_state, out = step(state.params, state.opt_state, bank_dev, task_arrays,
                                      qw, pool_idx, jax.random.fold_in(k_meta, epoch),
                                      hm.consts)
        loss = float(out["loss"])
        if not np.isfinite(loss):
            raise UserError(f"AHL meta-training diverged: the loss became {loss} at epoch "
                            f"{epoch + 1}; lower --config.ahl.optim.lr or "
                            f"--config.ahl.inner_lr (this workdir takes other AHL fields "
                            f"until a seed keeps a meta-training checkpoint; after that, in "
                            f"a new --workdir)")
        if epoch == E - 1 and not a.update_last_epoch:  # the released code's last
            params, opt_state = state.params, state.opt_state  # gradient is never applied
        history = state.history.at[epoch].set(out["pool_scores"][:, :n_pool].T)
        psi_params, psi_opt, w_next = state.psi_params, state.psi_opt, state.weights
        if epoch + 1 > K:  # a (K epochs -> next epoch) pair exists: train psi, predict
            # psi learns online: the newest window each epoch (fixed shapes, one compile)
            seqs = pool_padded(history[epoch - K:epoch].transpose(1, 0, 2))  # [P', K, T]
            targets = pool_padded(history[epoch])  # [P', T]
            k_epoch = jax.random.fold_in(k_psi_run, epoch)
            for i in range(len(psi_rows)):
                psi_params, psi_opt, _ = psi_train(psi_params, psi_opt, seqs, targets,
                                                   psi_rows[i], jax.random.fold_in(k_epoch, i))
            window = pool_padded(history[epoch + 1 - K:epoch + 1].transpose(1, 0, 2))
            k_pred = jax.random.fold_in(k_epoch, len(psi_rows))
            if a.errors == "released":  # a call per query set, as the released code's:
                # each its own initial state and dropout masks -> [Q, P, T]
                pred = jnp.stack([psi_predict(psi_params, window, jax.random.fold_in(k_pred, q))
                                  for q in range(len(in_query))])
            else:
                pred = psi_predict(psi_params, window, k_pred)
            pred = np.asarray(pred)[..., :n_pool, :]  # [P, T] or [Q, P, T]
            w_next = jnp.asarray(weights_from_errors(errors(pred),
                                                     a.weight_temperature, a.weight_relative))
        return on_mesh(MetaState(jnp.int32(epoch + 1), params, opt_state, psi_params,
                                 psi_opt, history, w_next,
                                 state.weights_log.at[epoch].set(w),
                                 state.losses.at[epoch].set(loss))), loss

    times = []
    saver = PacedCheckpoints(mngr, config.checkpoint_seconds) if mngr is not None else None
    end = min(E, stop_after or E)
    desc, resumed_from = "AHL meta-training", int(state.epoch)
    if 0 < resumed_from < E:  # said on the bar, which starts there
        desc = f"{desc} (resumed at epoch {resumed_from})"
    with progress(total=E, initial=resumed_from, desc=desc, unit="epoch") as bar:
        try:
            for epoch in range(int(state.epoch), end):
                t0 = time.time()
                state, loss = run_epoch(state, epoch)
                times.append(time.time() - t0)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if saver is not None:
                    saver.epoch_end(epoch + 1, state, epoch + 1 == end)
        except KeyboardInterrupt:  # the newest finished epoch saved
            if saver is not None and int(state.epoch):
                with shielded("saving the newest meta-epoch"):
                    saver.interrupted(int(state.epoch), state)
            raise
    if mngr is not None:
        mngr.close()
    done = int(state.epoch)
    weights = np.asarray(state.weights_log)[:done]
    return state.params, {"weights": weights.tolist(),
                          "weight_spread": [weight_spread(w) for w in weights],
                          "loss": np.asarray(state.losses)[:done].tolist(),
                          "epoch_seconds": float(np.median(times)) if times else None,
                          "resumed_from": resumed_from}
