"""Methods: each builds a `fsad.train.Method` from a config."""

from fsad.methods.devnet import DevNetModel, devnet
from fsad.methods.dra import DRAModel, dra

METHODS = {"devnet": devnet, "dra": dra}


def build_method(config):
    """The Method that config.method names."""
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}; choose one of {sorted(METHODS)}")
    return METHODS[config.method](config)


__all__ = ["DRAModel", "DevNetModel", "METHODS", "build_method", "devnet", "dra"]
