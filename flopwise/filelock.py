"""An exclusive lock on a file that processes (and threads, each with its own open) wait their turn for.

Shared caches are already safe without it: every entry is written under a temporary name and renamed whole.
The lock keeps two processes from building the same entry at once (the second waits, then loads the first's)
and serializes read-change-write updates such as a sweep's budget accounting.  Where the platform has no
``fcntl`` (Windows), the lock is skipped: the writes stay whole, only the duplicated work comes back; what
needs the lock to be correct (a sweep's workers sharing its accounting) asks ``LOCKS_WORK`` first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCKS_WORK = fcntl is not None


@contextlib.contextmanager
def held(path: Path) -> Iterator[None]:
    """Hold the lock file ``path`` (created if missing) until the block ends, waiting while another holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", encoding="utf-8") as handle:
        if fcntl is None:
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
