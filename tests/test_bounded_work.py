"""Bounded work per request, over real HTTP on 127.0.0.1 (issue 13): the heavy-atom limit per
query SMILES, large molecule requests off the event loop, whitespace inside a SMILES, and job
result streams that hold no thread each, with a cap on how many are open."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time

import httpx
import pytest

from icma.core.corpus import parse_corpus_text
from icma.core.settings import Settings
from icma.generation.options import RetrievalOptions
from icma.generation.retrievers import HttpRetriever, RetrievalRefused
from icma.jobs.items import parse_items
from icma.retrieval.store import CorpusStore
from icma.services.retrieval.app import create_app as retrieval_app
from icma.workers.translator.app import create_app as worker_app
from tests.conftest import SERVICE_KINDS
from tests.service_helpers import LiveServer
from tests.test_worker import _wait, worker_settings

#: The reported reproduction: a 4,001-atom macrocycle (1.4-2.7 s a query before the limit).
HUGE = "C1" + "C" * 4000 + "1"
#: The retrieval service here takes molecules this large, so that 8 of them are seconds of work.
SERVICE_LIMIT = 1500
BIG = "C1" + "C" * (SERVICE_LIMIT - 1) + "1"  # exactly at the service's limit
#: Job items with this SMILES wait in retrieval until the test lets them go (a running job).
GATED = "CCCCCCCCCCCCO"
FOLLOWERS = 44  # more than the 40 threads of the pool that sync streams used to hold
WHITESPACE = [("CC\nO", 3), ("CC\tO", 3), ("C1CC1 O", 6)]


@pytest.fixture(scope="module")
def retrieval(svc_dir):
    settings = Settings(data_dir=svc_dir, retrieval_kinds=SERVICE_KINDS,
                        max_heavy_atoms=SERVICE_LIMIT)
    with LiveServer(retrieval_app(settings)) as s:
        s.wait_ready()
        yield s


class GatedRetriever(HttpRetriever):
    """The real HTTP retriever, except that queries of GATED wait until ``gate`` is set: a job
    over them stays running while everything else goes through."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.gate = threading.Event()

    def examples(self, task, queries, k, options):
        if GATED in queries:
            self.gate.wait(120)
        return super().examples(task, queries, k, options)


@pytest.fixture(scope="module")
def worker(retrieval, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bounded-worker")
    settings = worker_settings(tmp, retrieval.url, engine="nearest-neighbour",
                               job_batch_size=1, max_result_followers=FOLLOWERS)
    retriever = GatedRetriever(retrieval.url)
    with LiveServer(worker_app(settings, retriever=retriever)) as w:
        w.wait_ready()
        w.retriever = retriever
        yield w
        retriever.gate.set()


def _error(r: httpx.Response) -> dict:
    return r.json()["error"]


@pytest.fixture
def sanitised(monkeypatch) -> list[int]:
    """The atom counts of the molecules RDKit sanitises meanwhile (the services here run in
    this process): sanitising is what costs seconds for thousands of atoms, so a refusal that
    is cheap sanitises nothing over the limit. (A behaviour, not a timing: on a loaded machine
    even a cheap refusal can take a second to come back.)"""
    from rdkit import Chem

    counts: list[int] = []
    real = Chem.SanitizeMol

    def spy(mol, *args, **kwargs):
        counts.append(mol.GetNumAtoms())
        return real(mol, *args, **kwargs)

    monkeypatch.setattr(Chem, "SanitizeMol", spy)
    return counts


# --- the heavy-atom limit ------------------------------------------------------------------------

def test_a_huge_macrocycle_is_a_cheap_422_naming_the_field(retrieval, sanitised):
    for body, field in [({"smiles": HUGE}, "smiles"),
                        ({"smiles": ["CCO", "CCN", "CCC", HUGE]}, "smiles[3]")]:
        r = httpx.post(retrieval.url + "/v1/retrieve/molecules", json=body, timeout=60)
        assert r.status_code == 422, r.text
        err = _error(r)
        assert err["field"] == field
        assert "4001 heavy atoms" in err["message"] and str(SERVICE_LIMIT) in err["message"]
        assert "ICMA_MAX_HEAVY_ATOMS" in err["message"]
    assert not any(n > SERVICE_LIMIT for n in sanitised), sanitised  # refused before it
    ok = httpx.post(retrieval.url + "/v1/retrieve/molecules", json={"smiles": BIG}, timeout=60)
    assert ok.status_code == 200, ok.text  # the limit itself is allowed
    assert SERVICE_LIMIT in sanitised  # (the spy sees the service's sanitising)


def test_the_default_limit_takes_every_chebi20_molecule():
    # benchmarks/results/atoms.md: ChEBI-20's largest molecule has 574 heavy atoms.
    assert Settings().max_heavy_atoms >= 574


def test_the_worker_refuses_a_huge_molecule_itself_and_in_job_items(worker, sanitised):
    r = httpx.post(worker.url + "/mol2cap", json={"smiles": HUGE}, timeout=60)
    assert r.status_code == 422, r.text
    assert not any(n > 600 for n in sanitised), sanitised  # refused before sanitising
    assert _error(r)["field"] == "smiles"
    assert "4001 heavy atoms" in _error(r)["message"] and "600" in _error(r)["message"]
    job = httpx.post(worker.url + "/v1/jobs", json={"task": "mol2cap",
                                                    "items": [HUGE, "CCO"]}).json()
    assert _wait(worker.url, job["id"])["state"] == "succeeded"
    lines = [json.loads(x) for x in httpx.get(
        worker.url + f"/v1/jobs/{job['id']}/results", timeout=30).text.splitlines()]
    assert lines[0]["error"]["field"] == "smiles"
    assert "ICMA_MAX_HEAVY_ATOMS" in lines[0]["error"]["message"]
    assert lines[1]["error"] is None and lines[1]["prediction"]


def test_the_services_refusal_comes_back_to_the_worker_as_the_same_422(retrieval):
    # A worker whose own limit is higher than the service's gets the service's 422, for its
    # one query under its own field name.
    chain = "C" * (SERVICE_LIMIT + 100)
    client = HttpRetriever(retrieval.url)
    try:
        with pytest.raises(RetrievalRefused) as caught:
            client.examples("mol2cap", [chain], 2, RetrievalOptions())
    finally:
        client.close()
    assert caught.value.status == 422 and caught.value.field == "smiles"
    assert f"{SERVICE_LIMIT + 100} heavy atoms" in caught.value.message


def test_huge_records_cost_an_upload_no_more_than_their_parse(tmp_path):
    text = "CID\tSMILES\tdescription\n" + "".join(
        f"{i}\t{HUGE}\thuge ring {i}\n" for i in range(20)) + "99\tCCO\tethanol\n"
    t0 = time.perf_counter()
    corpus, report = parse_corpus_text(text, name="huge", max_heavy_atoms=600)
    assert time.perf_counter() - t0 < 2.0  # 20 sanitisations took 15.5 s in the report
    assert corpus.cids == ["99"] and len(report.invalid_smiles) == 20
    assert "4001 heavy atoms" in report.invalid_smiles[0][2]
    store = CorpusStore(tmp_path, ["morgan"], settings=Settings(data_dir=tmp_path))
    t0 = time.perf_counter()
    entry = store.add("huge", text)
    assert time.perf_counter() - t0 < 5.0 and len(entry.corpus) == 1
    t0 = time.perf_counter()
    items = parse_items("mol2cap", text, "tsv")  # a job upload: rows only, no RDKit
    assert time.perf_counter() - t0 < 2.0 and len(items) == 21


# --- large requests off the event loop -----------------------------------------------------------

#: A /healthz prober in its own process, as a real one (a load balancer, the kubelet) is: in the
#: server's process it would take GIL turns too. Prints "sent answered" (monotonic clock) per probe.
PROBER = """
import sys, time, httpx
with httpx.Client(base_url=sys.argv[1], timeout=30) as c:
    while True:
        t0 = time.monotonic()
        assert c.get("/healthz").status_code == 200
        print(t0, time.monotonic(), flush=True)
        time.sleep(0.02)
"""


def test_healthz_answers_while_eight_max_size_molecules_are_served(retrieval):
    prober = subprocess.Popen([sys.executable, "-c", PROBER, retrieval.url],
                              stdout=subprocess.PIPE, text=True)
    try:
        prober.stdout.readline()  # probing
        time.sleep(0.2)
        start = time.monotonic()
        r = httpx.post(retrieval.url + "/v1/retrieve/molecules", timeout=120,
                       json={"smiles": [BIG] * 8, "k": 2, "method": "graph"})
        end = time.monotonic()
    finally:
        prober.terminate()
    probes = [tuple(map(float, line.split())) for line in prober.communicate()[0].splitlines()]
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 8
    # Held on the event loop, the request would hold a probe for its whole length. In the thread
    # pool a probe waits for a GIL turn: one RDKit call on a 1,500-atom molecule (~0.1 s here).
    # Relative to the request, so that a busy machine (which slows both) does not fail it.
    stalls = [b - a for a, b in probes if b > start and a < end]
    took = end - start
    assert len(stalls) > 5 and max(stalls) < max(0.5, took / 2), \
        f"/healthz took up to {max(stalls):.2f} s during a {took:.2f} s request"


# --- whitespace inside a SMILES ------------------------------------------------------------------

@pytest.mark.parametrize("smiles,at", WHITESPACE)
def test_whitespace_inside_a_smiles_is_a_422_saying_where(retrieval, worker, smiles, at):
    r = httpx.post(retrieval.url + "/v1/retrieve/molecules", json={"smiles": smiles}, timeout=30)
    assert r.status_code == 422, r.text
    assert _error(r)["field"] == "smiles"
    assert "whitespace" in _error(r)["message"] and f"character {at}" in _error(r)["message"]
    r = httpx.post(retrieval.url + "/v1/retrieve/molecules", json={"smiles": ["CCO", smiles]},
                   timeout=30)
    assert r.status_code == 422 and _error(r)["field"] == "smiles[1]", r.text
    r = httpx.post(worker.url + "/mol2cap", json={"smiles": smiles}, timeout=30)
    assert r.status_code == 422, r.text
    assert _error(r)["field"] == "smiles" and "whitespace" in _error(r)["message"]


def test_whitespace_around_a_smiles_is_still_stripped(retrieval):
    r = httpx.post(retrieval.url + "/v1/retrieve/molecules", json={"smiles": " CCO\n"},
                   timeout=30)
    assert r.status_code == 200 and r.json()["results"][0]["canonical_smiles"] == "CCO"


# --- result streams ------------------------------------------------------------------------------

class Follower:
    """One open ``GET /v1/jobs/{id}/results`` (follow) on its own connection."""

    def __init__(self, port: int, job_id: str):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.conn.request("GET", f"/v1/jobs/{job_id}/results")
        self.response = self.conn.getresponse()

    def line(self) -> dict:
        return json.loads(self.response.readline())

    def close(self) -> None:
        self.conn.close()  # (closes the open response and the socket: the client goes away)


def test_open_result_streams_are_capped_and_do_not_freeze_the_worker(worker):
    port = int(worker.url.rsplit(":", 1)[1])
    job = httpx.post(worker.url + "/v1/jobs", json={"task": "mol2cap",
                                                    "items": ["CCO", GATED, "CCN"]}).json()
    followers = []
    try:
        _wait(worker.url, job["id"], states=("running",))
        for _ in range(FOLLOWERS):
            f = Follower(port, job["id"])
            followers.append(f)
            assert f.response.status == 200
            assert f.line()["index"] == 0  # the first item is done; the second waits
        full = httpx.get(worker.url + f"/v1/jobs/{job['id']}/results", timeout=10)
        assert full.status_code == 429, full.text
        assert full.headers["retry-after"]
        assert "ICMA_MAX_RESULT_FOLLOWERS" in _error(full)["message"]
        # The worker still answers everything else while the streams wait.
        t0 = time.perf_counter()
        assert httpx.get(worker.url + "/healthz", timeout=5).status_code == 200
        r = httpx.post(worker.url + "/mol2cap", json={"smiles": "CCO"}, timeout=10)
        assert r.status_code == 200, r.text
        other = httpx.post(worker.url + "/v1/jobs", json={"task": "mol2cap",
                                                          "items": ["CCC"]}).json()
        assert httpx.delete(worker.url + f"/v1/jobs/{other['id']}",
                            timeout=5).json()["state"] == "cancelled"
        assert time.perf_counter() - t0 < 5.0
        # A client that goes away gives its place back.
        followers.pop().close()
        deadline = time.monotonic() + 5
        while True:
            again = Follower(port, job["id"])
            if again.response.status == 200:
                followers.append(again)
                break
            again.close()
            assert time.monotonic() < deadline, "the closed stream's place was not freed"
            time.sleep(0.05)
        worker.retriever.gate.set()
        for f in followers[:3]:  # the streams go on to the end of the job
            assert [json.loads(x)["index"] for x in f.response.read().splitlines()] == [1, 2]
    finally:
        worker.retriever.gate.set()
        for f in followers:
            f.close()
    deadline = time.monotonic() + 10
    while True:
        full = httpx.get(worker.url + f"/v1/jobs/{job['id']}/results", timeout=10)
        if full.status_code == 200:
            break
        assert time.monotonic() < deadline, "closed streams kept their places"
        time.sleep(0.1)
    assert len(full.text.splitlines()) == 3
