"""Nothing accepted and then lost, nothing left behind, damage found and handled (issue 13):
uploads that survive a restart, temporary files, "still building" as a transient 503, damaged
job databases and index files, and the retention of finished jobs.

Real parts throughout: the services over real HTTP on 127.0.0.1, real SQLite files damaged on
disk, real index files truncated on disk.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from icma.core.corpus import Corpus, Record, read_corpus, write_corpus
from icma.core.errors import StorageError
from icma.core.settings import Settings
from icma.jobs.store import Item, JobStore
from icma.retrieval import load_index
from icma.retrieval.cache import cached_index
from icma.retrieval.store import CorpusStore
from icma.services.retrieval.app import create_app as retrieval_app
from icma.workers.translator.app import create_app as worker_app
from icma.workers.translator.serving import TranslatorService
from tests.conftest import REPO, SERVICE_KINDS
from tests.service_helpers import LiveServer

KEY = {"Authorization": "Bearer k"}
HOUR = 3600.0
DAY = 86400.0


def data_copy(svc_dir: Path, tmp: Path) -> Path:
    """A data directory of its own with the session's prebuilt indexes (uploads and damage
    here must not reach the other tests' shared one)."""
    shutil.copytree(svc_dir / "indexes", tmp / "indexes",
                    ignore=shutil.ignore_patterns(".locks"))
    return tmp


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def nothing_kept(server, name: str) -> bool:
    """No corpus file of ``name`` and no temporary file at all in the corpora folder."""
    return not [n for n in leftovers(server.data / "corpora")
                if n.startswith((name, ".")) or n.endswith(".part")]


# --- uploads: refused with the reason, or kept in a form that reads back the same ------------

@pytest.fixture(scope="module")
def uploads(svc_dir, tmp_path_factory):
    data = data_copy(svc_dir, tmp_path_factory.mktemp("uploads"))
    app = retrieval_app(Settings(data_dir=data, retrieval_kinds=["morgan", "bm25"],
                                 api_key="k"))
    with LiveServer(app) as server:
        server.data = data
        yield server


def upload(server, name: str, filename: str, body: bytes) -> httpx.Response:
    return httpx.post(server.url + "/v1/corpora", data={"name": name}, headers=KEY,
                      files={"file": (filename, body)}, timeout=60)


def refused(r: httpx.Response, field: str, *words: str) -> None:
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == field, error
    for word in words:
        assert word in error["message"], error


def test_a_corpus_without_descriptions_is_refused_at_upload(uploads):
    # It used to be accepted (202, ready), then lost on a restart: "0 kept, 2 empty descriptions"
    r = upload(uploads, "nodesc", "c.tsv", b"CID\tSMILES\n1\tCCO\n2\tc1ccccc1\n")
    refused(r, "file", "no description column")
    r = upload(uploads, "nodesc", "c.jsonl", b'{"cid": 1, "smiles": "CCO"}\n')
    refused(r, "file", "no description column")
    assert nothing_kept(uploads, "nodesc")


def test_a_name_with_a_trailing_newline_is_refused(uploads):
    r = upload(uploads, "nl-test\n", "c.tsv", b"CID\tSMILES\tdescription\n1\tCCO\tethanol\n")
    refused(r, "name")
    assert nothing_kept(uploads, "nl-test")


@pytest.mark.parametrize("description,why", [("an\talcohol", "a tab"),
                                             ("an\u2028alcohol", "a line break"),
                                             ("an\ralcohol", "a line break")])
def test_a_record_a_tsv_file_cannot_keep_is_refused(uploads, description, why):
    line = json.dumps({"cid": "1", "smiles": "CCO", "description": description})
    r = upload(uploads, "tabs", "c.jsonl", line.encode())
    refused(r, "file", why, "'1'")
    assert nothing_kept(uploads, "tabs")


def test_a_lone_surrogate_in_an_upload_is_a_422_and_leaves_no_file(uploads):
    # It was a 500 that left corpora/.NAME.PID.UUID.tmp.part behind for good.
    line = '{"cid": "1", "smiles": "CCO", "description": "ethanol \\ud800"}\n'
    r = upload(uploads, "surrogate", "c.jsonl", line.encode())
    assert r.status_code == 422, r.text
    assert nothing_kept(uploads, "surrogate")


def test_an_accepted_upload_reads_back_the_same_after_a_restart(uploads):
    lines = [{"cid": 1, "smiles": "CCO", "description": "  The molecule is ethanol.  "},
             {"cid": "2", "smiles": "c1ccccc1", "description": 'It is "benzene" \\ aromatic.'}]
    r = upload(uploads, "kept", "c.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())
    assert r.status_code == 202, r.text
    accepted = r.json()["sha256"]
    again, report = read_corpus(uploads.data / "corpora" / "kept.tsv", name="kept")
    assert again.checksum == accepted and report.kept == 2 and again.has_captions


# --- temporary files: removed on failure, swept at start ------------------------------------

def test_a_failed_write_leaves_no_partial_file(tmp_path):
    good = Corpus([Record("1", "CCO", "CCO", "ethanol")], name="c")
    (tmp_path / "taken.tsv").mkdir()  # the final rename fails after the data is written
    with pytest.raises(OSError):
        write_corpus(good, tmp_path / "taken.tsv")
    bad = Corpus([Record("1", "CCO", "CCO", "ethanol \ud800")], name="c")
    with pytest.raises(UnicodeEncodeError):
        write_corpus(bad, tmp_path / "bad.tsv")
    assert leftovers(tmp_path) == ["taken.tsv"]


def _aged(path: Path, seconds: float) -> Path:
    """``path`` (and everything inside it) last modified ``seconds`` ago."""
    when = time.time() - seconds
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (when, when))
    return path


def _temp(path: Path, folder: bool = False, age: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
    else:
        path.write_bytes(b"half")
    return _aged(path, age)


def test_stale_temporaries_are_swept_at_start_and_fresh_ones_kept(svc_dir, tmp_path):
    data = data_copy(svc_dir, tmp_path / "data")
    old, new = 2 * HOUR, 5.0  # a dead writer's, and a live writer's (another worker's)
    stale = [_temp(data / "corpora/.up.123.abc.tmp.part", age=old),
             _temp(data / "corpora/.up.123.abd.tmp", age=old),
             _temp(data / "indexes/chebi20-embedded-bm25/manifest.json.part", age=old),
             _temp(data / "models/.smollm2-135m-instruct-x1y2", folder=True, age=old),
             _temp(data / "tuning/run/checkpoints/.step-0000100.tmp", folder=True, age=old),
             _temp(data / "adapters/.mine.saving", folder=True, age=old)]
    fresh = [_temp(data / "corpora/.up.456.abe.tmp", age=new),
             _temp(data / "models/.smollm2-135m-instruct-z9", folder=True, age=new)]
    mine = [_temp(data / "corpora/notes.txt", age=old),  # not a pattern of ours: never touched
            _temp(data / "models/.smollm2-135m-instruct.lock", age=old)]
    # a folder counts its newest entry: an old folder a writer is still filling stays
    busy = _temp(data / "models/.smollm2-135m-instruct-busy", folder=True, age=old)
    (busy / "more.bin").write_bytes(b"now")

    CorpusStore(data, ["bm25"], settings=Settings(data_dir=data)).start(background=False)
    svc = TranslatorService(Settings(data_dir=data, engine="nearest-neighbour",
                                     retrieval_url="http://127.0.0.1:9"))
    svc.start()
    svc.stop()
    assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in fresh + mine + [busy])


# --- "still building" is transient: 503 + Retry-After, and jobs wait for it -------------------

class GatedStore(CorpusStore):
    """A real store whose builds wait until the test opens the gate (a slow first start)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.gate = threading.Event()

    def _build(self, name: str) -> None:
        self.gate.wait(120)
        super()._build(name)


def test_a_corpus_still_building_is_a_503_and_jobs_wait_for_it(svc_dir, tmp_path, chebi_val):
    data = data_copy(svc_dir, tmp_path / "retrieval")
    settings = Settings(data_dir=data, retrieval_kinds=SERVICE_KINDS)
    store = GatedStore(data, SERVICE_KINDS, settings=settings)
    with LiveServer(retrieval_app(settings, store=store)) as retrieval:
        r = httpx.post(retrieval.url + "/v1/retrieve/molecules", json={"smiles": "CCO"})
        assert r.status_code == 503, r.text  # was 409 "still building"
        assert int(r.headers["retry-after"]) > 0 and r.json()["error"]["field"] == "corpus"
        r = httpx.post(retrieval.url + "/v1/retrieve/captions", json={"caption": "an acid"})
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        assert httpx.get(retrieval.url + "/readyz").headers["retry-after"]

        wsettings = Settings(data_dir=tmp_path / "worker", retrieval_url=retrieval.url,
                             engine="nearest-neighbour", retrieval_retries=0)
        with LiveServer(worker_app(wsettings)) as worker:
            worker.wait_ready()
            r = httpx.post(worker.url + "/mol2cap", json={"smiles": "CCO"}, timeout=30)
            assert r.status_code == 503 and r.headers["retry-after"], r.text  # was 409
            items = chebi_val.smiles[:12]
            job = httpx.post(worker.url + "/v1/jobs",
                             json={"task": "mol2cap", "items": items}).json()
            deadline = time.monotonic() + 30
            while "waiting" not in (httpx.get(f"{worker.url}/v1/jobs/{job['id']}")
                                    .json()["message"] or ""):
                assert time.monotonic() < deadline, "the job never met the building corpus"
                time.sleep(0.1)
            store.gate.set()
            deadline = time.monotonic() + 120
            while (j := httpx.get(f"{worker.url}/v1/jobs/{job['id']}").json())["state"] \
                    not in ("succeeded", "failed", "cancelled"):
                assert time.monotonic() < deadline, j
                time.sleep(0.2)
            assert (j["state"], j["done"], j["failed"]) == ("succeeded", 12, 0), j
            lines = [json.loads(x) for x in
                     httpx.get(worker.url + j["results_url"]).text.splitlines()]
            assert [x["error"] for x in lines] == [None] * 12
            assert all(x["prediction"] for x in lines)


def test_a_failed_build_stays_a_409_without_retry_after(tmp_path):
    # Waiting does not mend a failed build (here: an encoder checkpoint that is not there).
    settings = Settings(data_dir=tmp_path, retrieval_kinds=["graph"],
                        encoder=str(tmp_path / "missing_gcn.pth"))
    with LiveServer(retrieval_app(settings)) as retrieval:
        deadline = time.monotonic() + 60
        while (r := httpx.post(retrieval.url + "/v1/retrieve/molecules",
                               json={"smiles": "CCO"})).status_code == 503:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.1)
        assert r.status_code == 409 and "retry-after" not in r.headers, r.text
        assert "failed" in r.json()["error"]["message"]
        r = httpx.get(retrieval.url + "/readyz")  # failed, not "loading" for ever
        assert r.status_code == 503 and r.json()["status"] == "failed", r.text
        assert "retry-after" not in r.headers


# --- a damaged job database: one clear line at start, a clear error later -------------------

def _filled_store(path: Path, jobs: int = 12, items: int = 300) -> list[str]:
    store = JobStore(path)
    ids = []
    for _ in range(jobs):
        job = store.create("translate", "mol2cap", {}, [Item("CCO" * 4, str(i))
                                                        for i in range(items)])
        store.record(job.id, [(i, {"index": i, "prediction": "p" * 150}) for i in range(items)])
        ids.append(job.id)
    store.close()  # the last connection folds the write-ahead log into the file
    return ids


def _truncated(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _garbage_header(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(random.Random(0).randbytes(100))


def _overwritten_pages(path: Path) -> None:
    rng = random.Random(1)
    pages = path.stat().st_size // 4096
    with open(path, "r+b") as f:
        for page in rng.sample(range(2, pages), 8):
            f.seek(page * 4096)
            f.write(rng.randbytes(4096))


@pytest.mark.parametrize("damage", [_truncated, _garbage_header, _overwritten_pages])
def test_a_damaged_job_database_is_refused_at_start_with_one_clear_line(tmp_path, damage):
    path = tmp_path / "jobs.sqlite3"
    _filled_store(path)
    damage(path)
    with pytest.raises(StorageError) as info:
        JobStore(path)
    message = str(info.value)
    assert str(path) in message and "damaged" in message and "back-up" in message
    assert "\n" not in message


def test_icma_serve_worker_on_a_damaged_database_exits_with_one_line(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    _filled_store(path, jobs=2, items=10)
    _garbage_header(path)
    env = {**os.environ, "ICMA_JOBS_DB": str(path), "ICMA_DATA_DIR": str(tmp_path),
           "ICMA_ENGINE": "nearest-neighbour"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "icma", "serve", "worker", "--port", str(port)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("icma: error: ICMA_JOBS_DB: the job database") and str(path) in last


def test_damage_met_later_is_a_clear_error_not_a_cut_answer(tmp_path, caplog):
    path = tmp_path / "jobs.sqlite3"
    ids = _filled_store(path, jobs=2, items=10)
    with sqlite3.connect(path) as db:  # values that are no longer what the store wrote
        db.execute("UPDATE items SET result = '{\"index\": 3, \"predic' WHERE job_id = ? "
                   "AND idx = 3", (ids[0],))
        db.execute("UPDATE jobs SET options = 'not json' WHERE id = ?", (ids[1],))
    store = JobStore(path)  # the pages are sound: quick_check passes
    assert [idx for idx, _, _ in store.results(ids[0], 0, 3)] == [0, 1, 2]
    with pytest.raises(StorageError) as info:
        store.results(ids[0], 0)
    assert info.value.status == 500 and str(path) not in info.value.message
    assert str(path) in caplog.text  # the operator's log names the file
    with pytest.raises(StorageError):
        store.get(ids[1])
    assert store.get(ids[0]).done == 10  # the rest of the store still answers


def test_a_results_stream_meets_damage_as_an_error_response_or_a_last_line(tmp_path):
    import anyio

    from icma.jobs.results import aiter_results

    path = tmp_path / "jobs.sqlite3"
    (job_id,) = _filled_store(path, jobs=1, items=600)  # more than one chunk of lines (500)

    def damage(idx: int) -> None:
        with sqlite3.connect(path) as db:
            db.execute("UPDATE items SET result = '{\"index\": 3, \"predic' WHERE job_id = ? "
                       "AND idx = ?", (job_id, idx))

    async def read_all(lines):
        return [line async for line in lines]

    damage(550)  # met after the response has started: one last line says so
    store = JobStore(path)
    lines = anyio.run(read_all, aiter_results(store, job_id, follow=False))
    # (the store reads lines in chunks of 500: the damaged row's chunk is the one lost)
    assert len(lines) == 501 and json.loads(lines[499])["index"] == 499
    last = json.loads(lines[-1])
    assert last["error"]["code"] == "storage_damaged" and str(path) not in lines[-1]
    damage(2)  # met in the first chunk: an error before any line (the route's 500 body)
    with pytest.raises(StorageError):
        aiter_results(store, job_id, follow=False)
    store.close()


# --- damaged index files are rebuilt ---------------------------------------------------------

@pytest.fixture(scope="module")
def small_corpus(chebi_val):
    return chebi_val.subset(range(150), name="val150")


@pytest.mark.parametrize("kind,name", [
    ("bm25", "bm25_weights.npz"), ("bm25", "bm25_vocab.json"), ("bm25", "corpus.jsonl"),
    ("bm25", "manifest.json"), ("graph", "graph.faiss"), ("graph", "embeddings.npy"),
    ("morgan", "fingerprints.npz")])
def test_a_truncated_index_file_is_rebuilt(small_corpus, tmp_path, kind, name):
    settings = Settings(data_dir=tmp_path)
    built = cached_index(kind, small_corpus, tmp_path, settings=settings)
    query = small_corpus.descriptions[7] if kind == "bm25" else small_corpus.smiles[7]
    want = built.search([query], 3)
    path = tmp_path / "indexes" / f"val150-{kind}" / name
    assert path.is_file(), sorted(p.name for p in path.parent.iterdir())
    whole = path.stat().st_size
    os.truncate(path, whole // 2)
    again = cached_index(kind, small_corpus, tmp_path, settings=settings)
    assert again.search([query], 3) == want
    assert path.stat().st_size == whole
    load_index(path.parent, settings=settings)  # sound again, as saved


def test_a_truncated_bm25_of_the_served_corpus_is_rebuilt_at_start(svc_dir, tmp_path):
    # /readyz used to answer 503 for ever: the damaged file failed every start.
    data = data_copy(svc_dir, tmp_path)
    weights = data / "indexes/chebi20-embedded-bm25/bm25_weights.npz"
    os.truncate(weights, weights.stat().st_size // 2)
    store = CorpusStore(data, ["bm25"], settings=Settings(data_dir=data))
    store.start(background=False)
    assert store.ready


def test_a_save_from_before_the_file_list_still_loads_unverified(small_corpus, tmp_path):
    settings = Settings(data_dir=tmp_path)
    cached_index("morgan", small_corpus, tmp_path, settings=settings)
    directory = tmp_path / "indexes/val150-morgan"
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["files"]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    before = (directory / "fingerprints.npz").stat().st_mtime_ns
    cached_index("morgan", small_corpus, tmp_path, settings=settings)
    assert (directory / "fingerprints.npz").stat().st_mtime_ns == before  # loaded, not rebuilt


# --- retention --------------------------------------------------------------------------------

def _finished(store: JobStore, state: str, ended_ago: float, items: int = 3,
              kind: str = "translate") -> str:
    job = store.create(kind, "mol2cap", {}, [Item("C" * 200, str(i)) for i in range(items)])
    store.record(job.id, [(i, {"index": i, "prediction": "p" * 200}) for i in range(items)])
    store.set_state(job.id, state)
    with store._tx() as db:
        db.execute("UPDATE jobs SET finished = ? WHERE id = ?", (time.time() - ended_ago, job.id))
    return job.id


def test_finished_jobs_expire_and_their_space_goes_back(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    old = [_finished(store, s, 10 * DAY, items=3000) for s in ("succeeded", "failed",
                                                               "cancelled")]
    old.append(_finished(store, "succeeded", 10 * DAY, items=0, kind="tune"))
    recent = _finished(store, "succeeded", 1 * DAY)
    queued = store.create("translate", "mol2cap", {}, [Item("CCO")]).id
    running = store.create("tune", "mol2cap", {"name": "t"}, []).id
    store.set_state(running, "running")
    with store._tx() as db:  # active jobs stay however old they are
        db.execute("UPDATE jobs SET created = ?", (time.time() - 30 * DAY,))
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = path.stat().st_size

    assert store.expire(7 * DAY) == 4
    assert {j.id for j in store.list()} == {recent, queued, running}
    assert store.results(old[0]) == [] and len(store.results(recent)) == 3
    assert path.stat().st_size < size / 4
    assert store.expire(7 * DAY) == 0


def test_a_database_made_before_auto_vacuum_is_converted_when_jobs_expire(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    from icma.jobs.store import SCHEMA

    with sqlite3.connect(path) as db:  # as JobStore used to make it
        db.executescript(SCHEMA)
    store = JobStore(path)
    _finished(store, "succeeded", 10 * DAY, items=3000)
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = path.stat().st_size
    assert store.expire(7 * DAY) == 1
    assert store._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental from now on
    assert path.stat().st_size < size / 4


def test_the_worker_deletes_expired_jobs_when_it_starts(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    old, recent = _finished(store, "succeeded", 8 * DAY), _finished(store, "failed", 6 * DAY)
    store.close()
    settings = Settings(data_dir=tmp_path, jobs_db=path, engine="nearest-neighbour",
                        retrieval_url="http://127.0.0.1:9", job_retention_days=7)
    with LiveServer(worker_app(settings)) as worker:
        deadline = time.monotonic() + 30
        while (r := httpx.get(f"{worker.url}/v1/jobs/{old}")).status_code == 200:
            assert time.monotonic() < deadline, "the expired job is still there"
            time.sleep(0.1)
        unknown = httpx.get(f"{worker.url}/v1/jobs/{'0' * 32}")
        assert r.status_code == unknown.status_code == 404
        assert r.json()["error"]["code"] == unknown.json()["error"]["code"]
        assert httpx.get(f"{worker.url}/v1/jobs/{recent}").status_code == 200
