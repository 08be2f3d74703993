"""pyproject.toml's lowest versions are the ones the suite was run with: every `>=` floor
of its dependencies (and of the cuda12 extra's jax) is pinned to that version in
.ci/lowest_versions.txt, the constraints file the README's lowest-versions command uses."""

import os
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT


def floors(requirements: list[str]) -> dict[str, Version]:
    """{package: its `>=` version} of PEP 508 requirement strings."""
    out = {}
    for text in requirements:
        req = Requirement(text)
        for spec in req.specifier:
            if spec.operator == ">=":
                out[canonicalize_name(req.name)] = Version(spec.version)
    return out


def lowest_pins() -> dict[str, Version]:
    """{package: version} of the `name==version` lines of .ci/lowest_versions.txt."""
    pins = {}
    with open(os.path.join(ROOT, ".ci", "lowest_versions.txt")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if "==" in line:
                name, version = line.split("==")
                pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_floor_is_the_pinned_lowest_version():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    required, pins = floors(project["dependencies"]), lowest_pins()
    assert len(required) == len(project["dependencies"])  # every dependency has a floor
    assert {n: pins.get(n) for n in required} == required
    assert floors(project["optional-dependencies"]["cuda12"]) == {"jax": required["jax"]}
    assert pins["jaxlib"] == pins["jax"]  # jax X needs jaxlib X


def test_no_module_is_hidden_by_a_name_of_its_package():
    """Every module of fsad is the attribute of its package's name for it: the README's
    `fsad.methods.dra.DRAHeads` was an AttributeError, fsad.methods having bound the
    method's builder function `dra` over the module's name (fsad.methods.devnet and
    fsad.methods.ahl.meta_train the same; the tests reached them by importlib)."""
    import importlib
    import pkgutil
    import sys

    import fsad
    hidden = []
    for info in pkgutil.walk_packages(fsad.__path__, "fsad."):
        module = importlib.import_module(info.name)
        parent, _, name = info.name.rpartition(".")
        if getattr(sys.modules[parent], name) is not module:
            hidden.append(info.name)
    assert hidden == []
    from fsad.methods.dra import DRAHeads
    assert fsad.methods.dra.DRAHeads is DRAHeads
