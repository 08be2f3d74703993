"""The fsad cache folder: $FSAD_CACHE, else ~/.cache/fsad.

Under it: compiled programs (`<cache>/jax`, `fsad.compile_cache`), downloaded weights
(`<cache>/weights`, `fsad.weights`) and decoded images (`fsad.data.cache`). This module
imports nothing heavy: scripts that only need the places (benchmarks/session_state.py)
start in a moment.
"""

from __future__ import annotations

import os

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fsad")


def fsad_cache() -> str:
    """The fsad cache folder: $FSAD_CACHE, else ~/.cache/fsad."""
    return os.environ.get("FSAD_CACHE") or DEFAULT_CACHE
