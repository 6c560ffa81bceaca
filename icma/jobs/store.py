"""The durable job store: jobs and their items in one SQLite file.

Durability is the store's: a job and all its items are written in one transaction when it is
created; every batch's results are written in one transaction as they are produced, each only
if that item has none yet. A worker killed at any instant therefore leaves every item either
done or not, never half; on restart, jobs that were running are queued again and carry on with
the items still without a result, so a job ends with exactly one result per input.

A damaged file (truncated, overwritten, not a database) is found at start (``PRAGMA
quick_check``) and refused with one line naming the file and what to do; damage met later is a
``StorageError`` (a clear 500), never a traceback or a silently cut answer. Finished jobs are
deleted ``expire``'s age after they end, and the space goes back to the file system: new files
are made with ``auto_vacuum=INCREMENTAL``; older ones are converted by one ``VACUUM`` the first
time something expires.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from icma.core.errors import ConflictError, NotFoundError, QueueFullError, StorageError

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")
#: Jobs deleted per transaction when they expire (other writers wait at most that long).
EXPIRE_CHUNK = 50

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


class JobStore:
    """Jobs and their items in one SQLite file. Safe to share between threads (one connection
    behind a lock; SQLite serialises writers anyway)."""

    def __init__(self, path: str | Path):
        """Open (or create) the store at ``path``. A damaged file is a StorageError whose
        message names it and says what to do (the CLI prints it as one line)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                       timeout=30)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the job database {self.path} ({exc}): check that "
                               "it and its folder are writable", field="ICMA_JOBS_DB") from None
        try:
            if self._db.execute("PRAGMA page_count").fetchone()[0] == 0:  # a new file
                self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # before the first table
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed batch of results survives a power cut as well as a SIGKILL.
            self._db.execute("PRAGMA synchronous=FULL")
            problems = [r[0] for r in self._db.execute("PRAGMA quick_check").fetchmany(3)]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems))
            self._db.executescript(SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
            if "progress" not in columns:  # a store written before tune jobs existed
                self._db.execute("ALTER TABLE jobs ADD COLUMN progress TEXT")
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if not _is_damage(exc):  # locked, read-only, no room
                raise StorageError(f"cannot use the job database {self.path} ({exc}): check "
                                   "that it and its folder are writable and the disk has room",
                                   field="ICMA_JOBS_DB") from None
            raise StorageError(
                f"the job database {self.path} is damaged ({exc}): stop the worker and move it "
                "aside, with its -wal and -shm files (the next start makes an empty one; "
                "'sqlite3 FILE .recover' may save what is left), or restore it from a back-up",
                field="ICMA_JOBS_DB") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self):
        return _Transaction(self._db, self._lock, self._damaged)

    @contextlib.contextmanager
    def _reading(self):
        """The connection, under the lock, with damage met while reading (a corrupt page, a
        stored value that is not what was written) raised as a StorageError."""
        with self._lock:
            try:
                yield self._db
            except (sqlite3.DatabaseError, json.JSONDecodeError) as exc:
                raise self._damaged(exc) from None

    def _damaged(self, exc: Exception) -> Exception:
        """The error to raise for ``exc``: a StorageError when the file is damaged."""
        if not _is_damage(exc):
            return exc
        # The response must not show the file's path; the log names it for the operator.
        log.error("the job database %s is damaged (%s: %s): stop the worker and move it aside "
                  "or restore it from a back-up", self.path, type(exc).__name__, exc)
        return StorageError("the job database is damaged where this request reads it; the "
                            "worker's operator must repair or restore it (the worker's log "
                            "says how)", field="job_id")

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
        with self._reading() as db:
            row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?",
                             (job_id,)).fetchone()
            job = None if row is None else _job(row)
        if job is None:
            raise JobNotFound(f"no job {job_id!r}", field="job_id")
        return job

    def find(self, job_id: str) -> Job | None:
        try:
            return self.get(job_id)
        except JobNotFound:
            return None

    def list(self, state: str | None = None, limit: int = 100) -> list[Job]:
        where, args = ("WHERE state = ?", (state,)) if state else ("", ())
        with self._reading() as db:
            rows = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs {where} ORDER BY seq DESC "
                              f"LIMIT ?", (*args, limit)).fetchall()
            return [_job(r) for r in rows]

    def next_queued(self, kind: str = "translate") -> Job | None:
        with self._reading() as db:
            row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = 'queued' "
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
        with self._reading() as db:
            return db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', "
                              "'running')").fetchone()[0]

    # items
    def pending(self, job_id: str, limit: int) -> list[tuple[int, Item]]:
        with self._reading() as db:
            rows = db.execute("SELECT idx, id, input, reference FROM items WHERE job_id = ? "
                              "AND result IS NULL ORDER BY idx LIMIT ?", (job_id, limit)).fetchall()
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
        with self._reading() as db:
            rows = db.execute("SELECT idx, id, input, reference, result FROM items WHERE "
                              "job_id = ? AND idx >= ? ORDER BY idx LIMIT ?",
                              (job_id, start, limit)).fetchall()
            return [(r[0], Item(r[2], r[1], r[3]), None if r[4] is None else json.loads(r[4]))
                    for r in rows]

    # retention
    def expire(self, older_than: float, now: float | None = None) -> int:
        """Delete the jobs that finished (succeeded, failed, cancelled) more than
        ``older_than`` seconds ago, with their items, and give the space back to the file
        system. Queued and running jobs stay, however old. Returns how many jobs went."""
        cutoff = (time.time() if now is None else now) - older_than
        ph = ", ".join("?" * len(FINISHED))
        with self._reading() as db:
            ids = [r[0] for r in db.execute(
                f"SELECT id FROM jobs WHERE state IN ({ph}) AND COALESCE(finished, created) < ?",
                (*FINISHED, cutoff)).fetchall()]
        for i in range(0, len(ids), EXPIRE_CHUNK):
            chunk = [(x,) for x in ids[i:i + EXPIRE_CHUNK]]
            with self._tx() as db:
                db.executemany("DELETE FROM items WHERE job_id = ?", chunk)
                db.executemany("DELETE FROM jobs WHERE id = ?", chunk)
        if ids:
            self._reclaim()
        return len(ids)

    def _reclaim(self) -> None:
        """Free pages back to the file system. auto_vacuum can change only through a VACUUM
        (once, for a store made before it was set); later an incremental vacuum moves no
        data. The checkpoint then shrinks the file and its write-ahead log."""
        with self._reading() as db:
            if db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:  # 2: incremental
                db.execute("PRAGMA auto_vacuum=INCREMENTAL")
                db.execute("VACUUM")
            else:  # executescript steps it to the end (execute frees one page)
                db.executescript("PRAGMA incremental_vacuum;")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


_JOB_COLUMNS = ("id, kind, task, state, options, total, done, failed, created, started, "
                "finished, message, progress")


def _is_damage(exc: Exception) -> bool:
    """Whether an error reading the database means the file is damaged (a corrupt page, not a
    database, a stored value that does not decode), rather than a bug (a constraint, misuse) or
    the disk or a lock (locked, read-only, no room)."""
    if isinstance(exc, json.JSONDecodeError):
        return True
    if isinstance(exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError)):
        return False
    return not isinstance(exc, sqlite3.OperationalError) or "decode" in str(exc)


def _job(row) -> Job:
    return Job(row[0], row[1], row[2], row[3], json.loads(row[4]), *row[5:12],
               json.loads(row[12]) if row[12] else None)


class _Transaction:
    def __init__(self, db: sqlite3.Connection, lock: threading.RLock, damaged):
        self.db, self.lock, self.damaged = db, lock, damaged

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException as exc:
            self.lock.release()
            if isinstance(exc, sqlite3.DatabaseError):
                raise self.damaged(exc) from None
            raise
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        except sqlite3.DatabaseError as err:
            if exc is None:
                raise self.damaged(err) from None
        finally:
            self.lock.release()
        if isinstance(exc, sqlite3.DatabaseError):
            raise self.damaged(exc) from None


