"""Temporary files left by interrupted writes, removed when a service starts.

Every file or folder others read is written under a temporary name and renamed into place, so
a reader never sees half of one; a process killed mid-write (or a write that failed before its
clean-up ran) leaves the temporary behind, where nothing would ever remove it. Each service
sweeps the patterns its own writers use (they are defined next to each writer) at start-up.

Only entries untouched for ``STALE_SECONDS`` go (a folder counts its newest entry): other
processes may share the data directory (the retrieval service's workers, a worker's tune child,
other containers on one volume, whose process ids this one cannot see), and one of them may be
writing a fresh temporary right now. No write the services make takes that long.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

#: Temporaries untouched this long (seconds) belong to a process that is gone.
STALE_SECONDS = 600.0


def sweep(root: Path, patterns: Iterable[str], *, older_than: float = STALE_SECONDS,
          now: float | None = None) -> list[Path]:
    """Remove the entries under ``root`` matching ``patterns`` (globs relative to ``root``)
    that were last modified more than ``older_than`` seconds ago. Returns what was removed;
    entries that vanish or resist meanwhile are left alone."""
    root = Path(root)
    now = time.time() if now is None else now
    removed = []
    for pattern in patterns:
        for path in sorted(root.glob(pattern)):
            try:
                if now - _newest(path) < older_than:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except OSError:
                continue
            log.warning("removed %s, a temporary left by an interrupted write", path)
            removed.append(path)
    return removed


def _newest(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
                except OSError:
                    pass
    return newest
