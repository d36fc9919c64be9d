"""User-facing errors: one or two lines that name the file or key and say the fix.

Why: a data or config mistake buried in a 30-80-line traceback (with progress-bar residue after
it) is read as a crash of the framework. Entry points run their work inside :func:`user_errors`:
a :class:`UserError` (or an error class marked ``user_facing = True``, e.g.
:class:`~segexp.data.io.DatasetError`, which always names its file)
prints as ``error: <message>`` and exits with status 2; ``HYDRA_FULL_ERROR=1`` re-raises it with
the full traceback, as Hydra does for everything else.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can fix (a path, a key, a value, a checkpoint); the message says how."""


def full_traceback_requested() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def user_facing(exc: BaseException) -> BaseException | None:
    """The user-facing error behind ``exc``, if any: Hydra's instantiate wraps an error raised in a
    constructor (a backbone's hub failure) in its own exception, so the chain is followed."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError) or getattr(exc, "user_facing", False):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def print_error(message: str) -> None:
    sys.stdout.flush()
    fresh_line = "\n" if sys.stderr.isatty() else ""  # a progress bar may have left the cursor mid-line
    print(f"{fresh_line}error: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print a user-facing error briefly and exit 2; anything else propagates unchanged."""
    try:
        yield
    except Exception as exc:
        cause = user_facing(exc)
        if cause is None or full_traceback_requested():
            raise
        print_error(str(cause))
        raise SystemExit(EXIT_USER_ERROR) from None
