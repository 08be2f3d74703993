"""benchmarks/session_state.py: a table's finished seeds and the compiled programs carried
from one machine to the next (a lent GPU machine starts bare), where reproduce.py goes on
with the table and JAX finds the programs."""

import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from benchmarks import reproduce
from benchmarks import session_state as state_tool
from conftest import ROOT, cpu_env

pytestmark = pytest.mark.slow


def table_argv(out, root, seeds):
    return ["--dataset", "folder", "--methods", "devnet", "ahl_devnet", "--shots", "1",
            "--seeds", str(seeds), "--out", str(out),
            *[f"--set={kv}" for kv in (
                f"data.root={root}", "data.img_size=64", "data.cache_dir=",
                "model.pretrained=none", "model.backbone=alexnet", "model.n_scales=1",
                "batch_size=8", "epochs=1", "steps_per_epoch=2", "explain.enabled=False",
                "ahl.epochs=2", "ahl.history=2", "ahl.psi_steps=2", "ahl.first_order=True")]]


def cell_runs(out, method):
    return json.loads((out / method / "general" / "1shot" / "results.json").read_text())["runs"]


def test_a_table_carried_to_another_machine_goes_on_there(tmp_path, synthetic_root):
    """A DevNet cell and an AHL(DevNet) cell on its trained model, one seed, packed; the
    first machine's folder removed; unpacked elsewhere, where the table goes on with two
    seeds: the carried seeds are read back (not trained again), the new DevNet seed
    trains, and the new AHL seed trains its base itself (the base cell's checkpoints did
    not travel)."""
    first, second, state = tmp_path / "first", tmp_path / "second", tmp_path / "state.tgz"
    assert reproduce.main(table_argv(first, synthetic_root, 1)) == 0
    devnet_0, ahl_0 = cell_runs(first, "devnet")[0], cell_runs(first, "ahl_devnet")[0]
    base_cell = str(first / "devnet" / "general" / "1shot")
    assert ahl_0["steps"] == 0 and ahl_0["resumed_from"] == 2  # started from the DevNet cell

    # a finished AHL seed is read back without its base model: the table reruns after
    # the base cell's checkpoints are gone
    shutil.rmtree(os.path.join(base_cell, "seed_0", "checkpoints"))
    assert reproduce.main(table_argv(first, synthetic_root, 1)) == 0
    assert cell_runs(first, "ahl_devnet")[0] == ahl_0

    assert state_tool.main(["pack", str(first), str(state), "--cache", ""]) == 0
    with tarfile.open(state) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("state.json"))
        ahl_config = json.load(tar.extractfile("runs/ahl_devnet/general/1shot/config.json"))
        carried = json.load(tar.extractfile("runs/ahl_devnet/general/1shot/carried.json"))
    assert "runs/devnet/general/1shot/seed_0/metrics.json" in names
    assert "runs/ahl_devnet/general/1shot/seed_0/test_scores.npz" in names
    assert "runs/table.md" in names
    assert not [n for n in names if "checkpoints" in n or "features" in n or ".lock" in n]
    assert sorted(manifest["finished_seeds"]) == ["ahl_devnet/general/1shot/seed_0",
                                                  "devnet/general/1shot/seed_0"]
    assert ahl_config["ahl"]["base_workdir"] == ""
    assert carried["ahl.base_workdir"] == base_cell
    assert carried["finished_seeds_on_that_base"] == [0]
    shutil.rmtree(first)  # the machine goes back

    assert state_tool.main(["unpack", str(state), str(second), "--cache", ""]) == 0
    # a new AHL cell does not start from a carried base cell, which kept no checkpoint
    alone = tmp_path / "devnet_alone"
    shutil.copytree(second / "devnet", alone / "devnet")
    args = reproduce.parse_args(table_argv(alone, synthetic_root, 1))
    configs = reproduce.method_configs(args.methods, args.variants, args.set, args.dataset)
    cell = {"method": "ahl_devnet", "setting": "general", "known_class": "", "shots": 1}
    config = reproduce.cell_config(configs, cell, args)
    assert reproduce.base_cell_workdir(cell, configs, config, str(alone), 1) == ""

    assert reproduce.main(table_argv(second, synthetic_root, 2)) == 0
    devnet, ahl = cell_runs(second, "devnet"), cell_runs(second, "ahl_devnet")
    assert devnet[0] == devnet_0 and ahl[0] == ahl_0  # read back, wall times and all
    assert devnet[1]["seed"] == 1 and devnet[1]["steps"] == 2
    assert ahl[1]["seed"] == 1 and ahl[1]["steps"] == 2 and "base_auroc" in ahl[1]
    table = json.loads((second / "table.json").read_text())
    assert [r["seeds"] for r in table["rows"]] == [2, 2]
    # a second unpack writes nothing over what this machine made
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "session_state.py"),
                           "unpack", str(state), str(second), "--cache", ""],
                          capture_output=True, text=True, env=cpu_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "0 files into" in done.stdout and f"{len(names) - 1} files already here kept" \
        in done.stdout, done.stdout
    assert cell_runs(second, "devnet")[1] == devnet[1]


PROGRAM = """
import jax, jax.numpy as jnp
from fsad.compile_cache import enable_compilation_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
enable_compilation_cache()
f = jax.jit(lambda x: jnp.sin(x) @ x.T + 1.5)
f(jnp.ones((8, 8))).block_until_ready()
print(events.count("/jax/compilation_cache/cache_hits"),
      events.count("/jax/compilation_cache/cache_misses"))
"""


def test_carried_programs_are_found_by_jax_on_the_next_machine(tmp_path, capsys):
    """A program compiled with a compilation cache, packed; the cache removed (the machine
    goes back) and unpacked at the same path (fsad's default on every lent machine): a
    new process loads the programs instead of compiling them. Unpacked at another path,
    the tool says that JAX will not find them there."""
    cache, state, runs = tmp_path / "cache", tmp_path / "state.tgz", str(tmp_path / "runs")

    def compile_program():
        done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True,
                              text=True, timeout=120,
                              env={**cpu_env(), "FSAD_COMPILE_CACHE": str(cache)})
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.split()

    hits, misses = compile_program()  # compiled (jnp.ones too), and kept in the cache
    assert hits == "0" and int(misses) >= 1
    assert state_tool.main(["pack", str(tmp_path / "no_runs"), str(state), "--cache",
                            str(cache)]) == 0
    kept = sorted(os.listdir(cache))
    shutil.rmtree(cache)
    assert state_tool.main(["unpack", str(state), runs, "--cache", str(cache)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert sorted(os.listdir(cache)) == kept
    assert compile_program() == [misses, "0"]  # each found, none compiled
    assert state_tool.main(["unpack", str(state), runs, "--cache",
                            str(tmp_path / "elsewhere")]) == 0
    assert f"packed from the cache {cache}; JAX finds them only in a folder of that path" \
        in capsys.readouterr().err


def test_the_cache_carries_autotuning_first_then_the_programs_last_used(tmp_path):
    cache = tmp_path / "cache"
    (cache / state_tool.AUTOTUNE).mkdir(parents=True)
    (cache / state_tool.AUTOTUNE / "tuned.textproto").write_bytes(b"t" * 500)
    for i, size in enumerate((3000, 2000, 1000, 4000)):  # written in this order
        path = cache / f"jit_step{i}-cache"
        path.write_bytes(b"p" * size)
        os.utime(path, (1000 + i, 1000 + i))
    # 500 + 4000 (the newest) + 1000 fit in 6000; 2000 and 3000 (the oldest) are left out
    chosen, left, left_bytes = state_tool.cache_files(str(cache), 6000)
    assert [rel for rel, _ in chosen] == [os.path.join(state_tool.AUTOTUNE, "tuned.textproto"),
                                         "jit_step3-cache", "jit_step2-cache"]
    assert (left, left_bytes) == (2, 5000)
    # the oldest program read since (a carried program that JAX loaded) goes first
    os.utime(cache / "jit_step0-cache", (2000, 1000))
    chosen, left, _ = state_tool.cache_files(str(cache), 6000)
    assert [rel for rel, _ in chosen][1:] == ["jit_step0-cache", "jit_step2-cache"]
    assert state_tool.cache_files(str(tmp_path / "none"), 6000) == ([], 0, 0)


def test_the_script_imports_no_jax():
    """gpu_session.sh packs after every stage: the script imports no JAX and no Flax
    (their import was 2.5 s of its 3 s, a stage's worth of checks in CHECK=1)."""
    script = os.path.join(ROOT, "benchmarks", "session_state.py")
    code = (f"import runpy, sys; runpy.run_path({script!r}); "
            f"print('jax' in sys.modules, 'flax' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=cpu_env(), timeout=120)
    assert done.stdout == "False False\n", done.stderr


def test_a_state_file_not_of_this_script_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.tgz"
    with tarfile.open(bad, "w:gz") as tar:
        state_tool.add_bytes(tar, "runs/../../outside.txt", b"x")
    assert state_tool.main(["unpack", str(bad), str(tmp_path / "runs"), "--cache", ""]) == 2
    assert "holds 'runs/../../outside.txt', which is no file of a run" in capsys.readouterr().err
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "runs").exists()
    for name, text in (("missing.tgz", None), ("corrupt.tgz", "not a tar")):
        if text:
            (tmp_path / name).write_text(text)
        assert state_tool.main(["unpack", str(tmp_path / name), str(tmp_path / "runs")]) == 2
        assert "give the state.tgz that benchmarks/gpu_session.sh left" in \
            capsys.readouterr().err
