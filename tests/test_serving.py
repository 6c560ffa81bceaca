"""`icma serve`: the listening socket, several worker processes, shared data directories."""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from icma.retrieval.store import CorpusNotReadyError, CorpusConflictError, CorpusStore
from icma.core.errors import InputError
from icma.server.spawn import ServiceFailed, spawn_service
from icma.server.supervisor import listening_socket

SMALL = "CID\tSMILES\tdescription\n1\tCCO\tThe molecule is ethanol.\n" \
        "2\tCC(=O)O\tThe molecule is acetic acid.\n3\tc1ccccc1\tThe molecule is benzene.\n"


def _nodelay_of_accepted(sock: socket.socket) -> int:
    """TCP_NODELAY of a connection an asyncio server accepted on ``sock``."""
    async def main() -> int:
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        class P(asyncio.Protocol):
            def connection_made(self, transport):
                s = transport.get_extra_info("socket")
                seen.set_result(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(P, sock=sock)
        port = sock.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        value = await asyncio.wait_for(seen, 10)
        writer.close()
        server.close()
        return value

    return asyncio.run(main())


def test_accepted_connections_get_tcp_nodelay():
    assert _nodelay_of_accepted(listening_socket("127.0.0.1", 0)) != 0
    # The reason the socket is made by hand: a proto-0 socket (uvicorn's multi-worker one)
    # leaves Nagle's algorithm on for every connection it accepts.
    plain = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    plain.bind(("127.0.0.1", 0))
    assert _nodelay_of_accepted(plain) == 0


def test_port_in_use_and_bad_host_are_clear_errors():
    taken = listening_socket("127.0.0.1", 0)
    taken.listen()
    try:
        with pytest.raises(InputError, match="cannot listen") as e:
            listening_socket("127.0.0.1", taken.getsockname()[1])
        assert e.value.field == "--port"
    finally:
        taken.close()
    with pytest.raises(InputError) as e:
        listening_socket("no-such-host.invalid", 8001)
    assert e.value.field == "--host"


def _unused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_spawn_service_reports_a_service_that_exits_with_its_log(tmp_path):
    log = tmp_path / "serve.log"
    with pytest.raises(ServiceFailed, match=r"(?s)the retrieval exited with status 2; the end of "
                                            r"its log .*--port"):
        spawn_service(["retrieval", "--port", "70000"], _unused_url(), log=log, timeout=120)


def test_spawn_service_stops_a_service_that_never_becomes_ready(tmp_path):
    pid_file, notes = tmp_path / "pid", []
    # a child that starts and never listens: stands in for a service stuck while loading
    sleeper = [sys.executable, "-c", f"import os, pathlib, time; pathlib.Path({str(pid_file)!r})"
                                     ".write_text(str(os.getpid())); time.sleep(600)"]
    with pytest.raises(ServiceFailed, match="the sleeper was not ready after 5 s"):
        spawn_service([], _unused_url(), name="sleeper", program=sleeper, timeout=5,
                      interval=0.1, say=notes.append)
    assert notes == ["  sleeper: starting"]
    with pytest.raises(ProcessLookupError):  # stopped and reaped, not left running
        os.kill(int(pid_file.read_text()), 0)


def _build_in_process(data_dir: str, path: str, queue) -> None:
    import logging

    from icma.core.corpus import read_corpus
    from icma.retrieval.cache import cached_index

    built = []

    class Catch(logging.Handler):
        def emit(self, record):
            if "building" in record.getMessage():
                built.append(record.getMessage())

    logger = logging.getLogger("icma.retrieval.cache")
    logger.setLevel(logging.INFO)
    logger.addHandler(Catch())
    corpus, _ = read_corpus(path, name="shared")
    index = cached_index("morgan", corpus, data_dir)
    queue.put((len(built), [h.cid for h in index.search(["CCO"], 1)[0]]))


def test_processes_sharing_a_data_directory_build_an_index_once(tmp_path, chebi_val):
    from icma.core.corpus import write_corpus

    path = tmp_path / "c.tsv"
    write_corpus(chebi_val.subset(range(1500)), path)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_process, args=(str(tmp_path / "data"), str(path), queue))
             for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert sorted(n for n, _ in results) == [0, 0, 1]  # one built, two loaded its save
    assert len({tuple(hits) for _, hits in results}) == 1


def test_stores_sharing_a_data_directory_agree_on_uploads(tmp_path, monkeypatch):
    import icma.retrieval.store as corpora
    from icma.core.settings import get_settings

    monkeypatch.setattr(corpora, "DISCOVER_SECONDS", 0.1)
    a = CorpusStore(tmp_path, ["morgan", "bm25"], settings=get_settings())
    b = CorpusStore(tmp_path, ["morgan", "bm25"], settings=get_settings())
    a.start(background=False)
    b.start(background=True)
    a.add("tiny", SMALL)
    with pytest.raises(CorpusConflictError):  # the name is taken in the shared folder
        b.add("tiny", SMALL.replace("ethanol", "alcohol"))
    # b learns of it from the folder; until its copy is loaded it says "loading", not "unknown"
    try:
        b.index("tiny", "bm25")
    except CorpusNotReadyError as exc:
        assert "another worker" in str(exc) or "building" in str(exc)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = {e["name"]: e["state"] for e in b.describe()}
        if states.get("tiny") == "ready":
            break
        time.sleep(0.05)
    assert states.get("tiny") == "ready"
    hits = b.index("tiny", "bm25").search(["The molecule is ethanol."], 1)[0]
    assert hits[0].cid == "1"
    assert [p.name for p in (tmp_path / "corpora").iterdir()] == ["tiny.tsv"]  # no temp files


def _get(url: str) -> dict:
    # a new connection each time, so the port's workers take turns answering
    with httpx.Client(timeout=10) as c:
        return c.get(url).json()


def test_serve_with_two_workers(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).with_name("icma")
    env = {**os.environ, "ICMA_DATA_DIR": str(tmp_path), "ICMA_RETRIEVAL_KINDS": '["morgan","bm25"]',
           "ICMA_API_KEY": "k", "ICMA_PROGRESS": "false"}
    proc = spawn_service(["retrieval", "--port", str(port), "--workers", "2", "--log-level",
                          "warning"], url, env=env, program=[str(exe)], timeout=240, interval=0.1)
    auth = {"Authorization": "Bearer k"}
    try:
        ready: set[int] = set()
        deadline = time.monotonic() + 240
        while len(ready) < 2 and time.monotonic() < deadline:
            try:
                h = _get(url + "/readyz")
                if h["status"] == "ready":
                    ready.add(h["worker"])
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert len(ready) == 2, "two distinct workers answer on one port"
        # connections opened together are dealt out in turn: 4 and 4, not first come first served
        clients = [httpx.Client(timeout=10) for _ in range(8)]
        try:
            pids = [c.get(url + "/healthz").json()["worker"] for c in clients]
            again = [c.get(url + "/healthz").json()["worker"] for c in clients]
        finally:
            for c in clients:
                c.close()
        assert sorted(collections.Counter(pids).values()) == [4, 4]
        assert again == pids  # a keep-alive connection stays with its worker
        r = httpx.post(url + "/v1/corpora", data={"name": "tiny"}, headers=auth,
                       files={"file": ("t.tsv", SMALL.encode())}, timeout=30)
        assert r.status_code == 202, r.text
        # every worker ends up serving the corpus one of them took in
        seen: set[int] = set()
        deadline = time.monotonic() + 120
        while len(seen) < 2 and time.monotonic() < deadline:
            with httpx.Client(timeout=10, headers=auth) as c:
                worker = c.get(url + "/healthz").json()["worker"]
                r = c.post(url + "/v1/retrieve/captions",
                           json={"caption": "The molecule is benzene.", "corpus": "tiny", "k": 1})
            if r.status_code == 200:
                assert r.json()["results"][0]["examples"][0]["cid"] == "3"
                seen.add(worker)
            else:
                # loading in that worker: a 503 to retry after a moment, never a 404
                assert r.status_code == 503 and r.headers["retry-after"], r.text
            time.sleep(0.05)
        assert seen == ready
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    deadline, left = time.monotonic() + 20, "?"
    while left and time.monotonic() < deadline:  # helpers (multiprocessing's tracker) trail off
        left = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True,
                              text=True).stdout.strip()
        time.sleep(0.2)
    assert left == "", "workers outlived the supervisor"
