"""The run's device mesh: one axis, "data", over every device of the run.

The batch is sharded along it (`batch_sharded`), parameters and optimiser state are
replicated (`replicated`). One device is the degenerate case; a multi-host run's mesh
spans the devices of every host (`fsad.hosts`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fsad.errors import UserError
from fsad.hosts import progress

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis "data" over `devices` (default: every device of the run: the
    local ones, and in a multi-host run those of every host, `fsad.hosts`)."""
    devices = list(devices if devices is not None else jax.devices())
    return Mesh(np.array(devices), (DATA_AXIS,))


def one_device_mesh() -> Mesh:
    """The mesh of this process's first device: where a function given no mesh runs."""
    return make_mesh(jax.local_devices()[:1])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch(batch_size: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise UserError(f"batch size {batch_size} is not divisible by the {n} devices of the "
                        f"mesh; set --config.batch_size to a multiple of {n}")


def mesh_batch(batch_size: int, mesh: Mesh) -> int:
    """batch_size rounded up to a multiple of the mesh's devices (each gets a share)."""
    n = mesh.devices.size
    return max(n, -(-batch_size // n) * n)


def padded_batches(rows: np.ndarray, batch_size: int, desc: str):
    """Yields (i, batch, n) over rows [N, ...] (images, or indices into them) in
    fixed-size batches (one program shape): batch i [batch_size, ...], the last one
    padded by repeating its last row, and n, how many of its rows are real (the rest is
    padding). A progress bar `desc` from five batches on (`fsad.hosts.progress`: each
    step takes a Ctrl-C dropped on its way)."""
    steps = range(0, len(rows), batch_size)
    for i, start in enumerate(progress(steps, desc=desc, leave=False,
                                       disable=len(rows) <= batch_size * 4)):
        batch = rows[start:start + batch_size]
        n = len(batch)
        if n < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, axis=0)])
        yield i, batch, n
