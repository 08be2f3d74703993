"""Ctrl-C that always stops a run.

Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives. If that
is inside a callback that C code calls (JAX's `_xla_gc_callback`, run at every garbage
collection), Python prints "Exception ignored in ..." and drops it: the run went on as if
Ctrl-C had not been pressed (seen 2 times in 20 on an AHL run, and 3 in 6 in a scoring's
heat maps, where 3 other runs crashed with SIGSEGV as they ended). The command line's
handler (`install`) records the interrupt and raises it, but not inside a
garbage-collection callback; `check`, called by every progress bar's step
(`fsad.hosts.progress`), between a seed's stages and before a scoring writes its CSV,
raises it where it was not. The record is the process's own (a signal is), set only by
fsad's handlers (`defer`'s too: a press during the command line's start-up is taken when
it has started).

A checkpoint being saved is shielded from Ctrl-C (`shielded`): a press then waits for the
save to end. A second Ctrl-C a moment after the first used to cut short the save the
first one had started, and the run lost every step since its last checkpoint.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading

# set by the handler only; a plain value, since a handler that took a lock (as
# threading.Event's set does) could wait forever on one its own thread holds
_pending = [False]
_last = [signal.SIGINT]  # the signal that stopped the run (`exit_status`)
_shielding = [False]  # a `shielded` block runs


def _on_sigint(signum, frame):
    _pending[0] = True
    _last[0] = signum
    if not _in_gc_callback(frame):  # there Python would drop it: `check` raises it
        raise KeyboardInterrupt


def _in_gc_callback(frame) -> bool:
    """Whether the interrupted code runs inside a garbage-collection callback (JAX's
    `_xla_gc_callback`, which frees XLA's buffers), where a raised KeyboardInterrupt is
    dropped ("Exception ignored") after cutting the callback short; runs stopped there
    went on to their end, or crashed with SIGSEGV as they exited."""
    codes = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def _on_startup(signum, frame):
    if _pending[0]:  # a second press: the start-up hangs (a stale network folder?)
        _exit_at_once(signum, frame)
    _pending[0] = True
    _last[0] = signum


def defer() -> None:
    """The command line's first step, before it imports JAX: until `install`, Ctrl-C
    (and SIGTERM) is recorded only, and the run stops as its first act (a second press
    ends the process at once, 128 + the signal). Raised during the start-up's imports,
    the KeyboardInterrupt mostly landed in JAX's garbage-collection callback, where
    Python drops it: the run went on to its end (3 presses in 3 within a second of the
    start), or crashed (SIGSEGV) or printed an import's traceback."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _on_startup)


def install() -> None:
    """Handles SIGINT, and SIGTERM as it (a cluster's time limit, `kill`: the newest step
    saved, as on Ctrl-C), in the command line's main thread only: record, then raise. A
    press recorded since `defer` stays, for `check` to raise."""
    _pending[0] = _pending[0] and signal.getsignal(signal.SIGINT) is _on_startup
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_sigint)


def exit_status() -> int:
    """128 + the signal that stopped the run: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + int(_last[0])


def check() -> None:
    """Raises KeyboardInterrupt if a Ctrl-C came and was dropped on its way; the raise
    is taken as its delivery."""
    if _pending[0]:
        _pending[0] = False
        raise KeyboardInterrupt


def delivered() -> None:
    """The interrupt reached fsad's handler of it (`fsad.main.execute`, `reproduce.py`),
    or the command has done its work (`fsad.main.main`): no raise left. The process is
    ending, its checkpoints and results saved: a Ctrl-C from here ends it at once (exit
    status 128 + the signal), where a KeyboardInterrupt in the teardown would print a
    traceback ("Exception ignored in ..." from a garbage collection, or from JAX's
    atexit clean-up after a finished run's last line)."""
    _pending[0] = False
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is _on_sigint:
                signal.signal(sig, _exit_at_once)


def _exit_at_once(signum, frame):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


@contextlib.contextmanager
def shielded(what: str):
    """Ctrl-C (and SIGTERM, where fsad handles it) waits while the block runs (a
    checkpoint's save, the saving of the newest step on a first Ctrl-C): a press during
    it is said once on stderr, on a line of its own, and raised as KeyboardInterrupt
    when the block has ended. A block inside another runs as it is (the outer one
    waits); so does one outside the main thread, or where SIGINT is ignored or left to
    the system (a background job)."""
    if _shielding[0] or threading.current_thread() is not threading.main_thread() \
            or not callable(signal.getsignal(signal.SIGINT)):
        yield
        return
    pressed = []

    def wait_for_it(signum, frame):
        if not pressed:  # (the newline: a progress bar may hold the line)
            print(f"\nfsad: Ctrl-C: {what} first; the run stops after it",
                  file=sys.stderr, flush=True)
        pressed.append(signum)

    sigs = [sig for sig in (signal.SIGINT, signal.SIGTERM)
            if sig == signal.SIGINT or signal.getsignal(sig) is _on_sigint]
    before = {sig: signal.signal(sig, wait_for_it) for sig in sigs}
    _shielding[0] = True
    try:
        yield
    finally:
        _shielding[0] = False
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if pressed:
        _last[0] = pressed[0]
        raise KeyboardInterrupt
