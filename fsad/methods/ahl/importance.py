"""AHL's importance weights (spec §7 step 4): the BiLSTM psi that predicts each pool
sample's next-epoch scores under the T models, and the weights w = softmax(-r) from the
generalisation errors r of those predictions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fsad.errors import UserError
from fsad.methods.ahl.tasks import NORMAL, PSEUDO, SEEN
from fsad.models.sequence import ScoreSequenceModel, released_initial_state
from fsad.quick_compile import quick_jit

ERROR_SCALES = ("minmax", "raw")


def check_error_scale(error_scale: str) -> None:
    """Raises UserError unless error_scale is one of ERROR_SCALES."""
    if error_scale not in ERROR_SCALES:
        raise UserError(f"ahl.error_scale={error_scale!r}; use minmax (psi's scores scaled "
                        f"to [0, 1] before the errors) or raw (Eq. 6)")


def scaled_scores(predicted: np.ndarray, error_scale: str) -> np.ndarray:
    """[..., P, T] float64: psi's predicted scores as the errors take them, min-max
    scaled jointly to [0, 1] ("minmax") or as they are ("raw")."""
    check_error_scale(error_scale)
    p = np.asarray(predicted, np.float64)
    if error_scale == "minmax":
        p = (p - p.min()) / max(p.max() - p.min(), 1e-12)
    return p


def generalisation_errors(predicted: np.ndarray, labels: np.ndarray,
                          coef: np.ndarray, error_scale: str = "minmax") -> np.ndarray:
    """r_i = sum_j c_ij (s'_ji - y_j)^2 / |{j: c_ij > 0}| (spec §7, the paper's Eq. 6).

    Args:
      predicted: [P, T] predicted scores of the T models.
      labels: [P] {0, 1}; coef: [T, P] c_j per model (0 = excluded).
      error_scale: "minmax" scales the scores jointly to [0, 1] first (fsad's default:
        scores live on the deviation scale, labels in {0, 1}); "raw" takes them as they
        are, as Eq. 6 and the released code's get_reward do.
    Returns:
      r: [T] float64.
    """
    p = scaled_scores(predicted, error_scale)
    err = (p.T - labels[None].astype(np.float64)) ** 2  # [T, P]
    return (coef * err).sum(1) / np.maximum((coef > 0).sum(1), 1)


# the released get_reward's weights of its classes' errors
RELEASED_CLASS_WEIGHTS = {NORMAL: 0.5, PSEUDO: 0.5, SEEN: 1.0}


def released_errors(predicted: np.ndarray, classes: np.ndarray, in_query: np.ndarray,
                    error_scale: str = "raw") -> np.ndarray:
    """The released code's r_i (main.py: get_reward, summed over the query sets): for each
    class c (normals against 0; pseudo and seen anomalies against 1), the sum over the
    query sets of the mean squared error of model i's scores on that set's class-c
    samples, divided by the class's count over all the query sets; r_i = 0.5 r_normal +
    0.5 r_pseudo + 1.0 r_seen. Every model is judged on every query sample, its own
    support's included (Eq. 6's c_j and exclusions do not appear). A query set without
    a class adds nothing to that class, and a class no query set has adds 0 (the released
    code skips a set without pseudo anomalies, takes NaN from a set without normals or
    seen anomalies, and divides 0 by 0, an error, where no set has pseudo anomalies).

    Args:
      predicted: [P, T] predicted scores of the T models on the pool, or [Q, P, T] each
        query set's own (the released code calls psi once per set, each call with its
        own random initial state and dropout masks).
      classes: [P] NORMAL, SEEN or PSEUDO; in_query: [Q, P] 1 where a pool sample is in
        query set q (`Tasks.pool_in_query_sets`).
    Returns:
      r: [T] float64.
    """
    p = scaled_scores(predicted, error_scale)
    err = (p - (classes != NORMAL)[:, None]) ** 2  # [P, T] or [Q, P, T]
    err = np.broadcast_to(err, (len(in_query),) + err.shape[-2:])  # [Q, P, T]
    r = np.zeros(p.shape[-1])
    for c, weight in RELEASED_CLASS_WEIGHTS.items():
        member = np.asarray(in_query, np.float64) * (classes == c)[None]  # [Q, P]
        counts = member.sum(1)  # [Q]
        if not counts.sum():
            continue
        sums = np.einsum("qp,qpt->qt", member, err)  # [Q, T]
        means = sums[counts > 0] / counts[counts > 0, None]  # [Q', T]
        r += weight * means.sum(0) / counts.sum()
    return r


def weights_from_errors(r: np.ndarray, temperature: float = 0.1,
                        relative: bool = True) -> np.ndarray:
    """w = softmax(-(r / mean(r)) / temperature) of the errors r [T]; with relative=False,
    softmax(-r / temperature). Returns [T] float32, summing to 1."""
    if relative:
        r = r / max(float(r.mean()), 1e-12)
    z = -r / temperature
    e = np.exp(z - z.max())
    return (e / e.sum()).astype(np.float32)


def importance_weights(predicted: np.ndarray, labels: np.ndarray, coef: np.ndarray,
                       temperature: float = 0.1, relative: bool = True,
                       error_scale: str = "minmax") -> np.ndarray:
    """w = softmax(-(r / mean(r)) / temperature), r from `generalisation_errors`; with
    relative=False, softmax(-r / temperature) (temperature 1 and error_scale "raw": the
    paper's Eq. 6 and 7).

    softmax(-r) depends on the scores' scale: on [0, 1]-scaled scores it leaves w within
    a few percent of 1/T whatever the tasks' quality (the r_i differ by ~0.01); on raw
    deviation-scale scores (normals near 0 or below, anomalies at 5 and more) the r_i
    are tens apart by units, and w is close to one-hot. Dividing r by its mean makes the
    weights scale-free: a model whose error is `temperature` (10% by default) above
    another's gets e^-1 of its weight.

    Returns:
      w: [T] float32, summing to 1.
    """
    return weights_from_errors(generalisation_errors(predicted, labels, coef, error_scale),
                               temperature, relative)


def weight_spread(w) -> float:
    """max(w) / min(w): 1 means equal weights."""
    w = np.asarray(w, np.float64)
    return float(w.max() / max(w.min(), 1e-30))


PSI_FITS = ("pool", "query_sets")
ERROR_FORMS = ("paper", "released")


def make_psi_fns(num_tasks: int, a):
    """(init(key, K) -> (params, opt_state), train_step, predict) for psi, from the
    config's `ahl` fields: psi_hidden, psi_fc, psi_dropout, psi_module, psi_initial_state,
    psi_lr, psi_weight_decay.

    train_step(params, opt_state, seqs [P, K, T], targets [P, T], rows [P], key) ->
      (params, opt_state, loss): one Adam step on the mean squared error over the rows
      where `rows` is 1 (all of them: the pool; one task's query set: the released fit).
    predict(params, seqs [P, K, T], key) -> [P, T].
    The key draws the dropout masks and, with psi_initial_state=uniform, the LSTM's
    initial state: the released psi draws both anew on every call (it never leaves
    PyTorch's train mode); with neither, the key is unused.

    Made once per process for the same T and fields, so that the seeds of a run with as
    many tasks trace psi's functions once, not once each.
    """
    return _psi_fns(num_tasks, a.psi_hidden, a.psi_fc, a.psi_dropout, a.psi_module,
                    a.psi_initial_state, a.psi_lr, a.psi_weight_decay)


@functools.lru_cache(maxsize=32)
def _psi_fns(num_tasks: int, hidden: int, fc: int, dropout: float, module: str,
             initial_state: str, lr: float, weight_decay: float) -> tuple:
    """`make_psi_fns` for these field values."""
    model = ScoreSequenceModel(num_tasks, hidden, fc, dropout=dropout,
                               torch_modules=module == "torch")
    # PyTorch's Adam(weight_decay=wd) adds wd * param to the gradient before its moments
    tx = (optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr))
          if weight_decay else optax.adam(lr))
    random_state = initial_state == "uniform"

    def apply(params, seqs, key):
        k_state, k_drop = jax.random.split(key)
        state = (released_initial_state(k_state, model.layers, seqs.shape[0], model.hidden)
                 if random_state else None)
        return model.apply({"params": params}, seqs, state,
                           k_drop if model.dropout else None)

    @functools.partial(quick_jit, static_argnums=1)  # called once a seed
    def init(key, k):
        params = model.init(key, jnp.zeros((1, k, num_tasks)))["params"]
        return params, tx.init(params)

    @jax.jit
    def train_step(params, opt_state, seqs, targets, rows, key):
        def loss_fn(p):
            err = (apply(p, seqs, key) - targets) ** 2 * rows[:, None]
            return err.sum() / (rows.sum() * num_tasks)
        loss, g = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def predict(params, seqs, key):
        return apply(params, seqs, key)

    return init, train_step, predict
