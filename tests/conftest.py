"""Test set-up: the CPU, an isolated cache, and a way to run a check on 8 devices.

The suite runs on one CPU device: on a 2-core machine 8 forced devices make every
step several times slower. The checks that are about sharding run in a subprocess
with 8 forced CPU devices (`run_with_devices`).
"""

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' programs run for milliseconds on tiny images and compile for seconds: XLA's
# backend optimisations (LLVM -O0, its expensive passes off) cost more than they save,
# so the suite and the subprocesses it starts compile without them (about 25% less
# time for the in-process tests), and without XLA's CPU fusion emitters (the MLIR
# ones, on by default in current JAX: elementwise fusions then go through the older
# emitter, whose programs compile in a quarter to a third less CPU time,
# tests/TIMINGS.md; the flag is known from jax 0.7.0, the lowest version allowed, on). The
# end-to-end CLI runs, which train for longer, choose for themselves
# (tests/test_end_to_end.py). FSAD_TEST_OPTIMIZE=1 compiles everything as a user's run
# does.
UNOPTIMIZED = os.environ.get("FSAD_TEST_OPTIMIZE") != "1"
QUICK_COMPILE_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"
# XLA's own defaults, which a user's run compiles with, as `jax.jit(compiler_options=...)`
# for an in-process program that runs for longer than it compiles (the opposite of
# fsad.quick_compile.UNOPTIMIZED)
USER_COMPILE_OPTIONS = {"xla_backend_optimization_level": 2,
                        "xla_llvm_disable_expensive_passes": False}


def with_xla_flags(flags: str, *more: str) -> str:
    """XLA_FLAGS `flags` with each of `more` added where it is not there yet."""
    return " ".join([flags.strip(), *(m for m in more if m not in flags.split())]).strip()


if UNOPTIMIZED:
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    os.environ["XLA_FLAGS"] = with_xla_flags(os.environ.get("XLA_FLAGS", ""),
                                             QUICK_COMPILE_XLA_FLAGS)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # configs/ is not a package
    sys.path.insert(0, ROOT)

SIZE = 32  # tiny images keep the suite fast on a 2-core CPU


def pytest_collection_modifyitems(items):
    """The end-to-end file first, the rest in their order. It is the longest file (its
    fixture trains three models by the command line, one after another under
    pytest-xdist: minutes), so with the two workers of setup.cfg (`--dist loadfile
    --no-loadscope-reorder`: a file to a worker, in this order) it starts at once
    instead of ending last, while the other worker takes the other files."""
    items.sort(key=lambda item: item.path.name != "test_end_to_end.py")  # a stable sort


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """An isolated fsad cache, and JAX's persistent compilation cache beside it, shared
    by the session's pytest-xdist workers: the many tests that compile the same small
    steps (and their CLI subprocesses, which inherit FSAD_CACHE and FSAD_COMPILE_CACHE)
    compile each program once per session, whichever worker runs them."""
    os.environ["FSAD_CACHE"] = str(tmp_path_factory.mktemp("fsad_cache"))
    session = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        session = session.parent  # a worker's folder sits in the session's
    os.environ["FSAD_COMPILE_CACHE"] = str(session / "jax_compilation_cache")
    from fsad.compile_cache import enable_compilation_cache
    enable_compilation_cache()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """The procedural MVTec-layout dataset at SIZE px (written once per session)."""
    from fsad.data.synthetic import write_synthetic_dataset
    return write_synthetic_dataset(str(tmp_path_factory.mktemp("synthetic")), size=SIZE,
                                   n_train=60, n_test_good=20, n_per_class=12, seed=0)


@pytest.fixture(scope="session")
def synthetic(synthetic_root):
    from fsad.data import read_folder
    return read_folder(synthetic_root, SIZE, cache_dir="")


def tiny_config(method="devnet", **overrides):
    """A method's config for SIZE-px synthetic data, a few steps, batch 16, a checkpoint
    after every epoch."""
    import importlib
    c = importlib.import_module(f"configs.{method}").get_config()
    c.data.name = "synthetic"
    c.data.img_size = SIZE
    c.data.cache_dir = ""
    c.model.pretrained = "none"  # no download in tests; weight loading has its own tests
    c.batch_size = 16
    c.epochs = 3
    c.steps_per_epoch = 10
    c.eval_batch_size = 32
    # a checkpoint after every epoch, where the tests' interruptions expect one
    # (test_train.py checks the default pace)
    c.checkpoint_seconds = 0.0
    for key, value in overrides.items():
        node = c
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return c


def assert_same_rows(rows, data, splits: bool = True):
    """`rows` (a dataset without its pixels) lists the rows of `data`, the same dataset
    decoded, in its order and split, and (splits) gives the same protocol splits: general
    10-shot and hard 1-shot on the first anomaly class, which a set of fewer than a shot
    pool of anomalies per class cannot give."""
    from fsad.data import make_split
    assert rows.name == data.name and rows.images.shape == (len(data.labels), 0, 0, 3)
    assert rows.masks is None
    for field in ("labels", "classes", "split", "file_ids"):
        np.testing.assert_array_equal(getattr(rows, field), getattr(data, field))
    known = data.anomaly_classes[0]
    for setting, n, known_class in [("general", 10, None), ("hard", 1, known)] * splits:
        a, b = (make_split(d, setting, n, known_class, contamination=0.05, seed=1)
                for d in (rows, data))
        for field in ("train_normal", "train_anomaly", "test", "contamination"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def norm_rel_err(a, b) -> float:
    """||a - b|| / ||a|| (Frobenius): the norm-wise relative error that suits float
    reductions and bfloat16 rounding, where single elements can be far apart."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))


@contextlib.contextmanager
def compiled_programs(caplog):
    """Collects into the yielded list the names of the programs JAX compiles inside the
    block (e.g. "step_with"; one that the persistent compilation cache serves counts too:
    JAX logs it as compiled before it looks there). A program already compiled in this
    process is not named."""
    import jax
    names = []
    caplog.clear()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        yield names
    names.extend(m[len("Compiling jit("):m.index(")")] for m in
                 (r.getMessage() for r in caplog.records) if m.startswith("Compiling jit("))


def cpu_env(devices: int = 1, optimize: bool = False) -> dict:
    """The environment of a process the suite starts: JAX on `devices` CPU devices
    (default one), the suite's fsad cache (and compilation cache), XLA's backend
    optimisations off as in the suite (see above), or on, as in a user's run, where
    `optimize` is True."""
    e = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_DISABLE_MOST_OPTIMIZATIONS")}
    e["JAX_PLATFORMS"] = "cpu"
    flags = ""
    if not optimize and UNOPTIMIZED:
        e["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
        flags = QUICK_COMPILE_XLA_FLAGS
    if devices > 1:
        flags = with_xla_flags(flags, f"--xla_force_host_platform_device_count={devices}")
    if flags:
        e["XLA_FLAGS"] = flags
    return e


def run_with_devices(n: int, module: str, function: str, *args, timeout: int = 600):
    """Runs tests/<module>.py's function(*args) in a Python with n forced CPU devices and
    returns what it returned (JSON)."""
    env = cpu_env(n)
    code = (f"import json, sys; sys.path[:0] = [{os.path.dirname(__file__)!r}, {ROOT!r}]; "
            f"from {module} import {function}; "
            f"print('RESULT' + json.dumps({function}(*{list(args)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=timeout)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT"):])


def parse_command_line(args: list):
    """fsad.main's flags `args` (without the program) parsed as fsad.main parses them
    (`fsad.main.parse_flags`: absl's flags, the config file and its --config.FIELD
    overrides), in this process; a config file path under configs/ is the repository's.
    -> the config. A command fsad.main refuses raises SystemExit(2), its one line on
    stderr. The flags are left unparsed, and the overrides' flags (ml_collections defines
    them as it parses, from sys.argv) undefined, as before."""
    from absl import flags

    from fsad import main
    argv = ["fsad.main", *(os.path.join(ROOT, a) if a.startswith("configs/") else a
                           for a in args)]
    argv_before, sys.argv = sys.argv, argv
    try:
        main.parse_flags(argv)
        return main._CONFIG.value
    finally:
        sys.argv = argv_before
        flags.FLAGS.unparse_flags()
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:
            delattr(flags.FLAGS, name)


def coordinator_address() -> str:
    """A free localhost port for the coordinator of a multi-process (multi-host) run."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return f"localhost:{s.getsockname()[1]}"
