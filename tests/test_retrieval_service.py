"""The retrieval service: real HTTP on 127.0.0.1 for the main paths, TestClient for the rest."""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi.testclient import TestClient

from icma.core.corpus import embedded_corpus
from icma.retrieval.examples import retrieve_examples
from icma.retrieval import Exclusion
from icma.retrieval.cache import cached_index
from icma.core.settings import Settings
from icma.server.spawn import spawn_service
from icma.services.retrieval.app import create_app
from tests.service_helpers import LiveServer

KINDS = ["graph", "morgan", "rdkit", "bm25"]
ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"


def settings(svc_dir, **kw) -> Settings:
    return Settings(data_dir=svc_dir, retrieval_kinds=KINDS, **kw)


@pytest.fixture(scope="module")
def client(svc_dir):
    with TestClient(create_app(settings(svc_dir), background=False)) as c:
        yield c


def test_real_http_molecules_and_captions_equal_the_library(svc_dir):
    app = create_app(settings(svc_dir))
    with LiveServer(app) as server:
        server.wait_ready()
        corpus = embedded_corpus()
        r = httpx.post(server.url + "/v1/retrieve/molecules",
                       json={"smiles": ASPIRIN, "k": 3, "order": "ranked"}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        got = [(e["cid"], e["score"]) for e in body["results"][0]["examples"]]
        lib = retrieve_examples(cached_index("graph", corpus, svc_dir, settings=settings(svc_dir)),
                                [ASPIRIN], 3)[0]
        assert got == [(e.cid, e.score) for e in lib]
        assert [e["rank"] for e in body["results"][0]["examples"]] == [1, 2, 3]
        assert body["results"][0]["canonical_smiles"] == "CC(=O)Oc1ccccc1C(=O)O"

        caption = corpus.descriptions[42]
        r = httpx.post(server.url + "/v1/retrieve/captions",
                       json={"caption": [caption, "The molecule is an amino acid."],
                             "exclude_cids": [corpus.cids[42]]}, timeout=30)
        assert r.status_code == 200, r.text
        res = r.json()["results"]
        lib = retrieve_examples(cached_index("bm25", corpus, svc_dir),
                                [caption, "The molecule is an amino acid."], 4,
                                exclusions=[Exclusion(cids=frozenset([corpus.cids[42]]))] * 2)
        for out, want in zip(res, lib):
            # default order is ICMA's: best example last
            assert [(e["cid"], e["score"]) for e in out["examples"]] == \
                [(e.cid, e.score) for e in reversed(want)]
            assert [e["rank"] for e in out["examples"]] == [4, 3, 2, 1]
        assert corpus.cids[42] not in {e["cid"] for e in res[0]["examples"]}
        m = httpx.get(server.url + "/metrics").text
        assert 'icma_retrieval_request_seconds_bucket{endpoint="molecules",le="0.025",method="graph"}' in m
        assert 'icma_retrieval_queries_total{endpoint="captions",method="bm25"} 2.0' in m


@pytest.mark.parametrize("method", ["graph", "morgan", "rdkit", "random"])
def test_every_molecule_method(client, method):
    r = client.post("/v1/retrieve/molecules", json={"smiles": [ASPIRIN, "CCO"], "k": 2,
                                                     "method": method})
    assert r.status_code == 200, r.text
    assert [len(x["examples"]) for x in r.json()["results"]] == [2, 2]


def test_structure_exclusion_and_random_walk(client):
    corpus = embedded_corpus()
    smiles = corpus.smiles[10]
    plain = client.post("/v1/retrieve/molecules", json={"smiles": smiles, "k": 1,
                                                         "method": "morgan"}).json()
    assert plain["results"][0]["examples"][0]["score"] == 1.0
    excl = client.post("/v1/retrieve/molecules", json={
        "smiles": smiles, "k": 3, "method": "morgan", "exclude_same_structure": True}).json()
    assert all(e["score"] < 1.0 for e in excl["results"][0]["examples"])
    walk = {"smiles": smiles, "k": 2, "method": "morgan", "order": "ranked",
            "random_walk": {"skip_probability": 0.5, "seed": 3}}
    a, b = client.post("/v1/retrieve/molecules", json=walk), client.post(
        "/v1/retrieve/molecules", json=walk)
    assert a.json()["results"] == b.json()["results"]


def test_corpora_health_ready(client):
    import os

    assert client.get("/healthz").json() == {"status": "ok", "worker": os.getpid()}
    assert client.get("/readyz").json() == {"status": "ready", "worker": os.getpid()}
    data = client.get("/v1/corpora").json()
    assert data["default"] == "chebi20-embedded"
    emb = data["corpora"][0]
    assert emb["size"] == 6601 and emb["state"] == "ready"
    graph = next(i for i in emb["indexes"] if i["kind"] == "graph")
    assert graph["encoder"] == "gcn_supervised_contextpred" and len(graph["encoder_sha256"]) == 64


def err(r, status, field=None, text=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}
    if field is not None:
        assert body["error"]["field"] == field, body
    if text is not None:
        assert text in body["error"]["message"], body
    assert "Traceback" not in r.text


def test_bad_inputs_are_clear_4xx(client):
    mol = "/v1/retrieve/molecules"
    cap = "/v1/retrieve/captions"
    err(client.post(mol, json={"smiles": "C1CC"}), 422, "smiles", "not a valid SMILES")
    err(client.post(mol, json={"smiles": ["CCO", "C(C)(C)(C)(C)C"]}), 422, "smiles[1]", "valence")
    err(client.post(mol, json={"smiles": ""}), 422, "smiles", "empty")
    err(client.post(cap, json={"caption": "   "}), 422, "caption", "empty")
    err(client.post(cap, json={"caption": "x" * 9000}), 422, "caption", "longer than")
    err(client.post(mol, json={"smiles": "CCO", "k": 0}), 422, "k")
    err(client.post(mol, json={"smiles": "CCO", "k": 51}), 422, "k", "at most 50")
    err(client.post(mol, json={"smiles": "CCO", "k": "two"}), 422, "k")
    err(client.post(mol, json={"smiles": "CCO", "corpus": "chembl"}), 404, "corpus", "chembl")
    err(client.post(mol, json={"smiles": "CCO", "method": "bm25"}), 422, "method")
    err(client.post(cap, json={"caption": "a", "method": "graph"}), 422, "method")
    err(client.post(mol, json={"smiles": 42}), 422, "smiles")
    err(client.post(mol, json={"smiles": "CCO", "colour": "red"}), 422, "colour")
    err(client.post(mol, json={"smiles": ["CCO"] * 257}), 422, "smiles", "at most 256")
    err(client.post(mol, json={"smiles": []}), 422, "smiles", "at least one")
    err(client.post(mol, json={"smiles": "CCO", "random_walk": {"skip_probability": 1.5}}), 422,
        "random_walk.skip_probability")
    err(client.post(mol, content=b"{not json", headers={"content-type": "application/json"}),
        400, "body")
    err(client.post(mol, content=b"x" * (3 * 2**20),
                    headers={"content-type": "application/json"}), 413, "body")
    err(client.get("/v1/nothing"), 404)


def test_api_key(svc_dir):
    app = create_app(settings(svc_dir, api_key="s3cret"), background=False)
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/metrics").status_code == 200
        err(c.get("/v1/corpora"), 401, "authorization", "missing")
        err(c.post("/v1/retrieve/captions", json={"caption": "a"},
                   headers={"Authorization": "Bearer nope"}), 401, "authorization", "wrong")
        ok = c.post("/v1/retrieve/captions", json={"caption": "The molecule is an acid."},
                    headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_upload_needs_a_key(client):
    r = client.post("/v1/corpora", data={"name": "mine"},
                    files={"file": ("c.tsv", b"CID\tSMILES\tdescription\n1\tCCO\tethanol\n")})
    err(r, 403, "authorization", "ICMA_API_KEY")


def test_upload_builds_in_background_and_serves(svc_dir, tmp_path, chebi_val):
    from icma.core.corpus import write_corpus

    path = tmp_path / "small.tsv"
    write_corpus(chebi_val.subset(range(120)), path)
    auth = {"Authorization": "Bearer k"}
    app = create_app(settings(svc_dir, api_key="k"))  # background builder thread
    with TestClient(app) as c:
        r = c.post("/v1/corpora", data={"name": "val120"}, headers=auth,
                   files={"file": ("small.tsv", path.read_bytes())})
        assert r.status_code == 202, r.text
        assert r.json()["size"] == 120 and r.json()["state"] in ("queued", "building", "ready")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            info = {x["name"]: x for x in c.get("/v1/corpora", headers=auth).json()["corpora"]}
            if info["val120"]["state"] == "ready":
                break
            time.sleep(0.2)
        assert info["val120"]["state"] == "ready"
        assert info["val120"]["progress"]["indexes_done"] == 4
        r = c.post("/v1/retrieve/molecules", headers=auth,
                   json={"smiles": chebi_val.smiles[5], "corpus": "val120", "k": 1})
        assert r.json()["results"][0]["examples"][0]["cid"] == chebi_val.cids[5]
        err(c.post("/v1/corpora", data={"name": "val120"}, headers=auth,
                   files={"file": ("small.tsv", path.read_bytes())}), 409, "name", "exists")
        err(c.post("/v1/corpora", data={"name": "broken"}, headers=auth,
                   files={"file": ("b.tsv", b"id,smiles\n1,CCO\n")}), 422, "file", "lacks column")
        err(c.post("/v1/corpora", data={"name": "../evil"}, headers=auth,
                   files={"file": ("b.tsv", path.read_bytes())}), 422, "name")
    assert not (svc_dir / "corpora/broken.tsv").exists()
    # a restart brings the uploaded corpus back
    with TestClient(create_app(settings(svc_dir, api_key="k"), background=False)) as c:
        names = [x["name"] for x in c.get("/v1/corpora", headers=auth).json()["corpora"]]
        assert "val120" in names


def test_openapi_yaml_is_current():
    from pathlib import Path

    from icma.server.openapi import render
    from icma.workers.translator.app import create_app as worker_app

    path = Path(__file__).resolve().parents[1] / "openapi.yaml"
    assert path.read_text(encoding="utf-8") == render(create_app, worker_app), \
        "openapi.yaml is out of date: run `icma openapi --out openapi.yaml`"


def test_icma_serve_retrieval_command(svc_dir):
    """The console script starts the service; SIGTERM stops it cleanly."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("icma")
    env = {**os.environ, "ICMA_DATA_DIR": str(svc_dir), "ICMA_RETRIEVAL_KINDS": '["graph","bm25"]'}
    url = f"http://127.0.0.1:{port}"
    proc = spawn_service(["retrieval", "--port", str(port), "--log-level", "warning"], url,
                         env=env, program=[str(exe)], timeout=120, interval=0.2)
    try:
        r = httpx.post(url + "/v1/retrieve/molecules", json={"smiles": ASPIRIN}, timeout=30)
        assert r.status_code == 200 and len(r.json()["results"][0]["examples"]) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    bad = subprocess.run([str(exe), "serve", "retrieval", "--port", "70000"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "port" in bad.stderr
