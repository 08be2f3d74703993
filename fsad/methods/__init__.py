"""Methods: each builds a `fsad.train.Method` from a config."""

from fsad.methods.devnet import DevNetModel, devnet

METHODS = {"devnet": devnet}


def build_method(config):
    """The Method that config.method names."""
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}; choose one of {sorted(METHODS)}")
    return METHODS[config.method](config)


__all__ = ["DevNetModel", "METHODS", "build_method", "devnet"]
