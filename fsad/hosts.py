"""One run on several hosts: JAX's multi-controller runtime, one process per host.

Every process runs the same command on the same files (a filesystem all hosts share:
the dataset, the workdir). `fsad.main` calls `initialize` before any other JAX call;
from then on `jax.devices()` lists the devices of every host, and the run's mesh spans
them all. What each process does:

* the same work on the same data: it decodes the dataset, draws the same split and
  puts the training images on its own devices (`put`: the same host array onto a
  global sharding); the train step is one program over all devices, the batch
  sharded across hosts, the gradients averaged by XLA's collectives;
* the same host-side reads: the values a step returns are replicated, so every
  process reads them; scores and saliency maps that are spread over the hosts' devices
  are gathered first (`to_host`);
* writing: Orbax checkpoints are written by all processes together (Orbax's own
  protocol); every other file of a run (config.json, split.json, metrics.json,
  test_scores.npz, results.json, overlays, the AHL feature cache, a scoring CSV) by the
  first process only (`is_primary`), which also alone shows progress bars, warnings
  and the summary and holds the workdir's lock.

With one process (the usual case) each of these is what a plain run does.
"""

from __future__ import annotations

import hashlib
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from fsad import interrupts
from fsad.errors import UserError


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins this process to a multi-host run (`jax.distributed.initialize`); call it
    before any other JAX call. Without arguments JAX finds them on a TPU pod, under
    SLURM or Open MPI; elsewhere pass all three (the coordinator is process 0's
    ``host:port``, reachable from every host).

    On CPU hosts the collectives go through Gloo (XLA's CPU default has none across
    processes)."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # a JAX without the option: its default
        pass
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def is_primary() -> bool:
    """True in the process that writes a run's files (process 0; the only one in a
    one-process run, where it asks nothing of JAX: data tools stay without a backend)."""
    return not joined() or jax.process_index() == 0


def joined() -> bool:
    """Whether this process joined a multi-host run (jax.distributed is initialised);
    asks nothing of JAX's backends."""
    is_initialized = getattr(jax.distributed, "is_initialized", None)
    if is_initialized is not None:
        return is_initialized()
    from jax._src import distributed  # JAX before jax.distributed.is_initialized
    return distributed.global_state.client is not None


def several_hosts() -> bool:
    """Whether this process is one of several joined in a multi-host run."""
    return joined() and jax.process_count() > 1


def same_on_every_host(value: bool) -> bool:
    """The first process's `value` on every process (a decision that reads the clock,
    say, must not differ between hosts); `value` itself in a one-process run."""
    if not several_hosts():
        return value
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def same_command_on_every_host(command: str) -> None:
    """Refuses, on every host, a run whose hosts were given different commands: each
    process's `command` (its mode and config as text) against the first's. Nothing in a
    one-process run.

    Raises:
      UserError: naming the processes whose command differs from the first's.
    """
    if not several_hosts():
        return
    differ = _processes_differing(_digest(command))
    if differ:
        raise UserError(f"the hosts were given different commands: process"
                        f"{'es' if len(differ) > 1 else ''} {', '.join(map(str, differ))} "
                        f"of {jax.process_count()} differ{'' if len(differ) > 1 else 's'} from "
                        f"process 0 in --mode, --check, the score-mode flags or "
                        f"the config; run the same command (the same --config and "
                        f"--config.* flags) on every host")


def _digest(text: str) -> np.ndarray:
    """[8] uint32: the sha256 of `text`."""
    return np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint32)


def _processes_differing(values: np.ndarray) -> list[int]:
    """The processes whose `values` (a small uint32 vector, the same shape on each)
    differ from process 0's; every process gets the same list."""
    gathered = np.asarray(multihost_utils.process_allgather(values))  # [processes, ...]
    return [i for i, v in enumerate(gathered) if not np.array_equal(v, gathered[0])]


SEEN_WITHIN_SECONDS = 30.0  # a shared filesystem's caches may hide a new file so long


def check_same_folder(path: str, flag: str = "--workdir") -> None:
    """Refuses, on every host, a multi-host run whose `path` (the workdir) is not one
    folder that every host sees: a folder on each node's own disk, or another --workdir
    per host. Only the first process writes a run's files, and the hosts' checkpoint
    saves waited on each other for good, without a word (a walkthrough's hang). The first
    process writes a file into `path` (or, where it does not exist yet, its nearest
    folder that does) and every host looks for it there; the rest of the path below
    that folder must be the same on every host. Nothing in a one-process run; no check
    where the first process cannot write there (the run says why when it makes `path`).

    Raises:
      UserError: naming the processes that see another folder than the first's.
    """
    if not several_hosts():
        return
    probe = os.path.abspath(path)
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    rest = os.path.relpath(os.path.abspath(path), probe)
    nonce = multihost_utils.broadcast_one_to_all(np.frombuffer(os.urandom(8), np.uint32))
    marker = os.path.join(probe, ".fsad-hosts-" + np.asarray(nonce).tobytes().hex())
    wrote = False
    if is_primary():
        try:
            open(marker, "w").close()
            wrote = True
        except OSError:
            pass
    if not same_on_every_host(wrote):
        return
    deadline = time.time() + SEEN_WITHIN_SECONDS
    while not os.path.exists(marker) and time.time() < deadline:
        time.sleep(0.5)
    # process 0 sees its own file: a process differs where it does not, or where the
    # rest of its path differs
    blind = _processes_differing(np.concatenate([[os.path.exists(marker)], _digest(rest)])
                                .astype(np.uint32))
    wait_for_every_host("fsad: the hosts' folder checked")
    if is_primary():
        os.remove(marker)
    if blind:
        raise UserError(f"{flag} is not one folder that every host sees: process"
                        f"{'es' if len(blind) > 1 else ''} {', '.join(map(str, blind))} of "
                        f"{jax.process_count()} {'do' if len(blind) > 1 else 'does'} not see "
                        f"the file "
                        f"process 0 wrote for {os.path.abspath(path)} (a folder on each "
                        f"host's own disk, or another {flag} per host); give every host the "
                        f"same {flag} on storage they all share (the first process writes "
                        f"the run's files, every host reads them)")


def wait_for_every_host(name: str) -> None:
    """Returns once every process has reached this point (`name` must be the same on
    all): afterwards each process reads the files the first one wrote before it. No
    wait in a one-process run."""
    if several_hosts():
        multihost_utils.sync_global_devices(name)


def to_host(array) -> np.ndarray:
    """A jax.Array as one numpy array on this host: gathered from the other hosts when
    part of it lives on their devices (an array sharded over a multi-host mesh)."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable \
            and not array.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)


def put(tree, sharding):
    """`jax.device_put(tree, sharding)`, also where the sharding spans several hosts.

    Every process passes the same values. Arrays on one local device go through host
    memory there: JAX (0.10) builds from them a global array whose shards Orbax cannot
    read (checkpoint saves fail), where from a numpy array it builds a sound one. With
    one process, `jax.device_put` itself."""
    if jax.process_count() > 1:
        tree = jax.tree.map(lambda a: np.asarray(a) if isinstance(a, jax.Array)
                            and a.is_fully_addressable else a, tree)
    return jax.device_put(tree, sharding)


# what JAX's runtime says in a process whose collective, or coordination service, lost a
# host: Gloo (CPU) and NCCL (GPU) collectives, the coordination service's heartbeats
_LOST_HOST_SIGNS = ("Gloo", "NCCL", "Connection reset", "heartbeat", "UNAVAILABLE",
                    "coordination service")


def lost_host(err: Exception) -> bool:
    """True for the error a process of a multi-host run gets when another process
    stopped (killed, preempted, failed): a collective or the coordination service
    failed."""
    # JaxRuntimeError from a dispatch, ValueError from reading a result back: the message
    # is what tells
    return (several_hosts()
            and any(sign in str(err) for sign in _LOST_HOST_SIGNS))


class _Progress(tqdm):
    """tqdm whose every step checks for a Ctrl-C that was dropped (`fsad.interrupts`)."""

    def update(self, n=1):
        interrupts.check()
        return super().update(n)

    def __iter__(self):
        for item in super().__iter__():
            interrupts.check()
            yield item


def progress(*args, **kwargs) -> tqdm:
    """A tqdm progress bar, shown by the primary process only (one bar per run, not
    one per host); each of its steps raises a Ctrl-C that was dropped on its way
    (`fsad.interrupts.check`)."""
    if not is_primary():
        kwargs["disable"] = True
    return _Progress(*args, **kwargs)
