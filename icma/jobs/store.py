"""Batch translation jobs: a durable SQLite store and the runner that works through it.

Durability is the store's: a job and all its items are written in one transaction when it is
created; every batch's results are written in one transaction as they are produced, each only
if that item has none yet. A worker killed at any instant therefore leaves every item either
done or not, never half; on restart, jobs that were running are queued again and carry on with
the items still without a result, so a job ends with exactly one result per input.

Result lines (``GET /v1/jobs/{id}/results``, ``icma translate --output``) are JSON objects in
input order: ``index``, ``id``, ``input``, ``reference`` (when given), ``prediction`` (``""`` when
the item failed), for cap2mol ``valid``, ``canonical_smiles`` and ``candidates_tried``, the
examples' CIDs, and ``error`` (``null`` or ``{code, message, field}``). ``icma eval --format
jsonl`` reads them directly.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from icma.core.errors import ConflictError, IcmaError, InputError, NotFoundError, \
    QueueFullError, UnavailableError

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,          -- submission order
    kind TEXT NOT NULL,
    task TEXT NOT NULL,
    state TEXT NOT NULL,
    options TEXT NOT NULL,         -- JSON, as submitted
    total INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    message TEXT,                  -- why it failed, or what it waits for
    progress TEXT                  -- JSON: a tune job's phase, step, loss, ...
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS items (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    id TEXT,
    input TEXT NOT NULL,
    reference TEXT,
    result TEXT,                   -- the result line (JSON), NULL until done
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
"""


class JobNotFound(NotFoundError):
    """No job with that id (a 404)."""


class JobConflict(ConflictError):
    """The job is not in a state that allows it (a 409)."""


@dataclass(frozen=True)
class Item:
    input: str
    id: str | None = None
    reference: str | None = None


@dataclass
class Job:
    id: str
    kind: str
    task: str
    state: str
    options: dict
    total: int
    done: int
    failed: int
    created: float
    started: float | None
    finished: float | None
    message: str | None
    progress: dict | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


# --- reading job inputs ------------------------------------------------------------------------

def parse_items(task: str, text: str, fmt: str, where: str = "file") -> list[Item]:
    """Items from an uploaded file. ``jsonl``: one object per line, ``{"input", "id",
    "reference"}`` or a corpus record ``{"cid", "smiles", "description"}``, or a bare JSON
    string. ``tsv``: a corpus file (``CID SMILES description`` header): the input is the SMILES
    for mol2cap and the description for cap2mol, the other side is the reference. A malformed
    line refuses the whole file (naming the line); a bad value (an invalid SMILES, an empty
    caption) is that item's error when the job runs."""
    if fmt == "jsonl":
        items = []
        for n, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise InputError(f"line {n}: invalid JSON ({exc.msg})", field=where) from None
            items.append(_item(task, obj, f"{where} line {n}"))
    elif fmt == "tsv":
        from icma.core.corpus import parse_corpus_text

        corpus, report = parse_corpus_text(text, fmt="tsv", name=where, on_invalid="keep")
        if report.malformed:
            line, why = report.malformed[0]
            raise InputError(f"line {line}: {why}", field=where)
        smiles_side = task == "mol2cap"
        items = [Item(r.smiles if smiles_side else r.description, r.cid,
                      (r.description or None) if smiles_side else r.smiles)
                 for r in corpus.records]
    else:
        raise InputError(f"unknown input format {fmt!r}; use jsonl or tsv", field="format")
    if not items:
        raise InputError("no items in the file", field=where)
    return items


def _item(task: str, obj, where: str) -> Item:
    if isinstance(obj, str):
        return Item(obj)
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object or string", field="items")
    keys = {k.lower(): k for k in obj}
    if "input" in keys:
        value, ref = obj[keys["input"]], obj.get(keys.get("reference", ""), None)
    elif task == "mol2cap" and "smiles" in keys:
        value, ref = obj[keys["smiles"]], obj.get(keys.get("description", ""), None)
    elif task == "cap2mol" and "description" in keys:
        value, ref = obj[keys["description"]], obj.get(keys.get("smiles", ""), None)
    else:
        side = "smiles" if task == "mol2cap" else "description"
        raise InputError(f"{where}: needs 'input' (or '{side}')", field="items")
    ident = obj.get(keys.get("id", keys.get("cid", "")), None)
    if not isinstance(value, str):
        raise InputError(f"{where}: 'input' must be a string", field="items")
    return Item(value, None if ident is None else str(ident),
                None if ref in (None, "") else str(ref))


# --- the store ---------------------------------------------------------------------------------

class JobStore:
    """Jobs and their items in one SQLite file. Safe to share between threads (one connection
    behind a lock; SQLite serialises writers anyway)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed batch of results survives a power cut as well as a SIGKILL.
        self._db.execute("PRAGMA synchronous=FULL")
        self._lock = threading.RLock()
        with self._lock:
            self._db.executescript(SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
            if "progress" not in columns:  # a store written before tune jobs existed
                self._db.execute("ALTER TABLE jobs ADD COLUMN progress TEXT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self):
        return _Transaction(self._db, self._lock)

    # jobs
    def create(self, kind: str, task: str, options: dict, items: Sequence[Item],
               max_active: int | None = None, job_id: str | None = None) -> Job:
        job_id = job_id or uuid.uuid4().hex
        with self._tx() as db:
            if max_active is not None:
                (n,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', "
                                  "'running')").fetchone()
                if n >= max_active:
                    raise QueueFullError(f"{n} jobs are queued or running, the most this worker "
                                    f"takes; retry when one has finished", field="jobs")
            (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()
            db.execute("INSERT INTO jobs (id, seq, kind, task, state, options, total, created) "
                       "VALUES (?, ?, ?, ?, 'queued', ?, ?, ?)",
                       (job_id, seq, kind, task, json.dumps(options), len(items), time.time()))
            db.executemany("INSERT INTO items (job_id, idx, id, input, reference) "
                           "VALUES (?, ?, ?, ?, ?)",
                           [(job_id, i, it.id, it.input, it.reference)
                            for i, it in enumerate(items)])
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        with self._lock:
            row = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?",
                                   (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id!r}", field="job_id")
        return _job(row)

    def find(self, job_id: str) -> Job | None:
        try:
            return self.get(job_id)
        except JobNotFound:
            return None

    def list(self, state: str | None = None, limit: int = 100) -> list[Job]:
        where, args = ("WHERE state = ?", (state,)) if state else ("", ())
        with self._lock:
            rows = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs {where} ORDER BY seq DESC "
                                    f"LIMIT ?", (*args, limit)).fetchall()
        return [_job(r) for r in rows]

    def next_queued(self, kind: str = "translate") -> Job | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = 'queued' "
                                   f"AND kind = ? ORDER BY seq LIMIT 1", (kind,)).fetchone()
        return None if row is None else _job(row)

    def set_progress(self, job_id: str, progress: dict, done: int | None = None,
                     total: int | None = None) -> None:
        """A long job's own progress record (tuning: phase, step, loss, ETA), with its
        step counts as ``done``/``total`` when given."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET progress = ?, done = COALESCE(?, done), "
                       "total = COALESCE(?, total) WHERE id = ?",
                       (json.dumps(progress), done, total, job_id))

    def set_state(self, job_id: str, state: str, message: str | None = None,
                  only_from: Sequence[str] = ACTIVE) -> bool:
        """Move a job to ``state`` if it is in one of ``only_from`` (cancellation wins races:
        a cancelled job is never set running or succeeded afterwards)."""
        now = time.time()
        marks = {"running": ", started = COALESCE(started, ?)",
                 "succeeded": ", finished = ?", "failed": ", finished = ?",
                 "cancelled": ", finished = ?"}.get(state, "")
        args = (now,) if marks else ()
        ph = ", ".join("?" * len(only_from))
        with self._tx() as db:
            cur = db.execute(f"UPDATE jobs SET state = ?, message = ?{marks} WHERE id = ? "
                             f"AND state IN ({ph})", (state, message, *args, job_id, *only_from))
            return cur.rowcount == 1

    def set_message(self, job_id: str, message: str | None) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET message = ? WHERE id = ?", (message, job_id))

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if not job.active:
            raise JobConflict(f"job {job_id} has already {job.state}; only queued or running "
                              f"jobs can be cancelled", field="job_id")
        self.set_state(job_id, "cancelled", "cancelled by request")
        return self.get(job_id)

    def requeue_interrupted(self) -> int:
        """At start-up: jobs left running by a stopped or killed worker go back to the queue."""
        with self._tx() as db:
            return db.execute("UPDATE jobs SET state = 'queued', message = 'resumed after a "
                              "restart' WHERE state = 'running'").rowcount

    def count_active(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', "
                                    "'running')").fetchone()[0]

    # items
    def pending(self, job_id: str, limit: int) -> list[tuple[int, Item]]:
        with self._lock:
            rows = self._db.execute("SELECT idx, id, input, reference FROM items WHERE job_id = ? "
                                    "AND result IS NULL ORDER BY idx LIMIT ?",
                                    (job_id, limit)).fetchall()
        return [(r[0], Item(r[2], r[1], r[3])) for r in rows]

    def record(self, job_id: str, results: Sequence[tuple[int, dict]]) -> int:
        """Store finished items (``idx``, result line) in one transaction; an item that already
        has a result keeps it. Returns how many were new."""
        new = failed = 0
        with self._tx() as db:
            for idx, line in results:
                cur = db.execute("UPDATE items SET result = ? WHERE job_id = ? AND idx = ? AND "
                                 "result IS NULL", (json.dumps(line, ensure_ascii=False),
                                                    job_id, idx))
                new += cur.rowcount
                failed += cur.rowcount if line.get("error") else 0
            db.execute("UPDATE jobs SET done = done + ?, failed = failed + ? WHERE id = ?",
                       (new, failed, job_id))
        return new

    def results(self, job_id: str, start: int = 0, limit: int = 500) -> list[tuple[int, Item,
                                                                                  dict | None]]:
        with self._lock:
            rows = self._db.execute("SELECT idx, id, input, reference, result FROM items WHERE "
                                    "job_id = ? AND idx >= ? ORDER BY idx LIMIT ?",
                                    (job_id, start, limit)).fetchall()
        return [(r[0], Item(r[2], r[1], r[3]), None if r[4] is None else json.loads(r[4]))
                for r in rows]


_JOB_COLUMNS = ("id, kind, task, state, options, total, done, failed, created, started, "
                "finished, message, progress")


def _job(row) -> Job:
    return Job(row[0], row[1], row[2], row[3], json.loads(row[4]), *row[5:12],
               json.loads(row[12]) if row[12] else None)


class _Transaction:
    def __init__(self, db: sqlite3.Connection, lock: threading.RLock):
        self.db, self.lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self.lock.release()


# --- result lines ------------------------------------------------------------------------------

def error_json(exc: IcmaError) -> dict:
    return {"code": exc.code, "message": exc.message, "field": exc.field}


def result_line(task: str, idx: int, item: Item, outcome=None, error: dict | None = None) -> dict:
    """One result line. ``outcome``: an ``icma.generation.pipeline.Outcome``."""
    line: dict = {"index": idx, "id": item.id, "input": item.input}
    if item.reference is not None:
        line["reference"] = item.reference
    t = outcome.translation if outcome is not None else None
    if outcome is not None and outcome.error is not None:
        error = error_json(outcome.error)
    line["prediction"] = t.answer if t is not None else ""
    if task == "cap2mol":
        line["valid"] = bool(t and t.valid)
        line["canonical_smiles"] = t.canonical if t is not None else None
        line["candidates_tried"] = outcome.candidates_tried if outcome is not None else 0
    line["examples"] = [e.cid for e in t.examples] if t is not None else []
    line["finish_reason"] = t.finish_reason if t is not None else None
    line["error"] = error
    return line


def iter_results(store: JobStore, job_id: str, follow: bool = True,
                 poll: float = 0.5) -> Iterator[str]:
    """Result lines in input order, one per input. ``follow``: wait for items still being
    worked on (like ``tail -f``) until the job ends; otherwise stop at the first unfinished
    item. Items a cancelled or failed job never reached get an error line."""
    idx = 0
    while True:
        rows = store.results(job_id, idx)
        if not rows:
            return
        for i, item, line in rows:
            while line is None:
                job = store.get(job_id)
                if not job.active:
                    line = store.results(job_id, i, 1)[0][2] or result_line(
                        job.task, i, item, error={"code": job.state, "field": None,
                                                  "message": f"not translated: the job "
                                                             f"{job.state}"})
                    break
                if not follow:
                    return
                time.sleep(poll)
                line = store.results(job_id, i, 1)[0][2]
            yield json.dumps(line, ensure_ascii=False) + "\n"
            idx = i + 1


# --- the runner --------------------------------------------------------------------------------

#: Translates one batch: (task, items, options) -> one result line per item, in order.
BatchFn = Callable[[str, list[tuple[int, Item]], dict], list[dict]]


class TransientError(UnavailableError):
    """A failure that waiting may fix (the retrieval service is down): the batch is retried."""


class JobRunner:
    """One thread working through queued jobs in submission order, a batch at a time."""

    def __init__(self, store: JobStore, run_batch: BatchFn, batch_size: int = 16,
                 retry_wait: float = 2.0, on_progress: Callable[[Job], None] | None = None):
        self.store, self.run_batch, self.batch_size = store, run_batch, batch_size
        self.retry_wait = retry_wait
        self.on_progress = on_progress
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
            job = self.store.next_queued()
            if job is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                self.run_job(job)
            except Exception:  # a bug in a job must not stop the runner
                log.exception("job %s failed", job.id)
                self.store.set_state(job.id, "failed", "internal error (see the worker's log)")

    def run_job(self, job: Job) -> Job:
        """Run ``job`` to its end (also used in-process by ``icma translate``)."""
        if not self.store.set_state(job.id, "running", None, only_from=("queued",)):
            return self.store.get(job.id)  # cancelled meanwhile
        while not self._stop.is_set():
            if self.store.get(job.id).state != "running":
                return self.store.get(job.id)  # cancelled
            batch = self.store.pending(job.id, self.batch_size)
            if not batch:
                self.store.set_state(job.id, "succeeded", None, only_from=("running",))
                break
            try:
                lines = self.run_batch(job.task, batch, job.options)
            except TransientError as exc:
                self.store.set_message(job.id, f"waiting: {exc}")
                self._stop.wait(self.retry_wait)
                continue
            self.store.record(job.id, [(idx, line) for (idx, _), line in zip(batch, lines)])
            self.store.set_message(job.id, None)
            if self.on_progress:
                self.on_progress(self.store.get(job.id))
        return self.store.get(job.id)
