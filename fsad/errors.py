"""The one error type for mistakes a user can fix (bad input, bad config, missing files).

`fsad.main` catches it once and prints ``fsad: error: <what is wrong>; <how to fix it>``
to stderr with exit status 2, before any training starts where the check allows.
Every other exception is a bug or an environment failure and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix. The message says what is wrong, then how to fix it,
    separated by "; " (e.g. "data.root '/x' does not exist; pass --config.data.root=...").

    A ValueError subclass, so code that catches ValueError (and older tests) still works.
    """
