"""fsad: few-shot and open-set supervised anomaly detection in JAX/Flax.

The pure pieces researchers compose:

    from fsad import sample_prior, deviation_loss, topk_mean
"""

__version__ = "0.1.0"

__all__ = ["binary_cross_entropy", "deviation", "deviation_loss", "focal_loss",
           "gaussian_p_value", "sample_prior", "topk_count", "topk_mean"]


def __getattr__(name):
    """The pieces are fsad.losses's, imported on first use: ``import fsad`` (and so the
    command line's first moment) imports no JAX (`fsad.interrupts.defer`)."""
    if name in __all__:
        from fsad import losses
        return getattr(losses, name)
    raise AttributeError(f"module 'fsad' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
