"""The job runner: one thread working through queued jobs, a batch at a time, and the batch
function that translates a batch through ``icma.generation.pipeline``.

A dependency that is down (the retrieval service down or its corpus still building, the engine
still loading: an ``UnavailableError``) makes the runner wait and retry the batch instead of
failing its items. The runner also deletes expired jobs, when it starts and hourly.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from icma.core.errors import IcmaError, StorageError, UnavailableError
from icma.generation.engines import Generator
from icma.generation.options import Options
from icma.generation.pipeline import Outcome, run_isolating
from icma.generation.retrievers import Retriever
from icma.evaluation.predictions import result_line
from icma.jobs.store import Item, Job, JobStore

log = logging.getLogger(__name__)


#: Translates one batch: (task, items, options) -> one result line per item, in order.
BatchFn = Callable[[str, list[tuple[int, Item]], dict], list[dict]]
#: Runs a whole job elsewhere, recording its results in the store as they come (the Ray
#: executor): (store, job, stop, on_progress) -> the job as it then stands.
Executor = Callable[[JobStore, Job, threading.Event, Callable[[Job], None] | None], Job]
#: Seconds between two deletions of expired jobs (the first runs when the runner starts).
EXPIRE_EVERY = 3600.0
#: Seconds the runner waits before looking at a store that failed to read again.
DAMAGED_WAIT = 30.0


class JobRunner:
    """One thread working through queued jobs in submission order, a batch at a time."""

    def __init__(self, store: JobStore, run_batch: BatchFn, batch_size: int = 16,
                 retry_wait: float = 2.0, on_progress: Callable[[Job], None] | None = None,
                 retention_days: float = 0.0, executor: Executor | None = None):
        """``retention_days``: finished jobs are deleted that long after they ended (0: kept
        forever). ``executor``: run each job with it instead of ``run_batch`` a batch at a
        time here (``icma.jobs.ray_executor``)."""
        self.store, self.run_batch, self.batch_size = store, run_batch, batch_size
        self.executor = executor
        self.retry_wait = retry_wait
        self.on_progress = on_progress
        self.retention_days = retention_days
        self._next_expiry = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="jobs", daemon=True)

    def start(self) -> None:
        n = self.store.requeue_interrupted()
        if n:
            log.info("resuming %d interrupted job(s)", n)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._expire_due()
            try:
                job = self.store.next_queued()
            except StorageError:  # logged by the store; the worker keeps answering what it can
                self._stop.wait(DAMAGED_WAIT)
                continue
            if job is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                self.run_job(job)
            except StorageError as exc:  # its rows are damaged: say so, and go on to the next
                self.store.set_state(job.id, "failed", exc.message)
            except Exception:  # a bug in a job must not stop the runner
                log.exception("job %s failed", job.id)
                self.store.set_state(job.id, "failed", "internal error (see the worker's log)")

    def run_job(self, job: Job) -> Job:
        """Run ``job`` to its end (also used in-process by ``icma translate``)."""
        if not self.store.set_state(job.id, "running", None, only_from=("queued",)):
            return self.store.get(job.id)  # cancelled meanwhile
        while not self._stop.is_set():
            self._expire_due()
            if self.store.get(job.id).state != "running":
                return self.store.get(job.id)  # cancelled
            batch = self.store.pending(job.id, 1 if self.executor else self.batch_size)
            if not batch:  # (an executor's message says where the job ran)
                message = self.store.get(job.id).message if self.executor else None
                self.store.set_state(job.id, "succeeded", message, only_from=("running",))
                break
            try:
                if self.executor is not None:
                    self.executor(self.store, job, self._stop, self.on_progress)
                    continue  # (its message stays: where the job ran)
                lines = self.run_batch(job.task, batch, job.options)
            except UnavailableError as exc:  # waiting may fix it (retrieval down, engine loading)
                self.store.set_message(job.id, f"waiting: {exc}")
                self._stop.wait(self.retry_wait)
                continue
            self.store.record(job.id, [(idx, line) for (idx, _), line in zip(batch, lines)])
            self.store.set_message(job.id, None)
            if self.on_progress:
                self.on_progress(self.store.get(job.id))
        return self.store.get(job.id)

    def _expire_due(self) -> None:
        """Delete expired jobs when it is time (also between the batches of a long job)."""
        if not self.retention_days or time.monotonic() < self._next_expiry:
            return
        self._next_expiry = time.monotonic() + EXPIRE_EVERY
        try:
            n = self.store.expire(self.retention_days * 86400)
        except Exception:  # retention must never stop the jobs
            log.exception("deleting expired jobs failed")
            return
        if n:
            log.info("deleted %d job(s) finished over %g day(s) ago", n, self.retention_days)


def batch_translator(retriever: Retriever, engine: Generator,
                     options_for: Callable[[str, dict], Options],
                     max_heavy_atoms: int | None = None) -> BatchFn:
    """The runner's batch function: a job's stored options -> ``Options`` by ``options_for``,
    then ``run_isolating`` (a SMILES of more than ``max_heavy_atoms`` is its item's error).
    ``UnavailableError`` goes up to the runner, which waits."""

    def run(task: str, items, raw: dict) -> list[dict]:
        try:
            outs = run_isolating(task, [it.input for _, it in items], options_for(task, raw),
                                 retriever, engine, max_heavy_atoms)
        except UnavailableError:
            raise
        except IcmaError as exc:  # e.g. an adapter removed after the job was queued
            outs = [Outcome(error=exc) for _ in items]
        return [result_line(task, idx, it.input, id=it.id, reference=it.reference, outcome=o)
                for (idx, it), o in zip(items, outs)]

    return run
