"""Multi-host runs (`fsad.hosts`, `fsad.main`'s host flags). The whole pipeline on two
hosts is in test_end_to_end.py (two processes resume a two-device run to its scores);
here, the flags and the loss of a host, on two real processes joined by
jax.distributed."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, coordinator_address, cpu_env
from fsad.errors import UserError
from fsad.main import host_lost_line, join_hosts

# Process 1 leaves in the middle of the collectives; process 0 must see its next
# all-reduce fail with an error that fsad.hosts.lost_host recognises.
LOSE_A_HOST = """
import os, sys
import jax, numpy as np
from fsad.hosts import initialize, lost_host
pid = int(sys.argv[2])
initialize(sys.argv[1], 2, pid)
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("data",))
x = jax.device_put(np.ones(2, np.float32), NamedSharding(mesh, P("data")))
total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))
assert float(total(x)) == 2.0  # both processes took part
if pid == 1:
    os._exit(0)  # gone without a word, as a killed host is
try:
    for _ in range(1000):
        float(total(x))
    print("NO ERROR")
except Exception as err:
    print("LOST" if lost_host(err) else f"OTHER {type(err).__name__}: {err}")
sys.stdout.flush()
os._exit(0)  # not JAX's shutdown barrier, which would wait for the host that is gone
"""

# Both processes check a workdir whose AHL fields changed after base training; the
# first removes the stale AHL feature cache, slowly: the other must not go on before it.
STALE_AHL_FEATURES = """
import os, sys, time
from fsad.hosts import initialize
pid, work = int(sys.argv[2]), sys.argv[3]
initialize(sys.argv[1], 2, pid)
import configs.ahl_devnet
from fsad.workdir import check_workdir
config = configs.ahl_devnet.get_config()
config.ahl.cluster_on = "auto"
if pid == 0:
    remove = os.remove
    os.remove = lambda path: (time.sleep(2), remove(path))
check_workdir(work, config)
cache = os.path.join(work, "seed_0", "ahl_features.npz")
print("STALE" if os.path.exists(cache) else "GONE")
sys.stdout.flush()
"""


# The same command on both processes, then process 1 given another learning rate.
TWO_COMMANDS = """
import sys
from fsad.hosts import initialize, same_command_on_every_host
from fsad.errors import UserError
pid = int(sys.argv[2])
initialize(sys.argv[1], 2, pid)
same_command_on_every_host("train False {'optim': {'lr': 0.0002}}")
try:
    same_command_on_every_host("train False {'optim': {'lr': %s}}" % ("0.1" if pid else "0.0002"))
    print("RAN")
except UserError as err:
    print("REFUSED", err)
sys.stdout.flush()
"""


# Both processes check one shared folder, then each its own (a path on each node's disk).
TWO_FOLDERS = """
import os, sys
import fsad.hosts
from fsad.hosts import check_same_folder, initialize
from fsad.errors import UserError
pid, base = int(sys.argv[2]), sys.argv[3]
initialize(sys.argv[1], 2, pid)
fsad.hosts.SEEN_WITHIN_SECONDS = 1.0
check_same_folder(os.path.join(base, "shared", "run"))  # not made yet: its parent's
os.makedirs(os.path.join(base, f"own_{pid}", "run"))
try:
    check_same_folder(os.path.join(base, f"own_{pid}", "run"))
    print("RAN")
except UserError as err:
    print("REFUSED", err)
sys.stdout.flush()
"""

def test_host_flags_are_all_or_none():
    join_hosts(False, None, None, None)  # a one-process run: nothing to join
    with pytest.raises(UserError, match="needs all of --coordinator_address"):
        join_hosts(False, None, 2, None)
    with pytest.raises(UserError, match="needs all of --coordinator_address"):
        join_hosts(True, "localhost:1234", None, 0)
    with pytest.raises(UserError, match=r"--process_id 2 is not in 0 to 1"):
        join_hosts(False, "localhost:1234", 2, 2)


def test_a_lost_host_is_recognised_and_said_in_one_line(tmp_path):
    address = coordinator_address()
    env = cpu_env()
    procs = [subprocess.Popen([sys.executable, "-c", LOSE_A_HOST, address, str(i)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert "LOST" in outs[0][0], outs[0][0] + outs[0][1][-3000:]
    line = host_lost_line(str(tmp_path), "train", RuntimeError("Gloo all-reduce failed"))
    assert line == (f"fsad: error: another host of this multi-host run stopped (Gloo "
                    f"all-reduce failed); no checkpoint was written yet in {tmp_path}; run the "
                    f"same command on every host to start it again")


def test_no_host_reads_the_ahl_features_the_first_removes(tmp_path):
    """An AHL field changed after base training (`fsad.workdir.check_workdir`): the first
    host removes each seed's AHL feature cache (slowly, here), and every host waits for
    it rather than reading the stale one (it did without the wait)."""
    import configs.ahl_devnet
    from fsad.workdir import config_json, write_json_atomic
    config = configs.ahl_devnet.get_config()
    config.ahl.cluster_on = "features"
    (tmp_path / "seed_0" / "checkpoints" / "30").mkdir(parents=True)  # the trained base
    write_json_atomic(str(tmp_path / "config.json"), config_json(config))
    (tmp_path / "seed_0" / "ahl_features.npz").write_bytes(b"features")
    address = coordinator_address()
    procs = [subprocess.Popen([sys.executable, "-c", STALE_AHL_FEATURES, address, str(i),
                               str(tmp_path)], cwd=ROOT, env=cpu_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for out, err in outs:
        assert out.split()[-1:] == ["GONE"], out + err[-3000:]


def test_hosts_given_different_commands_are_refused_on_every_host():
    """A walkthrough started one host with another --config.optim.lr: the run trained on
    both, its scores off, and recorded the first host's config. Now every host refuses,
    in one line naming the process that differs."""
    address = coordinator_address()
    procs = [subprocess.Popen([sys.executable, "-c", TWO_COMMANDS, address, str(i)], cwd=ROOT,
                              env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    for out, err in (p.communicate(timeout=300) for p in procs):
        lines = [ln for ln in out.splitlines() if not ln.startswith("[Gloo]")]
        assert lines == ["REFUSED the hosts were given different commands: process 1 of 2 "
                         "differs from process 0 in --mode, --check, the score-mode flags or "
                         "the config; run the "
                         "same command (the same --config and --config.* flags) on every "
                         "host"], out + err[-3000:]



def test_hosts_that_see_other_workdirs_are_refused_on_every_host(tmp_path):
    """Hosts given other workdirs (or each a folder on its own disk) trained until their
    first checkpoint save, then waited on each other for good, without a word (a
    walkthrough's hang): every host refuses, naming the processes, and nothing of the
    check is left behind."""
    address = coordinator_address()
    procs = [subprocess.Popen([sys.executable, "-c", TWO_FOLDERS, address, str(i),
                               str(tmp_path)], cwd=ROOT, env=cpu_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for pid, (out, err) in enumerate(p.communicate(timeout=300) for p in procs):
        lines = [ln for ln in out.splitlines() if not ln.startswith("[Gloo]")]
        assert lines == [f"REFUSED --workdir is not one folder that every host sees: "
                         f"process 1 of 2 does not see the file process 0 wrote for "
                         f"{tmp_path}/own_{pid}/run (a "
                         f"folder on each host's own disk, or another --workdir per host); "
                         f"give every host the same --workdir on storage they all share (the "
                         f"first process writes the run's files, every host reads them)"
                         ], out + err[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["own_0", "own_1"]
    assert os.listdir(tmp_path / "own_0" / "run") == []  # the check's file removed
