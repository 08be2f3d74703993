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
from fsad.models.sequence import ScoreSequenceModel
from fsad.quick_compile import quick_jit

ERROR_SCALES = ("minmax", "raw")


def check_error_scale(error_scale: str) -> None:
    """Raises UserError unless error_scale is one of ERROR_SCALES."""
    if error_scale not in ERROR_SCALES:
        raise UserError(f"ahl.error_scale={error_scale!r}; use minmax (psi's scores scaled "
                        f"to [0, 1] before the errors) or raw (Eq. 6)")


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
    check_error_scale(error_scale)
    p = np.asarray(predicted, np.float64)
    if error_scale == "minmax":
        p = (p - p.min()) / max(p.max() - p.min(), 1e-12)
    err = (p.T - labels[None].astype(np.float64)) ** 2  # [T, P]
    return (coef * err).sum(1) / np.maximum((coef > 0).sum(1), 1)


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
    r = generalisation_errors(predicted, labels, coef, error_scale)
    if relative:
        r = r / max(float(r.mean()), 1e-12)
    z = -r / temperature
    e = np.exp(z - z.max())
    return (e / e.sum()).astype(np.float32)


def weight_spread(w) -> float:
    """max(w) / min(w): 1 means equal weights."""
    w = np.asarray(w, np.float64)
    return float(w.max() / max(w.min(), 1e-30))


def make_psi_fns(num_tasks: int, hidden: int, fc: int, lr: float):
    """(init(key, K) -> (params, opt_state), train_step, predict) for psi."""
    model = ScoreSequenceModel(num_tasks, hidden, fc)
    tx = optax.adam(lr)

    @functools.partial(quick_jit, static_argnums=1)  # called once
    def init(key, k):
        params = model.init(key, jnp.zeros((1, k, num_tasks)))["params"]
        return params, tx.init(params)

    @jax.jit
    def train_step(params, opt_state, seqs, targets):
        def loss_fn(p):
            return jnp.mean((model.apply({"params": p}, seqs) - targets) ** 2)
        loss, g = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def predict(params, seqs):
        return model.apply({"params": params}, seqs)

    return init, train_step, predict
