"""Orbax checkpoints of a run: made synchronously at the end of an epoch when one is due
(`SavePace`) and on Ctrl-C (`PacedCheckpoints`), restored from the newest readable one,
and a failed write (a full disk) reported as one line naming the fix.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import shutil
import sys
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding

from fsad.errors import UserError
from fsad.hosts import is_primary, same_on_every_host, several_hosts, wait_for_every_host
from fsad.interrupts import shielded
from fsad.mesh import one_device_mesh, replicated


def checkpoint_manager(directory: str, max_to_keep: int = 3,
                       clean_tmp: bool = False) -> ocp.CheckpointManager:
    """Orbax checkpoints in `directory`, saved synchronously: every save is waited for
    anyway (a run killed right after an epoch must find that epoch's checkpoint), and a
    failed write (full disk) then surfaces at once instead of in a background thread.
    clean_tmp: remove the half-written saves a killed run left (`*.orbax-checkpoint-tmp`);
    only for the run that writes there (it holds the workdir's lock), never where
    another process may be saving."""
    if clean_tmp and os.path.isdir(directory):
        # (Orbax's own cleanup_tmp_directories runs in the background, after the manager
        # is made; every host may remove them: a run's first save comes after collective
        # steps, which wait for every host to have made its manager)
        for name in os.listdir(directory):
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    try:
        # the handler named, so that a checkpoint's metadata (its own structure) is readable
        return ocp.CheckpointManager(checkpoint_folder(directory), options=options,
                                     item_handlers=ocp.StandardCheckpointHandler())
    except OSError as err:
        raise _folder_error(directory, err) from err


class SavePace:
    """Whether the end of an epoch saves a checkpoint: when `every_seconds` have passed
    since the last save (or since training started), and always after the last epoch;
    after every epoch when `every_seconds` is 0.

    A save waits for the device and writes every array (about 0.4 s for a ResNet-18
    DevNet's state and 0.9 s for EfficientNet-Lite0's many small arrays, on a 2-core
    CPU); on an H200, saving after each of DevNet's 50 epochs of 20 steps took about half
    of its training time. A killed run loses at most `every_seconds` of training plus
    the epoch under way (it resumes from the last save and draws the same batches from
    there on); a Ctrl-C on one host saves the newest step (`interrupted`). All
    processes of a multi-host run save together, so the first process's clock decides.
    """

    def __init__(self, every_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.every, self.clock = float(every_seconds), clock
        self.last = clock()

    def due(self, last_epoch: bool) -> bool:
        """Whether to save now (an epoch has just ended); a True restarts the clock."""
        due = last_epoch or self.every <= 0 or same_on_every_host(
            self.clock() - self.last >= self.every)
        if due:
            self.last = self.clock()
        return due


def checkpoint_folder(directory: str) -> str:
    """Makes the checkpoint folder (a run calls this before compiling anything, so that a
    workdir it cannot write stops it at once). -> its absolute path."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise _folder_error(directory, err) from err
    return os.path.abspath(directory)


def adopt_checkpoint(source: str, directory: str) -> int | None:
    """Puts the newest checkpoint of the folder `source` (another run's) into
    `directory`, unless that holds one already: hard links where both sit on one file
    system (no space taken), else a copy; the step's folder appears whole or not at all
    (a rename). The run of `directory` then holds its own start, whether or not `source`
    is kept. In a multi-host run the first process does it, and every process waits for
    it. -> the step adopted, or None.
    """
    from fsad.hosts import is_primary, wait_for_every_host
    from fsad.workdir import saved_steps
    steps = saved_steps(source)
    adopted = None
    if steps and is_primary() and not saved_steps(checkpoint_folder(directory)):
        adopted = max(steps)
        part = os.path.join(directory, f"{adopted}.adopting")  # not a step's name
        shutil.rmtree(part, ignore_errors=True)
        try:
            shutil.copytree(os.path.join(source, str(adopted)), part, copy_function=os.link)
        except OSError:  # another file system (or no hard links there): a copy
            shutil.rmtree(part, ignore_errors=True)
            try:
                shutil.copytree(os.path.join(source, str(adopted)), part)
            except OSError as err:  # shutil.Error too: a full disk, a folder not writable
                shutil.rmtree(part, ignore_errors=True)
                raise UserError(f"cannot copy the base run's checkpoint of step {adopted} "
                                f"from {source} into {directory} ({str(err)[:200]}); free "
                                f"disk space or choose a writable --workdir") from err
        os.rename(part, os.path.join(directory, str(adopted)))
    wait_for_every_host("adopt_checkpoint")
    return adopted


def _folder_error(directory: str, err: OSError) -> UserError:
    return UserError(f"cannot create the checkpoint folder {directory} "
                     f"({err.strerror or err}); choose a writable --workdir")


def restore_latest(mngr: ocp.CheckpointManager, state: Any = None,
                   sharding: NamedSharding | None = None, resume: bool = False) -> Any:
    """The newest readable checkpoint restored into `state`'s structure and shardings (or
    state when there is none).

    With state None, the checkpoint's own structure (nested dicts and lists of arrays,
    as saved: what a reader that did not train the run can rebuild), every array placed
    by `sharding` (default: the first local device); None when there is no checkpoint.

    Orbax writes a checkpoint into a temporary folder and renames it when complete, so a
    crash during a save leaves no half checkpoint among the steps; should the newest one
    still fail to restore (a damaged disk, a file removed by hand), the one before it is
    used, with a warning.

    resume: the caller trains on in this folder (every host calls this together). The
    unreadable checkpoints newer than the one restored are set aside (`_set_aside`):
    Orbax saves no step at or below its newest, so the resumed run's saves were skipped
    without a word up to the unreadable step. And where checkpoints are there but none
    restores (all damaged, or of another structure after a change of fsad), a UserError:
    training from the start would have gone on with a warning only.
    """
    if state is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    elif sharding is None:
        sharding = replicated(one_device_mesh())
    failed, restored, found = [], state, False
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            if state is None:
                abstract = jax.tree.map(
                    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                    mngr.item_metadata(step))
            restored, found = mngr.restore(step, args=ocp.args.StandardRestore(abstract)), True
            break
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint: try the older
            _quiet_failed_reads()  # at once: the failed reads' reports may come any time
            # (the error's first line: TensorStore's run to thousands, its whole spec;
            # the whole error at the debug level)
            first = (str(err).strip().splitlines() or [""])[0][:300]
            logging.warning("checkpoint %d in %s is unreadable (%s: %s); trying the one "
                            "before", step, mngr.directory, type(err).__name__, first)
            logging.debug("checkpoint %d: %s", step, err)
            failed.append(step)
        gc.collect()  # the failed reads, unreachable now (err is gone): reported, dropped
    if not resume:
        return restored
    # every host decides as the first does (each broadcast is one for all of them), so
    # that none waits for another that raised
    if same_on_every_host(bool(failed) and not found):
        raise UserError(f"no checkpoint in {mngr.directory} can be restored (steps "
                        f"{', '.join(map(str, failed))}; the warnings above say why); "
                        f"move that folder away to train from the start")
    if same_on_every_host(bool(failed)):
        _set_aside(mngr, failed)
    return restored


def _set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> None:
    """Renames the unreadable checkpoints `steps` (those newer than the one restored) to
    unreadable-<step>-<time> in their folder, by the first host, and has Orbax list the
    folder again; a warning names them."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved, problem = [], ""
    if is_primary():
        try:
            for step in steps:
                src = os.path.join(str(mngr.directory), str(step))
                dst = os.path.join(str(mngr.directory), f"unreadable-{step}-{stamp}")
                os.replace(src, dst)
                moved.append(dst)
        except OSError as err:  # said on every host, after the wait (none left waiting)
            problem = f"{src} ({err.strerror or err})"
    wait_for_every_host("unreadable checkpoints set aside")
    if same_on_every_host(bool(problem)):
        where = problem or "on the first host"
        raise UserError(f"cannot set an unreadable checkpoint aside ({where}), and this "
                        f"run's checkpoints would not be saved past it; move it out of "
                        f"{mngr.directory} by hand")
    mngr.reload()
    if moved:
        logging.warning("the unreadable checkpoint(s) set aside as %s, so that this run's "
                        "checkpoints are saved; remove them once you no longer need them",
                        ", ".join(moved))


def _quiet_failed_reads() -> None:
    """Quiets what the other reads of a failed restore leave: they failed too, or end
    later in TensorStore's threads after Orbax closed its event loop, and Python
    reported each as an unraisable exception, "Exception ignored in: <coroutine object
    _read_array_index_and_device_put>" with TensorStore's whole error when the coroutine
    was collected, or "Exception ignored in: None ... RuntimeError: Event loop is closed"
    (each seen in a fresh clone's suite, long after the test of a damaged checkpoint).
    The warning of the fallback says it once: from here on, for the rest of the process,
    such reports are dropped (`_DropFailedReadReports`; every other report goes to the
    hook before)."""
    if not isinstance(sys.unraisablehook, _DropFailedReadReports):
        sys.unraisablehook = _DropFailedReadReports(sys.unraisablehook)


def _closed_loop_wakeup(unraisable) -> bool:
    """Whether `unraisable` (sys.UnraisableHookArgs) is asyncio's RuntimeError "Event
    loop is closed" raised in `call_soon_threadsafe`: a TensorStore read or write that
    ended after Orbax had given up on it and closed its loop."""
    exc, tb, names = unraisable.exc_value, unraisable.exc_traceback, []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
            and "call_soon_threadsafe" in names)


class _DropFailedReadReports:
    """A `sys.unraisablehook` that drops the reports of a failed restore's other reads
    (`_quiet_failed_reads`): Orbax's coroutines, and wakeups of its closed loop. Every
    other report goes on to the hook it replaced."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        orbax = code is not None and "/orbax/" in code.co_filename.replace("\\", "/")
        if not (orbax or _closed_loop_wakeup(unraisable)):
            self.previous(unraisable)


class _WithoutOrbaxLogs(logging.Filter):
    """Drops Orbax's own log records while a save is attempted: a failed write becomes
    one UserError, not that and Orbax's error lines."""

    def filter(self, record):
        return "/orbax/" not in record.pathname.replace("\\", "/")


def _write_failure(err: Exception) -> str | None:
    """The OS's reason when `err` is a failed file write (an OSError, or the ValueError
    with an os_error_code that Orbax's TensorStore raises), else None."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    code = re.search(r"os_error_code='?(\d+)", str(err))
    return os.strerror(int(code.group(1))) if code else None


class _DropClosedLoopWakeups:
    """A `sys.unraisablehook` for checkpoint saves: drops the RuntimeError "Event loop is
    closed" raised in asyncio's `call_soon_threadsafe`, passes every other unraisable
    exception to the hook it replaced.

    A checkpoint is many TensorStore writes awaited together on Orbax's event loop. When
    one fails (a full disk), Orbax raises at once and closes the loop; the others go on
    in TensorStore's threads, and each one, on finishing, tries to wake the closed loop.
    Python prints each of those as an unraisable exception: over a thousand lines of
    tracebacks above the one-line error, for a ResNet-18. They repeat a failure that is
    already reported.
    """

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable):
        if not _closed_loop_wakeup(unraisable):
            self.previous(unraisable)


class _DropUnretrievedWriteFailures(logging.Filter):
    """Drops asyncio's "<class> exception was never retrieved" records (a Future, a Task,
    a _GatheringFuture of asyncio.gather, ...) of failed file writes: the futures and
    tasks of the writes a failed save left behind (`_DropClosedLoopWakeups`), which
    asyncio logs when they are garbage-collected, as late as the process's exit. Any
    other record passes."""

    UNRETRIEVED = re.compile(r"\w+ exception was never retrieved")

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, Exception) and _write_failure(exc) is not None
                    and self.UNRETRIEVED.match(record.getMessage()))


def save_checkpoint(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Saves (and waits for) one checkpoint. A disk that is full or not writable is the
    user's to fix: a UserError; the checkpoints saved before stay, the newest of them
    the latest (Orbax writes into a temporary folder and renames it when complete).
    Ctrl-C waits for the save to end (`fsad.interrupts.shielded`)."""
    with shielded(f"saving the checkpoint of step {step} in {mngr.directory}"):
        _save_checkpoint(mngr, step, state)


def _save_checkpoint(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
    quiet = _WithoutOrbaxLogs()
    handlers = logging.getLogger().handlers
    for h in handlers:
        h.addFilter(quiet)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _DropClosedLoopWakeups(previous_hook)
    abandoned = False  # writes may still be running after the save has ended
    try:
        mngr.save(step, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
    except KeyboardInterrupt:  # Ctrl-C during the save: fsad.main prints its one line
        abandoned = True
        raise
    except (OSError, ValueError) as err:
        reason = _write_failure(err)
        if reason is None:
            raise
        abandoned = True
        raise UserError(f"cannot write the checkpoint of step {step} to {mngr.directory} "
                        f"({reason}); free disk space or choose a writable --workdir") from err
    finally:
        if abandoned:  # they go on finishing after the save: stay quiet
            log = logging.getLogger("asyncio")
            if not any(isinstance(f, _DropUnretrievedWriteFailures) for f in log.filters):
                log.addFilter(_DropUnretrievedWriteFailures())
        else:
            sys.unraisablehook = previous_hook
        for h in handlers:
            h.removeFilter(quiet)


def is_whole(state: Any) -> bool:
    """Whether every array of `state` still holds its data: not when a jitted step has
    taken it in (donated) and a Ctrl-C came before the step's output was kept."""
    return not any(getattr(a, "is_deleted", lambda: False)() for a in jax.tree.leaves(state))


class PacedCheckpoints:
    """A training loop's checkpoints: at the end of an epoch when `SavePace` says one is
    due (`epoch_end`), and on Ctrl-C between them (`interrupted`)."""

    def __init__(self, mngr: ocp.CheckpointManager, every_seconds: float):
        self.mngr, self.pace, self.saving = mngr, SavePace(every_seconds), False

    def epoch_end(self, step: int, state: Any, last: bool) -> None:
        """An epoch has ended at `step` (`last`: the loop's last one): saves if due."""
        if self.pace.due(last):
            self.saving = True  # a Ctrl-C during the save leaves it to Orbax's rename
            save_checkpoint(self.mngr, step, state)
            self.saving = False

    def interrupted(self, step: int, state: Any) -> bool:
        """On Ctrl-C: saves `state` as `step`, so that the rerun loses nothing. Not
        while a save was under way, when the state is not whole (the interrupt came while
        a step took its donated arrays in), `step` is saved already, or the run spans
        several hosts (they save together, and Ctrl-C reaches one). -> whether it
        saved."""
        if self.saving or several_hosts() or not is_whole(state) \
                or step in self.mngr.all_steps():
            return False
        save_checkpoint(self.mngr, step, state)
        logging.info("Ctrl-C: saved the checkpoint of step %d in %s", step,
                     self.mngr.directory)
        return True
