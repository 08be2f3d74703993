"""Optimisers as the released PyTorch code builds them."""

from __future__ import annotations

import optax


def make_optimizer(lr: float, weight_decay: float = 0.0, steps_per_epoch: int = 1,
                   decay_every_epochs: int = 0, decay_factor: float = 0.1,
                   clip_norm: float = 0.0) -> optax.GradientTransformation:
    """Adam with PyTorch-style (coupled, L2) weight decay, step decay and clipping.

    Order as in PyTorch: the raw gradient is clipped (`clip_grad_norm_`), then
    `weight_decay * param` is added (torch.optim.Adam's weight_decay), then Adam.

    Args:
      lr: base learning rate.
      weight_decay: L2 coefficient added to the gradient.
      steps_per_epoch: to turn `decay_every_epochs` into steps.
      decay_every_epochs: multiply lr by `decay_factor` every this many epochs (0: never).
      clip_norm: global-norm clipping threshold (0: none).
    """
    schedule = lr
    if decay_every_epochs:
        schedule = optax.exponential_decay(lr, decay_every_epochs * steps_per_epoch,
                                           decay_factor, staircase=True)
    parts = []
    if clip_norm:
        parts.append(optax.clip_by_global_norm(clip_norm))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.adam(schedule))
    return optax.chain(*parts)


def optimizer_from_config(optim_cfg, steps_per_epoch: int) -> optax.GradientTransformation:
    """`make_optimizer` from a config's optim.* fields."""
    o = optim_cfg
    return make_optimizer(o.lr, o.weight_decay, steps_per_epoch, o.decay_every_epochs,
                          o.decay_factor, o.clip_norm)
