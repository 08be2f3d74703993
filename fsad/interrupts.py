"""Ctrl-C that always stops a run.

Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives. If that
is inside a callback that C code calls (JAX's `_xla_gc_callback`, run at every garbage
collection), Python prints "Exception ignored in ..." and drops it: the run went on as if
Ctrl-C had not been pressed (seen 2 times in 20 on an AHL run). The command line's
handler (`install`) also records the interrupt, and `check`, called by every progress
bar's step (`fsad.hosts.progress`) and between a seed's stages, raises it again if it
was dropped. The record is the process's own (a signal is), set only by that handler.
"""

from __future__ import annotations

import signal

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
    no raise left."""
    _pending[0] = False
