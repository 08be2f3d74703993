"""Optimisers as the released PyTorch code builds them."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax


def step_decay(lr: float, steps_per_epoch: int, every_epochs: int, factor: float,
               at_epoch_start: bool = False) -> optax.Schedule:
    """PyTorch's StepLR(step_size=every_epochs, gamma=factor) as an optax schedule.

    at_epoch_start: the released DRA code calls scheduler.step() at the start of each
    epoch, so epoch e (0-based) runs at lr * factor ** ((e + 1) // every): the decays
    fall after epochs 9, 19, 29 for every = 10. False: called at the end of each epoch
    (the released DevNet code), lr * factor ** (e // every).
    """
    shift = 1 if at_epoch_start else 0

    def schedule(step):
        epoch = step // steps_per_epoch
        return lr * jnp.power(factor, (epoch + shift) // every_epochs)

    return schedule


def clip_grad_norm(max_norm: float, eps: float = 1e-6) -> optax.GradientTransformation:
    """PyTorch's `torch.nn.utils.clip_grad_norm_(params, max_norm)` as an optax
    transformation: every gradient times min(1, max_norm / (‖g‖ + eps)), ‖g‖ the global
    L2 norm. optax.clip_by_global_norm divides by ‖g‖ itself, 1e-6 / ‖g‖ apart (relative)
    on the steps that clip."""

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)  # (optax.global_norm is deprecated)
        coef = jnp.minimum(max_norm / (norm + eps), 1.0)
        return jax.tree.map(lambda g: g * coef.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


@functools.lru_cache(maxsize=None)
def make_optimizer(lr: float, weight_decay: float = 0.0, steps_per_epoch: int = 1,
                   decay_every_epochs: int = 0, decay_factor: float = 0.1,
                   clip_norm: float = 0.0,
                   decay_at_epoch_start: bool = False) -> optax.GradientTransformation:
    """Adam with PyTorch-style (coupled, L2) weight decay, step decay and clipping.

    Order as in PyTorch: the raw gradient is clipped (`clip_grad_norm_`), then
    `weight_decay * param` is added (torch.optim.Adam's weight_decay), then Adam.

    Args:
      lr: base learning rate.
      weight_decay: L2 coefficient added to the gradient.
      steps_per_epoch: to turn `decay_every_epochs` into steps.
      decay_every_epochs: multiply lr by `decay_factor` every this many epochs (0: never).
      clip_norm: global-norm clipping threshold (0: none).
      decay_at_epoch_start: see `step_decay`.

    Made once per process for the same arguments (an optax transformation is a pair of
    pure functions): a jitted step that closes over it is the same function for every
    seed of a run (`fsad.methods.ahl.meta_step.meta_step_program`).
    """
    schedule = lr
    if decay_every_epochs:
        schedule = step_decay(lr, steps_per_epoch, decay_every_epochs, decay_factor,
                              decay_at_epoch_start)
    parts = []
    if clip_norm:
        parts.append(clip_grad_norm(clip_norm))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.adam(schedule))
    return optax.chain(*parts)


def optimizer_from_config(optim_cfg, steps_per_epoch: int) -> optax.GradientTransformation:
    """`make_optimizer` from a config's optim.* fields."""
    o = optim_cfg
    return make_optimizer(o.lr, o.weight_decay, steps_per_epoch, o.decay_every_epochs,
                          o.decay_factor, o.clip_norm, o.get("decay_at_epoch_start", False))
