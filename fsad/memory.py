"""Memory: what a compiled program needs against what its devices have free, and an
out-of-memory error turned into one line that names the setting to lower.

XLA plans a program's buffers when it compiles it: `Compiled.memory_analysis()` gives
the bytes one call allocates besides its arguments (temporaries and outputs), exactly
what the call will ask for (on a CPU the whole plan is one allocation). So the train
step is checked before its first step (`check_fits`), and any other out-of-memory
failure (scoring, saliency, AHL) is caught where its stage runs (`hint_on_oom`).
"""

from __future__ import annotations

import contextlib
import re

import jax

from fsad.errors import UserError


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"


def _host_available() -> int | None:
    """Bytes of host memory available: /proc/meminfo's MemAvailable, capped by the
    cgroup limit of a container (v2 memory.max, v1 limit_in_bytes) less its usage."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" or a huge number: no limit
            room = max(int(limit) - usage, 0)
            free = room if free is None else min(free, room)
    return free


def free_bytes(devices) -> int | None:
    """Bytes one program call can still allocate on each of these devices (one mesh's),
    or None where the platform does not say. CPU devices share the host's memory, so the
    host's available memory is split between them; an accelerator reports its allocator's
    limit less what is in use. Only this process's devices count (on several hosts each
    checks its own)."""
    devices = [d for d in devices if d.process_index == jax.process_index()]
    if devices[0].platform == "cpu":
        free = _host_available()
        return None if free is None else free // len(devices)
    free = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001  (a platform without allocator statistics)
            return None
        if not stats or "bytes_limit" not in stats:
            return None
        free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return min(free)


def program_bytes(compiled) -> int | None:
    """Bytes one call of a compiled program allocates per device besides its arguments
    (temporaries, and outputs that do not reuse a donated argument), or None."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001  (not every backend implements it)
        return None
    if m is None:
        return None
    return int(m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def where(devices) -> str:
    """"this machine" (CPU devices share its memory) or "the NVIDIA H200" (say)."""
    d = list(devices)[0]
    return "this machine" if d.platform == "cpu" else f"the {d.device_kind}"


def check_fits(compiled, devices, what: str, fix: str) -> None:
    """Raises UserError before the first call when a compiled program needs more memory
    per device than is free (the call would fail, or on a CPU invite the OOM killer)."""
    need, free = program_bytes(compiled), free_bytes(devices)
    if need is None or free is None or need <= free:
        return
    per = " per device" if len(list(devices)) > 1 else ""
    raise UserError(f"{what} needs {gib(need)} of memory{per} and {where(devices)} has "
                    f"{gib(free)} free; {fix}")


def is_out_of_memory(err: BaseException) -> bool:
    """XLA's out-of-memory failure: RESOURCE_EXHAUSTED when a running program allocates,
    INTERNAL "Error dispatching computation: Out of memory ..." when a CPU call cannot
    get its buffers at dispatch."""
    text = str(err)
    return isinstance(err, jax.errors.JaxRuntimeError) and (
        "RESOURCE_EXHAUSTED" in text or "Out of memory" in text)


def oom_words(err: BaseException) -> str:
    """XLA's own words for an out-of-memory failure, e.g. "Out of memory allocating 1024
    bytes." (its first line, without the status code)."""
    first = str(err).strip().splitlines()[0]
    return first[first.index("Out of memory"):] if "Out of memory" in first else \
        re.sub(r"^RESOURCE_EXHAUSTED:\s*", "", first)


@contextlib.contextmanager
def hint_on_oom(what: str, fix: str):
    """Turns an out-of-memory failure inside the block into a UserError:
    "out of memory in <what> (<XLA's words>); <fix>"."""
    try:
        yield
    except jax.errors.JaxRuntimeError as err:
        if not is_out_of_memory(err):
            raise
        raise UserError(f"out of memory in {what} ({oom_words(err)[:200]}); {fix}") from None


def train_fix(config, n_devices: int) -> str:
    """How to make a train step smaller, in the config's own numbers."""
    size, batch = config.data.img_size, config.batch_size
    fix = (f"lower --config.batch_size (now {batch}, a multiple of the {n_devices} "
           f"device(s)) or --config.data.img_size (now {size})") if n_devices > 1 else (
        f"lower --config.batch_size (now {batch}) or --config.data.img_size (now {size})")
    if config.model.get("dtype", "float32") == "float32" and jax.default_backend() != "cpu":
        fix += ", or compute in bfloat16 (--config.model.dtype=bfloat16)"
    if jax.default_backend() == "cpu" and size > 96:
        fix += "; on a CPU the quick variant (--config FILE:quick) trains at 96 px"
    return fix


def eval_fix(config) -> str:
    return (f"lower --config.eval_batch_size (now {config.eval_batch_size}) or "
            f"--config.explain.batch_size (now {config.explain.batch_size})")


def run_fix(config, n_devices: int) -> str:
    """Where a run's stage is unknown: every batch size that shapes a program."""
    return f"{train_fix(config, n_devices)}; for scoring and saliency {eval_fix(config)}"
