"""Coalescing concurrent searches on one index into one call (group commit).

Searching one query at a time, every graph query embeds one molecule and scans all corpus
embeddings (tens of MB) by itself; searched together, the queries share one GNN forward pass and
one scan. While a search runs, requests that arrive queue up; when it ends, the whole queue runs
as one batch. Nobody waits for a timer: at low load a request runs at once, alone.

Two forms, one batch rule (``_search_together``):
- ``SearchBatcher`` for requests answered in threads: the first waiting thread leads the next
  batch.
- ``LoopBatcher`` for small requests answered on a service's event loop: the searches submitted
  during one turn of the loop run together at the end of the turn, on the loop itself. While
  that batch runs the loop does nothing else, so the requests that arrive meanwhile are read in
  the next turn and form the next batch. No thread hand-offs at all: in a worker process, which
  runs Python on one core at a time anyway, they cost more than they overlap.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

from icma.retrieval.base import Exclusion, Hit, Index


@dataclass
class _Request:
    queries: list[str]
    k: int
    exclusions: list[Exclusion | None]
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    result: list[list[Hit]] | None = None
    error: BaseException | None = None


class SearchBatcher:
    """``search`` with the signature of ``Index.search``, batched across threads."""

    def __init__(self, index: Index, max_queries: int = 256):
        self.index = index
        self.max_queries = max_queries
        self._lock = threading.Lock()
        self._pending: list[_Request] = []
        self._busy = False
        self.batches = 0  # calls made to the index (for tests and metrics)

    @property
    def corpus(self):
        return self.index.corpus

    def search(self, queries: Sequence[str], k: int,
               exclusions: Sequence[Exclusion | None] | None = None) -> list[list[Hit]]:
        req = _Request(list(queries), k,
                       list(exclusions) if exclusions is not None else [None] * len(queries))
        with self._lock:
            self._pending.append(req)
            if not self._busy:
                self._busy = req.lead = True
        if not req.lead:
            req.done.wait()
        if req.lead:
            self._lead(req)
        if req.error is not None:
            raise req.error
        return req.result  # type: ignore[return-value]

    def _lead(self, me: _Request) -> None:
        """Run one batch that includes ``me``, then pass the lead to the next waiting request."""
        with self._lock:
            batch, n = [], 0
            while self._pending and (not batch or n + len(self._pending[0].queries)
                                     <= self.max_queries):
                r = self._pending.pop(0)
                batch.append(r)
                n += len(r.queries)
            if me not in batch:  # cannot happen: the leader is always first in line
                batch.append(me)
                self._pending.remove(me)
        self._run(batch)
        with self._lock:
            if self._pending:
                nxt = self._pending[0]
                nxt.lead = True
                nxt.done.set()
            else:
                self._busy = False
        for r in batch:
            if r is not me:
                r.done.set()

    def _run(self, batch: list[_Request]) -> None:
        self.batches += 1
        _search_together(self.index, batch)


def _search_together(index: Index, batch: list) -> None:
    """Answer every request of ``batch`` (objects with queries, k, exclusions, result, error)
    with one index search where possible."""
    if len(batch) == 1:
        r = batch[0]
        try:
            r.result = index.search(r.queries, r.k, r.exclusions)
        except BaseException as exc:  # handed to the request's own thread or task
            r.error = exc
        return
    # The hits for a smaller k are a prefix of those for a larger one (exclusions apply before
    # the cut, ties by row), so one search at the largest k serves every request.
    queries = [q for r in batch for q in r.queries]
    exclusions = [e for r in batch for e in r.exclusions]
    try:
        hits = index.search(queries, max(r.k for r in batch), exclusions)
    except BaseException:
        # One bad query must fail its own request only: run them apart to say whose.
        for r in batch:
            _search_together(index, [r])
        return
    i = 0
    for r in batch:
        r.result = [h[: r.k] for h in hits[i:i + len(r.queries)]]
        i += len(r.queries)


@dataclass
class _LoopRequest:
    queries: list[str]
    k: int
    exclusions: list[Exclusion | None]
    future: Any  # asyncio.Future
    result: list[list[Hit]] | None = None
    error: BaseException | None = None


class LoopBatcher:
    """``await search(...)``, batched per turn of the running event loop (see above). Only for
    requests small enough to run on the loop: a batch blocks it while it runs."""

    def __init__(self, index: Index, max_queries: int = 64):
        self.index = index
        self.max_queries = max_queries
        self._pending: list[_LoopRequest] = []
        self._scheduled = False
        self.batches = 0

    @property
    def corpus(self):
        return self.index.corpus

    async def search(self, queries: Sequence[str], k: int,
                     exclusions: Sequence[Exclusion | None] | None = None) -> list[list[Hit]]:
        loop = asyncio.get_running_loop()
        req = _LoopRequest(list(queries), k,
                           list(exclusions) if exclusions is not None else [None] * len(queries),
                           loop.create_future())
        self._pending.append(req)
        if not self._scheduled:
            self._scheduled = True
            # Two hops: the tasks of requests read in this turn were scheduled after this one
            # and reach search() later in the same turn; the batch waits for them.
            loop.call_soon(loop.call_soon, self._flush)
        await req.future
        if req.error is not None:
            raise req.error
        return req.result  # type: ignore[return-value]

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        while pending:
            batch, n = [], 0
            while pending and (not batch or n + len(pending[0].queries) <= self.max_queries):
                r = pending.pop(0)
                batch.append(r)
                n += len(r.queries)
            self.batches += 1
            _search_together(self.index, batch)
            for r in batch:
                if not r.future.done():  # a cancelled request (client gone) needs no answer
                    r.future.set_result(None)
