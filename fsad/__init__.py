"""fsad: few-shot and open-set supervised anomaly detection in JAX/Flax.

The pure pieces researchers compose:

    from fsad import sample_prior, deviation_loss, topk_mean
"""

__version__ = "0.1.0"

__all__ = ["binary_cross_entropy", "deviation", "deviation_loss", "focal_loss",
           "gaussian_p_value", "sample_prior", "topk_count", "topk_mean"]


def __getattr__(name):
    """The pieces are fsad.losses's, and the submodules fsad's, imported on first use:
    ``import fsad`` (and so the command line's first moment) imports no JAX
    (`fsad.interrupts.defer`); ``fsad.losses`` still reads as a submodule."""
    import importlib
    if name in __all__:
        return getattr(importlib.import_module("fsad.losses"), name)
    try:
        return importlib.import_module(f"fsad.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"fsad.{name}":  # a module it imports is missing: that error
            raise
    raise AttributeError(f"module 'fsad' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
