"""An exclusive lock between processes sharing a data directory (flock on a lock file)."""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path


@contextlib.contextmanager
def locked(path: Path, wait: bool = True):
    """Hold an exclusive lock on ``path`` (created if missing). The kernel releases it if the
    holder dies, so a crashed build never blocks the next start. ``wait=False``: raise
    BlockingIOError at once when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
