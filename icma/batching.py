"""Coalescing concurrent searches on one index into one call (group commit).

A service answers each request in its own thread. Searching one query at a time, every graph
query embeds one molecule and scans all corpus embeddings (tens of MB) by itself; searched
together, the queries share one GNN forward pass and one scan. While a search runs, requests
that arrive queue up; when it ends, the first of them runs the whole queue as one batch. Nobody
waits for a timer: at low load a request runs at once, alone.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Sequence

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
        if len(batch) == 1:
            r = batch[0]
            try:
                r.result = self.index.search(r.queries, r.k, r.exclusions)
            except BaseException as exc:  # handed to the request's own thread
                r.error = exc
            return
        # The hits for a smaller k are a prefix of those for a larger one (exclusions apply
        # before the cut, ties by row), so one search at the largest k serves every request.
        queries = [q for r in batch for q in r.queries]
        exclusions = [e for r in batch for e in r.exclusions]
        try:
            hits = self.index.search(queries, max(r.k for r in batch), exclusions)
        except BaseException:
            # One bad query must fail its own request only: run them apart to say whose.
            for r in batch:
                self._run([r])
            return
        i = 0
        for r in batch:
            r.result = [h[: r.k] for h in hits[i:i + len(r.queries)]]
            i += len(r.queries)
