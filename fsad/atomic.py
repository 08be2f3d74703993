"""Files written whole or not at all: into a temporary file beside the target, renamed
over it once complete.

A crash, a full disk or a Ctrl-C while writing leaves the file there before as it was (or
none) and no temporary file: the places fsad writes to (JSON records, tables, decoded
image caches, downloads, the scores CSV) are each read back by a later run, which must
never find half of one.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator


@contextlib.contextmanager
def whole_or_nothing(path: str, suffix: str = "") -> Iterator[str]:
    """Yields the temporary path to write `path`'s new content to; when the block ends
    without an exception it is renamed over `path`, otherwise removed.

    The temporary file sits beside `path` (one rename on one file system) and is named
    by host and process, so runs or hosts that write the same file at once each write
    their own and the last complete one is kept. `suffix` ends its name (np.savez adds
    ".npz" to a name without it).

        with whole_or_nothing("results.json") as tmp:
            with open(tmp, "w") as f:
                json.dump(results, f)
    """
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:  # the block failed or was interrupted: no half file left behind
        if os.path.exists(tmp):
            os.remove(tmp)
