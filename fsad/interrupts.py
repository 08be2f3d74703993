"""Ctrl-C that always stops a run.

Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives. If that
is inside a callback that C code calls (JAX's `_xla_gc_callback`, run at every garbage
collection), Python prints "Exception ignored in ..." and drops it: the run went on as if
Ctrl-C had not been pressed (seen 2 times in 20 on an AHL run). The command line's
handler (`install`) also records the interrupt, and `check`, called by every progress
bar's step (`fsad.hosts.progress`) and between a seed's stages, raises it again if it
was dropped. The record is the process's own (a signal is), set only by that handler.

A checkpoint being saved is shielded from Ctrl-C (`shielded`): a press then waits for the
save to end. A second Ctrl-C a moment after the first used to cut short the save the
first one had started, and the run lost every step since its last checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

# set by the handler only; a plain value, since a handler that took a lock (as
# threading.Event's set does) could wait forever on one its own thread holds
_pending = [False]


def _on_sigint(signum, frame):
    _pending[0] = True
    raise KeyboardInterrupt


def install() -> None:
    """Handles SIGINT (the command line's main thread only): record, then raise."""
    _pending[0] = False
    signal.signal(signal.SIGINT, _on_sigint)


def check() -> None:
    """Raises KeyboardInterrupt if a Ctrl-C came and was dropped on its way; the raise
    is taken as its delivery."""
    if _pending[0]:
        _pending[0] = False
        raise KeyboardInterrupt


def delivered() -> None:
    """The interrupt reached fsad's handler of it (`fsad.main.execute`, `reproduce.py`):
    no raise left. The run is stopping, its checkpoints saved: another Ctrl-C from here
    ends the process at once (exit status 130), where a KeyboardInterrupt in the teardown
    would print a traceback ("Exception ignored in ..." from a garbage collection)."""
    _pending[0] = False
    if signal.getsignal(signal.SIGINT) is _on_sigint \
            and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _exit_at_once)


def _exit_at_once(signum, frame):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)  # 128 + SIGINT


@contextlib.contextmanager
def shielded(what: str):
    """Ctrl-C waits while the block runs (a checkpoint's save): a press during it is
    said once on stderr and raised as KeyboardInterrupt when the block has ended. Outside
    the main thread, or where SIGINT is ignored or left to the system (a background
    job), the block runs as it is."""
    if threading.current_thread() is not threading.main_thread() \
            or not callable(signal.getsignal(signal.SIGINT)):
        yield
        return
    pressed = []

    def wait_for_it(signum, frame):
        if not pressed:
            print(f"fsad: Ctrl-C: {what} first; the run stops after it", file=sys.stderr,
                  flush=True)
        pressed.append(signum)

    before = signal.signal(signal.SIGINT, wait_for_it)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
    if pressed:
        raise KeyboardInterrupt
