"""A job's result lines in input order, as ``GET /v1/jobs/{id}/results`` streams them and
``icma translate --output`` writes them (the line format: ``icma.evaluation.predictions``).

One cursor reads the lines (``_Cursor.step``: a chunk of what is there, and whether to wait);
``iter_results`` drives it for synchronous readers (files), ``aiter_results`` for the worker's
stream, which awaits between polls on the event loop instead of sleeping in a pool thread: a
thread per follower let a few dozen open streams take every thread of the pool and freeze the
worker. ``Followers`` bounds how many streams are open at once.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator

import anyio
from anyio import to_thread

from icma.core.errors import QueueFullError, StorageError
from icma.evaluation.predictions import result_line
from icma.jobs.store import JobStore

#: Seconds between looks at a followed job's unfinished items.
POLL_SECONDS = 0.5
#: The setting named when the followers are all taken.
FOLLOWERS_SETTING = "ICMA_MAX_RESULT_FOLLOWERS"

_MORE, _WAIT, _END = "more", "wait", "end"


class _Cursor:
    """Where a reader is in a job's results. ``step`` returns the next lines (at most one chunk
    of the store's reads) and what to do next: call again (more), wait for unfinished items
    (wait; only when following) or stop (end). Items a cancelled or failed job never reached
    get an error line."""

    def __init__(self, store: JobStore, job_id: str, follow: bool):
        self.store, self.job_id, self.follow = store, job_id, follow
        self.idx, self.waiting = 0, False
        self._first: tuple[list[str], str] | None = None

    def prefetch(self) -> None:
        """Read the first chunk now, before a response starts: damage met here is then an error
        response, not a 200 whose body breaks off."""
        self._first = self.step()

    def step(self) -> tuple[list[str], str]:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        store, job_id = self.store, self.job_id
        # Waiting on an item: look at that one alone until it is done.
        rows = store.results(job_id, self.idx, 1) if self.waiting else \
            store.results(job_id, self.idx)
        if not rows:
            return [], _END
        out = []
        for i, item, line in rows:
            if line is None:
                job = store.get(job_id)
                if job.active:
                    self.waiting = self.follow
                    return out, (_WAIT if self.follow else _END)
                line = store.results(job_id, i, 1)[0][2] or result_line(
                    job.task, i, item.input, id=item.id, reference=item.reference,
                    error={"code": job.state, "field": None,
                           "message": f"not translated: the job {job.state}"})
            out.append(json.dumps(line, ensure_ascii=False) + "\n")
            self.idx = i + 1
        self.waiting = False
        return out, _MORE


def iter_results(store: JobStore, job_id: str, follow: bool = True,
                 poll: float = POLL_SECONDS) -> Iterator[str]:
    """Result lines in input order, one per input. ``follow``: wait for items still being
    worked on (like ``tail -f``) until the job ends; otherwise stop at the first unfinished
    item."""
    cursor = _Cursor(store, job_id, follow)
    while True:
        lines, then = cursor.step()
        yield from lines
        if then == _END:
            return
        if then == _WAIT:
            time.sleep(poll)


def aiter_results(store: JobStore, job_id: str, follow: bool = True,
                  poll: float = POLL_SECONDS) -> AsyncIterator[str]:
    """``iter_results`` for the event loop. The first chunk is read at once, in the caller's
    thread (see ``_Cursor.prefetch``); later chunks are read in a worker thread (the store's
    lock may be held by a writer for a moment) and the waits are awaited, so an open stream
    holds no thread. Damage to the store met after the first chunk ends the stream with one
    error line (the status line has gone out already), never a cut transfer."""
    cursor = _Cursor(store, job_id, follow)
    cursor.prefetch()
    return _follow(cursor, poll)


async def _follow(cursor: _Cursor, poll: float) -> AsyncIterator[str]:
    while True:
        try:
            lines, then = await to_thread.run_sync(cursor.step)
        except StorageError as exc:
            yield json.dumps({"error": {"code": exc.code, "field": None,
                                        "message": exc.message}}, ensure_ascii=False) + "\n"
            return
        for line in lines:
            yield line
        if then == _END:
            return
        if then == _WAIT:
            await anyio.sleep(poll)


class Followers:
    """At most ``limit`` result streams open at once: ``enter`` takes a place (or raises a 429
    naming the limit), the ``release`` it returns gives it back (more than one call is fine)."""

    def __init__(self, limit: int):
        self.limit, self.open = limit, 0
        self._lock = threading.Lock()

    def enter(self):
        with self._lock:
            if self.open >= self.limit:
                raise QueueFullError(
                    f"{self.open} result streams are open, the most this worker serves at once "
                    f"({FOLLOWERS_SETTING}={self.limit}); retry when one has closed",
                    field="job_id")
            self.open += 1
        done = threading.Event()

        def release() -> None:
            with self._lock:
                if not done.is_set():
                    done.set()
                    self.open -= 1

        return release


@dataclass
class ResultStream:
    """An open stream of a job's result lines: iterate it (async), and call ``close`` when the
    response ends however it ends (the client read it all, or went away) to give its place
    among the ``Followers`` back."""

    lines: AsyncIterator[str]
    close: Callable[[], None]

    def __aiter__(self) -> AsyncIterator[str]:
        return self.lines
