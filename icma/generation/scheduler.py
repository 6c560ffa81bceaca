"""One thread owns the engine; requests and job batches queue for it.

A model runs one ``generate`` at a time (torch and vLLM's offline engine are not safe to call
from several threads), so every caller submits work here and waits on a future. Whatever is
waiting when the engine frees up is merged into one ``generate`` call per (adapter, decoding
settings) group, so concurrent requests batch together (vLLM batches continuously within a
call). Interactive requests go before job batches: a user waiting on ``/mol2cap`` should not sit
behind a 10,000-item job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

from icma.generation.engines import Adapter, Generation, GenerationInput, GenerationParams, Generator
from icma.core.errors import UnavailableError

log = logging.getLogger(__name__)

INTERACTIVE, BATCH = 0, 1


@dataclass
class _Work:
    inputs: list[GenerationInput]
    params: GenerationParams
    adapter: Adapter | None
    future: Future = field(default_factory=Future)

    @property
    def key(self):
        return (self.adapter, self.params)


class EngineNotReady(UnavailableError):
    """The engine is still loading (or failed to load): the worker answers 503."""


class GenerationQueue:
    """Owns a ``Generator``, loaded in the background by ``load`` (the service answers health
    checks meanwhile). ``max_batch``: most prompts merged into one ``generate`` call."""

    def __init__(self, load: Callable[[], Generator], max_batch: int = 64):
        self._load = load
        self.max_batch = max_batch
        self.engine: Generator | None = None
        self.error: str | None = None
        self._queues: tuple[deque[_Work], deque[_Work]] = (deque(), deque())
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.busy_seconds = 0.0  # time spent in generate(), for /metrics
        self.draft_tokens = 0  # prompt-lookup speculation, requests and jobs alike
        self.accepted_tokens = 0
        self.prompt_tokens = 0  # as the engine counted them (openai: the server's usage)
        self.completion_tokens = 0

    def start(self) -> None:
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def wait_ready(self, timeout: float | None = None) -> Generator:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self.engine is None and self.error is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cv.wait(left)
        return self.check_ready()

    def check_ready(self) -> Generator:
        if self.error is not None:
            raise EngineNotReady(f"the engine failed to load: {self.error}", field="engine")
        if self.engine is None:
            raise EngineNotReady("the engine is still loading; retry shortly", field="engine")
        return self.engine

    def submit(self, inputs: Sequence[GenerationInput], params: GenerationParams,
               adapter: Adapter | None = None, priority: int = INTERACTIVE) -> Future:
        self.check_ready()
        work = _Work(list(inputs), params, adapter)
        with self._cv:
            self._queues[priority].append(work)
            self._cv.notify_all()
        return work.future

    def generate(self, inputs: Sequence[GenerationInput], params: GenerationParams,
                 adapter: Adapter | None = None,
                 priority: int = INTERACTIVE) -> list[Generation]:
        """Submit and wait (the engine's own errors, e.g. a bad adapter, are raised here)."""
        return self.submit(inputs, params, adapter, priority).result()

    def depth(self) -> int:
        with self._cv:
            return sum(len(w.inputs) for q in self._queues for w in q)

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        if self.engine is not None:
            self.engine.close()

    def _run(self) -> None:
        try:
            engine = self._load()
        except Exception as exc:  # reported by /readyz and every request, not a crash
            log.exception("engine failed to load")
            with self._cv:
                self.error = str(exc) or type(exc).__name__
                self._cv.notify_all()
            return
        with self._cv:
            self.engine = engine
            self._cv.notify_all()
        while True:
            with self._cv:
                while not self._stop and not any(self._queues):
                    self._cv.wait()
                if self._stop:
                    break
                group = self._take()
            t0 = time.perf_counter()
            self._execute(engine, group)
            self.busy_seconds += time.perf_counter() - t0
        for q in self._queues:  # stopped: nobody will run these
            for w in q:
                w.future.set_exception(EngineNotReady("the worker is shutting down"))

    def _take(self) -> list[_Work]:
        """The first waiting item of the highest priority, and every queued item of the same
        priority that shares its adapter and settings, up to ``max_batch`` prompts."""
        queue = self._queues[INTERACTIVE] if self._queues[INTERACTIVE] else self._queues[BATCH]
        first = queue.popleft()
        group, n = [first], len(first.inputs)
        for w in list(queue):
            if w.key == first.key and n + len(w.inputs) <= self.max_batch:
                queue.remove(w)
                group.append(w)
                n += len(w.inputs)
        return group

    def _execute(self, engine: Generator, group: list[_Work]) -> None:
        live = [w for w in group if w.future.set_running_or_notify_cancel()]
        if not live:
            return
        inputs = [x for w in live for x in w.inputs]
        try:
            out = engine.generate(inputs, live[0].params, adapter=live[0].adapter)
        except Exception as exc:
            for w in live:
                w.future.set_exception(exc)
            return
        self.draft_tokens += sum(g.draft_tokens for g in out)
        self.accepted_tokens += sum(g.accepted_tokens for g in out)
        at, per = 0, live[0].params.samples_per_prompt  # (one key: the same settings)
        self.prompt_tokens += sum(g.prompt_tokens for g in out[::per])  # once per prompt
        self.completion_tokens += sum(g.completion_tokens for g in out)
        for w in live:
            w.future.set_result(out[at:at + len(w.inputs) * per])
            at += len(w.inputs) * per
