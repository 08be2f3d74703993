"""One run per workdir at a time: an advisory lock held while a run trains there.

A second run started in a workdir that a first is still training in (a job submitted
again while the first still runs, the same command in two terminals) would write the
same checkpoint steps; the first then died on "File exists" when saving. The lock
refuses the second at its start, in one line. It is `flock`: the operating system
releases it when the holder ends however it ends (Ctrl-C, SIGKILL, a lost node), so a
killed run leaves no stale lock and its rerun resumes at once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

from fsad.errors import UserError
from fsad.hosts import is_primary

try:
    import fcntl
except ImportError:  # no flock (Windows): no lock
    fcntl = None

LOCK_FILE = ".fsad.lock"


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Holds workdir's lock for the block (on several hosts, process 0 holds it).

    Raises:
      UserError: another process holds it (its pid, host and start time are named).
    """
    if fcntl is None or not is_primary():
        yield
        return
    try:
        os.makedirs(workdir, exist_ok=True)
        f = open(os.path.join(workdir, LOCK_FILE), "a+")
    except OSError:  # an unwritable workdir: said in one line by the workdir check
        yield
        return
    with f:  # closing the file releases the lock
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _held(workdir, f) from None
        except OSError:  # a filesystem without locks: run unlocked
            yield
            return
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        yield


def _held(workdir: str, f) -> UserError:
    """The error for a workdir whose lock file `f` another process holds."""
    f.seek(0)
    holder = f.read().strip() or "a process that has not written its pid yet"
    return UserError(f"another fsad run is training in {workdir!r} ({holder}); wait for it "
                     f"to end (the same command then resumes or reads it back), or use "
                     f"another --workdir")


def check_not_locked(workdir: str) -> None:
    """`workdir_lock`'s refusal without holding the lock or writing anything (--check):
    the lock file, where there is one, is opened for reading, locked and let go at once.

    Raises:
      UserError: another process holds workdir's lock.
    """
    path = os.path.join(workdir, LOCK_FILE)
    if fcntl is None or not is_primary() or not os.path.isfile(path):
        return
    try:
        f = open(path)
    except OSError:
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _held(workdir, f) from None
        except OSError:  # a filesystem without locks
            pass
