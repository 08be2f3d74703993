"""Methods: each builds a `fsad.train.Method` from a config."""

from fsad.methods.devnet import DevNetModel, devnet
from fsad.methods.dra import DRAModel, dra

METHODS = {"devnet": devnet, "dra": dra}


def base_method_name(config) -> str:
    """The trained network's method: config.method, or AHL's base (dra / devnet)."""
    return config.ahl.base if config.method == "ahl" else config.method


def build_method(config):
    """The Method that config.method names (for AHL: its base model's)."""
    name = base_method_name(config)
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)} (or ahl)")
    return METHODS[name](config)


__all__ = ["DRAModel", "DevNetModel", "METHODS", "base_method_name", "build_method", "devnet",
           "dra"]
