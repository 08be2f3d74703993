"""Methods: each builds a `fsad.train.Method` from a config (`build_method`).

The submodules `fsad.methods.devnet`, `fsad.methods.dra` and `fsad.methods.ahl` keep
their names: each method's builder is reached through METHODS, not bound over its
module's name (`fsad.methods.dra.DRAHeads` was an AttributeError on the function).
"""

from fsad.methods import devnet as _devnet
from fsad.methods import dra as _dra
from fsad.methods.devnet import DevNetModel
from fsad.methods.dra import DRAModel

METHODS = {"devnet": _devnet.devnet, "dra": _dra.dra}


def base_method_name(config) -> str:
    """The trained network's method: config.method, or AHL's base (dra / devnet)."""
    return config.ahl.base if config.method == "ahl" else config.method


def method_title(config) -> str:
    """The method as the papers write it: DevNet, DRA, AHL(DevNet) or AHL(DRA)."""
    titles = {"devnet": "DevNet", "dra": "DRA"}
    if config.method == "ahl":
        return f"AHL({titles.get(config.ahl.base, config.ahl.base)})"
    return titles.get(config.method, config.method)


def method_stages(config) -> list:
    """The method's own stages after base training and evaluation, run in order by
    fsad.experiment.run_seed: AHL's meta-training for config.method == "ahl"."""
    if config.method == "ahl":
        from fsad.methods.ahl import ahl_stage
        return [ahl_stage]
    return []


def build_method(config):
    """The Method that config.method names (for AHL: its base model's)."""
    name = base_method_name(config)
    if name not in METHODS:
        from fsad.errors import UserError
        raise UserError(f"method {name!r} is not known; use one of {', '.join(sorted(METHODS))} "
                        f"(or ahl with ahl.base dra or devnet)")
    return METHODS[name](config)


__all__ = ["DRAModel", "DevNetModel", "METHODS", "base_method_name", "build_method",
           "method_stages"]
