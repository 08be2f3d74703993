"""AHL's CDL step (spec §7 step 3): T base models adapt to their support sets
(MAML, second or first order), are scored on their query sets, and the unified heads
take one step on the weighted sum; the T tasks spread over the devices, each device's
share one vmapped program or one task after another (`ahl.task_batching`), a set taken
whole or in chunks of bounded memory."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from fsad.errors import UserError
from fsad.memory import check_fits, free_bytes, gib, hint_on_oom, program_bytes
from fsad.mesh import DATA_AXIS, one_device_mesh
from fsad.methods.ahl.heads import HeadModel

# how a device's tasks are computed (`ahl.task_batching`): "vmap", as one batched
# program (every head's weights then differ per task: its convolutions become grouped
# ones); "map", one after another (`jax.lax.map`). Why vmap is the default: README "AHL"
TASK_BATCHINGS = ("vmap", "map")


def check_task_batching(task_batching: str) -> None:
    """Raises UserError unless task_batching is one of TASK_BATCHINGS."""
    if task_batching not in TASK_BATCHINGS:
        raise UserError(f"ahl.task_batching={task_batching!r}; use vmap (a device's tasks as "
                        f"one batched program) or map (one after another)")


def make_meta_step(hm: HeadModel, tx, inner_steps: int, inner_lr: float, first_order: bool,
                   mesh=None, chunk: int = 0, task_batching: str = "vmap",
                   loss_scale: float = 1.0, query_batches: int = 1):
    """The jitted CDL epoch step.

    step(params, opt_state, bank [scales] of [M,h,w,C], tasks dict of [T, .],
         weights [T], pool_idx [P], key) ->
      (params, opt_state, {"loss", "task_losses" [T], "pool_scores" [T, P'] (P' the
       pool's padded length: the first P are the pool's)})
    tasks holds support_/query_ idx, lab and weight (class-balanced, 0 on padding).
    The compiled program takes hm.consts as an argument (see HeadModel): every seed's
    step is the same program. `step.jitted` is that program, step's arguments then
    hm.consts (for ahead-of-time lowering: ``step.jitted.lower(..., key, hm.consts)``).
    task_loss and adapt (one task's pieces, for tests) read hm.consts too.

    mesh: the devices the T tasks are spread over (default: the first local device).
    Each device adapts its share of the tasks (`shard_map`; the tasks are padded to a
    multiple of the mesh's size with copies of the first ones at outer weight 0) and the
    outer gradient and loss are summed across devices. Inputs and outputs are replicated
    on the mesh. Every mesh gives the same task losses; the sum's order, and so the last
    bits of the update, depend on the mesh's size.

    chunk: 0 takes each task's support or query set in one pass, whose memory grows with
    the set (every task's samples, activations and their second-order graph at once: 12.6
    GiB for ELPV's 1,131 normals at 96 px with Lite0). N > 0 takes N samples of a set at a
    time (`chunked_sum`), each chunk's gradient recomputed in the backward pass rather
    than kept, so memory is bounded by the chunk and the result is the whole set's, up to
    the order of the sums.

    task_batching: how each device computes its tasks (TASK_BATCHINGS): as one vmapped
    program or one after another; the same losses and update up to the order of the sums.

    loss_scale: every task loss, support (the inner steps) and query alike, times this;
    query_batches: each query loss times this too (`ahl.loss_scale`, `ahl.query_batches`:
    the released code's scales, whose loss is the sum of that many batch means, README
    "AHL"). task_losses are the scaled ones.
    """
    if mesh is None:
        mesh = one_device_mesh()
    check_task_batching(task_batching)
    one_by_one = task_batching == "map"

    def over_tasks(fn, *xs):
        """fn mapped over the leading (task) axis of the pytrees xs."""
        return jax.lax.map(lambda x: fn(*x), xs) if one_by_one else jax.vmap(fn)(*xs)

    def whole_set_loss(params, bank, idx, lab, weight, key, consts):
        feats = [f[idx] for f in bank]
        return hm.loss(hm.apply_with(params, feats, consts), lab, weight, key)

    def set_loss_and_grad(params, bank, idx, lab, weight, key, consts, with_grad: bool):
        """A set's loss, or its gradient, in one pass or chunk by chunk: each head's
        weighted mean over the set is the sum over chunks of the chunk's mean times the
        chunk's share of the head's total weight (the prior draws are the same in every
        chunk: the same key)."""
        if not chunk or idx.shape[0] <= chunk:
            fn = jax.grad(whole_set_loss) if with_grad else whole_set_loss
            return fn(params, bank, idx, lab, weight, key, consts)
        totals = {h: jnp.sum(w) for h, w in hm.weights(lab, weight).items()}

        def chunk_loss(p, i, l, w):
            losses = hm.losses(hm.apply_with(p, [f[i] for f in bank], consts), l, w, key)
            shares = hm.weights(l, w)
            return sum(loss * jnp.sum(shares[h]) / jnp.where(totals[h] > 0, totals[h], 1.0)
                       for h, loss in losses.items())

        return chunked_sum(jax.grad(chunk_loss) if with_grad else chunk_loss, params,
                           (idx, lab, weight), chunk)

    def task_loss_with(params, bank, idx, lab, weight, key, consts):
        return set_loss_and_grad(params, bank, idx, lab, weight, key, consts, False)

    def adapt_with(params, bank, idx, lab, weight, key, consts):
        for k in range(inner_steps):
            g = set_loss_and_grad(params, bank, idx, lab, weight, jax.random.fold_in(key, k),
                                  consts, True)
            if first_order:
                g = jax.lax.stop_gradient(g)
            params = jax.tree.map(lambda p, gi: p - inner_lr * loss_scale * gi, params, g)
        return params

    def per_task(params_g, bank, task, key, consts):
        k_in, k_out = jax.random.split(key)
        theta = adapt_with(params_g, bank, task["support_idx"], task["support_lab"],
                           task["support_weight"], k_in, consts)
        q = task_loss_with(theta, bank, task["query_idx"], task["query_lab"],
                           task["query_weight"], k_out, consts)
        return q * (loss_scale * query_batches), theta

    def outer(params_g, bank, tasks, weights, keys, consts):
        losses, thetas = over_tasks(lambda task, key: per_task(params_g, bank, task, key,
                                                               consts), tasks, keys)
        return jnp.sum(weights * losses), (losses, thetas)

    def pool_scores_of(theta, bank, pool_idx, consts):
        """[P] scores of the pool under one adapted model, `chunk` samples at a time."""
        def score(i):
            return hm.score(hm.apply_with(theta, [f[i] for f in bank], consts))
        if not chunk or len(pool_idx) <= chunk:
            return score(pool_idx)
        return jax.lax.map(score, chunk_rows(pool_idx, chunk)).reshape(-1)[:len(pool_idx)]

    def on_device(params, bank, tasks, weights, keys, pool_idx, consts):
        """One device's share of the tasks -> the loss and outer gradient summed over the
        devices, every task's loss [Tp] and pool scores [Tp, P]."""
        (loss, (losses, thetas)), grads = jax.value_and_grad(outer, has_aux=True)(
            params, bank, tasks, weights, keys, consts)
        pool_scores = over_tasks(lambda th: pool_scores_of(th, bank, pool_idx, consts),
                                 jax.lax.stop_gradient(thetas))
        return (jax.lax.psum(loss, DATA_AXIS), jax.lax.psum(grads, DATA_AXIS),
                jax.lax.all_gather(losses, DATA_AXIS, tiled=True),
                jax.lax.all_gather(pool_scores, DATA_AXIS, tiled=True))

    # check_vma=False: `params` is the same on every device, and JAX's varying-axis
    # checks would make each inner step's gradient with respect to it a sum over the
    # devices, adapting every task on the tasks of the other devices too
    sharded = jax.shard_map(on_device, mesh=mesh, check_vma=False,
                            in_specs=(P(), P(), P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS), P(),
                                      P()),
                            out_specs=(P(), P(), P(), P()))

    @jax.jit
    def step_with(params, opt_state, bank, tasks, weights, pool_idx, key, consts):
        n = weights.shape[0]
        keys = jax.random.split(key, n)
        # padded to a multiple of the devices: copies of the first tasks, outer weight 0
        rows = np.arange(-(-n // mesh.size) * mesh.size) % n
        padded = [jax.tree.map(lambda a: a[rows], x) for x in (tasks, keys)]
        weights_p = jnp.where(jnp.arange(len(rows)) < n, weights[rows], 0.0)
        loss, grads, losses, pool_scores = sharded(params, bank, padded[0], weights_p,
                                                   padded[1], pool_idx, consts)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "task_losses": losses[:n],
                                   "pool_scores": pool_scores[:n]}

    def step(params, opt_state, bank, tasks, weights, pool_idx, key):
        return step_with(params, opt_state, bank, tasks, weights, pool_idx, key, hm.consts)

    step.jitted = step_with

    def task_loss(params, bank, idx, lab, weight, key):
        return task_loss_with(params, bank, idx, lab, weight, key, hm.consts)

    def adapt(params, bank, idx, lab, weight, key):
        return adapt_with(params, bank, idx, lab, weight, key, hm.consts)

    return step, task_loss, adapt


def chunk_rows(a: jax.Array, chunk: int) -> jax.Array:
    """[N] -> [ceil(N / chunk), chunk]: the rows of `chunk` samples, the last padded with
    zeros."""
    return jnp.pad(a, (0, -a.shape[0] % chunk)).reshape(-1, chunk)


def chunked_sum(fn, params, samples: tuple, chunk: int):
    """sum over chunks of fn(params, *chunk's samples): a pytree (a loss, or a gradient).

    samples: arrays [N] (indices, labels, weights) cut into chunks of `chunk`, the last
    one padded with zeros (weight 0: padding adds nothing). A `lax.scan` over the chunks
    whose body is rematerialised (`jax.checkpoint`): differentiated (the outer gradient
    of MAML through an inner gradient), each chunk is recomputed in the backward pass
    instead of being kept, so memory holds one chunk's activations at a time.
    """
    rows = [chunk_rows(a, chunk) for a in samples]
    body = jax.checkpoint(lambda p, xs: fn(p, *xs))
    first = jax.eval_shape(body, params, [r[0] for r in rows])
    zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), first)

    def add(total, xs):
        return jax.tree.map(jnp.add, total, body(params, xs)), None

    return jax.lax.scan(add, zero, rows)[0]


@functools.lru_cache(maxsize=16)
def meta_step_program(fns: tuple, tx, inner_steps: int, inner_lr: float, first_order: bool,
                      mesh, chunk: int, task_batching: str, loss_scale: float,
                      query_batches: int):
    """`make_meta_step`'s step.jitted, made once per process for these head functions
    (`HeadModel.fns`), optimiser and settings: the seeds and settings of a run that
    share them share one jitted function, so it is traced, lowered and compiled once per
    input shapes (made per seed, every seed traced and lowered it anew before the
    persistent compilation cache could serve it: about 1.3 s a seed for AHL(DRA) at 64 px
    on a 2-core CPU, its trace and lowering). tx: one object per optimiser settings
    from `fsad.optim.optimizer_from_config` (`make_optimizer`'s cache)."""
    hm = HeadModel(*fns, init_with=None)
    return make_meta_step(hm, tx, inner_steps, inner_lr, first_order, mesh, chunk,
                          task_batching, loss_scale, query_batches)[0].jitted


CHUNK_SIZES = (256, 64, 16)  # what ahl.chunk_size=0 tries where the whole sets do not fit


def fitted_meta_step(hm: HeadModel, tx, a, mesh, args: tuple):
    """The meta-step compiled for args (`make_meta_step`'s step.jitted arguments), checked
    against the free memory of the mesh's devices before its first call.

    a: config.ahl. chunk_size N > 0: N samples of a set at a time; 0: the whole sets where
    that program fits, else the largest of CHUNK_SIZES that does (logged). On several
    hosts 0 means the whole sets: each host would judge its own free memory, and hosts
    that compiled different programs would wait on each other's collectives for ever.
    Raises UserError when none fits, naming the memory it needs and what to lower.
    """
    devices = list(mesh.devices.flat)
    several_hosts = jax.process_count() > 1
    chunks = [a.chunk_size] if a.chunk_size else [0] if several_hosts else [0, *CHUNK_SIZES]
    fix = (f"lower --config.ahl.chunk_size (now {a.chunk_size})" if a.chunk_size else
           "set --config.ahl.chunk_size (e.g. 64: the same result in less memory)"
           if several_hosts else "lower --config.data.img_size")
    if not a.first_order:
        fix += " or train with first-order MAML (--config.ahl.first_order=True)"
    for n, chunk in enumerate(chunks):
        jitted = meta_step_program(hm.fns, tx, a.inner_steps, a.inner_lr, a.first_order,
                                   mesh, chunk, a.task_batching, a.loss_scale,
                                   a.query_batches)
        what = "AHL's meta-step" + (f" ({chunk} samples of a set at a time)" if chunk else
                                    " (whole task sets)")
        with hint_on_oom(f"compiling {what}", fix):
            compiled = jitted.lower(*args).compile()  # JAX keeps it: once per shapes
        need, free = program_bytes(compiled), free_bytes(devices)
        if need is None or free is None or need <= free or n == len(chunks) - 1:
            check_fits(compiled, devices, what, fix)
            if chunk and not a.chunk_size:
                logging.warning("AHL: the meta-step on whole task sets does not fit the free "
                                "memory; it takes %d samples of a set at a time (%s, the "
                                "same result)", chunk, gib(need))
            return compiled
