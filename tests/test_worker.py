"""The translation worker over real HTTP on 127.0.0.1, with the real retrieval service beside it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from icma.generation.engines import load_engine
from icma.core.prompts import Example, build_prompt
from icma.core.settings import Settings
from icma.server.spawn import spawn_service
from icma.services.retrieval.app import create_app as retrieval_app
from tests.conftest import REPO, SERVICE_KINDS
from tests.service_helpers import LiveServer, Recording
from icma.workers.translator.app import create_app as worker_app

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"
CAPTION = ("The molecule is a member of the class of benzoic acids that is salicylic acid in "
           "which the hydroxy group has been acetylated.")


@pytest.fixture(scope="module")
def retrieval(svc_dir):
    with LiveServer(retrieval_app(Settings(data_dir=svc_dir, retrieval_kinds=SERVICE_KINDS))) as s:
        s.wait_ready()
        yield s


def worker_settings(tmp: Path, retrieval_url: str, **kw) -> Settings:
    """No shipped adapters unless asked: these tests pin the base model's behaviour."""
    return Settings(data_dir=tmp, retrieval_url=retrieval_url, jobs_db=tmp / "jobs.sqlite3",
                    adapters_dir=tmp / "adapters", progress=False,
                    **{"shipped_adapters_dir": None, **kw})


@pytest.fixture(scope="module")
def smol_worker(retrieval, smollm2, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("worker")
    settings = worker_settings(tmp, retrieval.url)
    engine = Recording(load_engine("transformers", settings=settings, model=str(smollm2),
                                   device="cpu"))
    app = worker_app(settings, engine_loader=lambda: engine)
    with LiveServer(app) as w:
        w.wait_ready()
        w.engine = engine
        yield w


GREEDY = {"decoding": "greedy", "max_new_tokens": 40}


def test_mol2cap_end_to_end_with_smollm2(smol_worker, smollm2):
    r = httpx.post(smol_worker.url + "/mol2cap", timeout=120,
                   json={"smiles": ASPIRIN, "generation": GREEDY, "return_prompt": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["caption"].strip()
    assert body["engine"] == "transformers" and body["adapter"] is None
    assert len(body["examples"]) == 2 and [e["rank"] for e in body["examples"]] == [1, 2]
    assert all(e["cid"] and e["smiles"] and e["description"] for e in body["examples"])
    assert body["examples"][0]["score"] >= body["examples"][1]["score"]
    t = body["timings"]
    assert t["retrieval_ms"] > 0 and t["generation_ms"] > 0
    assert t["total_ms"] >= t["retrieval_ms"] + t["generation_ms"]
    # The engine received exactly icma.core.prompts' prompt for these examples, byte for byte.
    examples = [Example(e["smiles"], e["description"], e["cid"], e["score"])
                for e in body["examples"]]
    engine = smol_worker.engine
    expected = build_prompt("mol2cap", ASPIRIN, examples, prime_answer=True,
                            count_tokens=engine.count_tokens, cutoff=2048,
                            reserve=GREEDY["max_new_tokens"]).text
    assert engine.prompts[-1] == expected == body["prompt"]
    assert body["usage"]["prompt_tokens"] == engine.count_tokens(expected)
    # greedy decoding speculated: the caption copies the examples, and the counters say so
    u = body["usage"]
    assert u["draft_tokens"] >= u["accepted_tokens"] > 0
    assert u["acceptance_rate"] == round(u["accepted_tokens"] / u["draft_tokens"], 4)
    metrics = httpx.get(smol_worker.url + "/metrics").text
    counted = re.search(r"^icma_worker_speculative_accepted_tokens (\S+)$", metrics, re.M)
    assert counted and float(counted.group(1)) >= u["accepted_tokens"]


def test_cap2mol_end_to_end_reports_validity(smol_worker):
    r = httpx.post(smol_worker.url + "/cap2mol", timeout=300,
                   json={"caption": CAPTION, "num_candidates": 3,
                         "generation": {"max_new_tokens": 60}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["smiles"] and isinstance(body["valid"], bool)
    assert 1 <= body["candidates_tried"] <= 3
    assert body["valid"] == (body["canonical_smiles"] is not None)
    assert body["valid"] or body["candidates_tried"] == 3  # stops at the first valid one
    assert len(body["examples"]) == 4


def test_molregpt_style_with_the_in_process_engine(smol_worker):
    """MolReGPT's messages reach the transformers engine through the worker's queue rendered
    by SmolLM2's chat template, primed with the JSON object's start."""
    r = httpx.post(smol_worker.url + "/mol2cap", timeout=300,
                   json={"smiles": ASPIRIN, "prompt_style": "molregpt", "n_shot": 3,
                         "generation": {"decoding": "greedy", "max_new_tokens": 40},
                         "return_prompt": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prompt_style"] == "molregpt" and len(body["examples"]) == 3
    assert body["prompt"].startswith("<|im_start|>system\nYou are an expert chemist")
    assert body["prompt"].endswith('<|im_start|>assistant\n{"caption": "')
    assert smol_worker.engine.prompts[-1] == body["prompt"]
    assert body["caption"] and body["examples"][0]["score"] >= body["examples"][2]["score"]


@pytest.fixture(scope="module")
def nn_worker(retrieval, tmp_path_factory):
    """The worker with the nearest-neighbour engine (no model): fast, for errors and jobs."""
    tmp = tmp_path_factory.mktemp("nn-worker")
    app = worker_app(worker_settings(tmp, retrieval.url, engine="nearest-neighbour",
                                     max_jobs=3))
    with LiveServer(app) as w:
        w.wait_ready()
        yield w


@pytest.mark.parametrize("path,body,status,field", [
    ("/mol2cap", {"smiles": "C1CC"}, 422, "smiles"),
    ("/mol2cap", {"smiles": ""}, 422, "smiles"),
    ("/mol2cap", {"smiles": "C" * 5000}, 422, "smiles"),
    ("/cap2mol", {"caption": "   "}, 422, "caption"),
    ("/cap2mol", {"caption": "x" * 9000}, 422, "caption"),
    ("/mol2cap", {"smiles": "CCO", "adapter": "no-such-adapter"}, 404, "adapter"),
    ("/mol2cap", {"smiles": "CCO", "adapter": "../etc"}, 422, "adapter"),
    ("/mol2cap", {"smiles": "CCO", "n_shot": 500}, 422, "n_shot"),
    ("/mol2cap", {"smiles": "CCO", "retrieval": {"method": "bm25"}}, 422, "retrieval.method"),
    ("/mol2cap", {"smiles": "CCO", "retrieval": {"corpus": "nope"}}, 404, "retrieval.corpus"),
    ("/cap2mol", {"caption": "an acid", "num_candidates": 3,
                  "generation": {"decoding": "greedy"}}, 422, "num_candidates"),
    ("/cap2mol", {"caption": "an acid", "generation": {"top_p": 2}}, 422, "generation.top_p"),
    ("/mol2cap", {"smiles": "CCO", "bogus": 1}, 422, "bogus"),
    *[("/mol2cap", {"smiles": "CCO", "generation": {"decoding": "consensus", "num_samples": n}},
       422, "generation.num_samples") for n in (0, 1, 17, 100, "4", 2.0)],
    ("/mol2cap", {"smiles": "CCO", "generation": {"num_samples": 4}}, 422,
     "generation.num_samples"),  # sampling writes one answer: num_samples is consensus's
    ("/cap2mol", {"caption": "an acid", "num_candidates": 3,
                  "generation": {"decoding": "consensus"}}, 422, "num_candidates"),
    ("/mol2cap", {"smiles": "CCO", "generation": {"no_repeat_ngram_size": -1}}, 422,
     "generation.no_repeat_ngram_size"),
])
def test_bad_input_is_a_clear_4xx(nn_worker, path, body, status, field):
    r = httpx.post(nn_worker.url + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field, r.text
    assert r.json()["error"]["message"]


def test_prompt_too_long_for_the_budget_is_422(retrieval, smollm2, tmp_path):
    settings = worker_settings(tmp_path, retrieval.url)
    engine = load_engine("transformers", settings=settings, model=str(smollm2), device="cpu")
    app = worker_app(settings, engine_loader=lambda: engine)
    with LiveServer(app) as w:
        w.wait_ready()
        long = "The molecule is " + "a very long caption " * 300
        r = httpx.post(w.url + "/cap2mol", json={"caption": long, "cutoff": 512}, timeout=60)
        assert r.status_code == 422 and r.json()["error"]["code"] == "too_long", r.text


def test_retrieval_service_down_is_503(tmp_path):
    app = worker_app(worker_settings(tmp_path, "http://127.0.0.1:9", engine="nearest-neighbour",
                                     retrieval_retries=1, retrieval_timeout=1))
    with LiveServer(app) as w:
        w.wait_ready()
        r = httpx.post(w.url + "/mol2cap", json={"smiles": "CCO"}, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"]["field"] == "retrieval"
        assert "unavailable after 2 tries" in r.json()["error"]["message"]
        # a job waits for the service instead of failing its items
        job = httpx.post(w.url + "/v1/jobs", json={"task": "mol2cap", "items": ["CCO"]}).json()
        time.sleep(1.5)
        j = httpx.get(w.url + f"/v1/jobs/{job['id']}").json()
        assert j["state"] == "running" and j["done"] == 0 and "waiting" in j["message"]


def test_api_key_guards_everything_but_health(retrieval, tmp_path):
    app = worker_app(worker_settings(tmp_path, retrieval.url, engine="nearest-neighbour",
                                     api_key="k"))
    with LiveServer(app) as w:
        w.wait_ready()
        assert httpx.post(w.url + "/mol2cap", json={"smiles": "CCO"}).status_code == 401
        assert httpx.get(w.url + "/v1/jobs").status_code == 401
        ok = httpx.post(w.url + "/mol2cap", json={"smiles": "CCO"},
                        headers={"authorization": "Bearer k"})
        assert ok.status_code == 200, ok.text  # (the retrieval service here has no key)
        assert httpx.get(w.url + "/metrics").status_code == 200


def _wait(url: str, job_id: str, states=("succeeded", "failed", "cancelled"), timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        if job["state"] in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job still {job['state']}")


def test_job_results_in_input_order_with_per_item_errors(nn_worker, chebi_val):
    recs = chebi_val.records[:20]
    items = [{"input": r.smiles, "id": r.cid, "reference": r.description} for r in recs]
    items.insert(5, {"input": "not a smiles", "id": "bad"})
    items.insert(9, "")
    r = httpx.post(nn_worker.url + "/v1/jobs", json={"task": "mol2cap", "items": items,
                                                     "options": {"n_shot": 1}})
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    job = _wait(nn_worker.url, r.json()["id"])
    assert (job["state"], job["total"], job["done"], job["failed"]) == ("succeeded", 22, 22, 2)
    lines = [json.loads(x) for x in
             httpx.get(nn_worker.url + job["results_url"]).text.splitlines()]
    assert [x["index"] for x in lines] == list(range(22))
    assert [x["input"] for x in lines] == [x if isinstance(x, str) else x["input"] for x in items]
    assert lines[5]["error"]["field"] == "smiles" and lines[5]["prediction"] == ""
    assert lines[9]["error"]["field"] == "smiles"
    good = [x for x in lines if x["error"] is None]
    assert len(good) == 20 and all(x["prediction"] and len(x["examples"]) == 1 for x in good)
    listed = httpx.get(nn_worker.url + "/v1/jobs").json()["jobs"]
    assert job["id"] in [j["id"] for j in listed]


def test_job_metrics_are_icma_evals_numbers_once_the_job_ends(nn_worker, chebi_val, tmp_path):
    recs = chebi_val.records[:12]
    items = [{"input": r.smiles, "id": r.cid, "reference": r.description} for r in recs]
    items.insert(3, {"input": "not a smiles", "reference": "The molecule is lost."})
    items.append({"input": recs[0].smiles})  # no reference: not scored
    job = httpx.post(nn_worker.url + "/v1/jobs", json={
        "task": "mol2cap", "items": items,
        "options": {"retrieval": {"exclude_same_structure": True}}}).json()
    job = _wait(nn_worker.url, job["id"])
    # The first scores load METEOR's WordNet and the SciBERT tokenizer: seconds.
    m = httpx.get(f"{nn_worker.url}/v1/jobs/{job['id']}/metrics", timeout=300)
    assert m.status_code == 200, m.text
    got = m.json()
    assert (got["scored"], got["total"]) == (13, 14)
    # The same numbers as `icma eval` on the job's result lines that have a reference (an
    # error scores as "").
    lines = [x for x in httpx.get(nn_worker.url + job["results_url"]).text.splitlines()
             if "reference" in json.loads(x)]
    assert len(lines) == 13
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, "-m", "icma", "eval", "mol2cap", "--predictions",
                          str(path), "--json"], capture_output=True, text=True, check=True)
    expected = json.loads(out.stdout)
    for k in ("bleu2", "bleu4", "rouge1", "rouge2", "rougeL", "meteor"):
        assert got["metrics"][k] == pytest.approx(expected[k], abs=1e-12), k
    assert 0 < got["metrics"]["bleu4"] < 1


def test_job_metrics_refusals(nn_worker):
    none = httpx.post(nn_worker.url + "/v1/jobs", json={"task": "cap2mol",
                                                        "items": ["The molecule is an acid."]})
    job = _wait(nn_worker.url, none.json()["id"])
    r = httpx.get(f"{nn_worker.url}/v1/jobs/{job['id']}/metrics")
    assert r.status_code == 409 and r.json()["error"]["field"] == "reference"
    assert httpx.get(nn_worker.url + "/v1/jobs/nope/metrics").status_code == 404


def test_depict_draws_svg_with_shared_atoms_and_refuses_bad_input(nn_worker):
    r = httpx.post(nn_worker.url + "/v1/depict", json={"smiles": ASPIRIN,
                                                       "reference": "OC(=O)c1ccccc1O"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("image/svg+xml")
    assert r.text.startswith("<svg")
    assert (r.headers["x-heavy-atoms"], r.headers["x-shared-atoms"],
            r.headers["x-mcs-complete"]) == ("13", "10", "true")
    g = httpx.get(nn_worker.url + "/v1/depict", params={"smiles": ASPIRIN, "width": 200,
                                                        "height": 150})
    assert g.status_code == 200 and "width='200px'" in g.text
    assert "x-shared-atoms" not in g.headers
    for body, field in [({"smiles": "C1CC("}, "smiles"), ({"smiles": ""}, "smiles"),
                        ({"smiles": "CCO", "width": 5000}, "width"),
                        ({"smiles": "CCO", "reference": "C1CC("}, "reference"),
                        ({"smiles": "C" * 201}, "smiles"),  # over ICMA_DEPICT_MAX_HEAVY_ATOMS
                        ({"smiles": "CCO", "colour": "red"}, "colour")]:
        r = httpx.post(nn_worker.url + "/v1/depict", json=body)
        assert r.status_code == 422, (body, r.text)
        assert field in r.json()["error"]["field"], (body, r.json())
    big = httpx.post(nn_worker.url + "/v1/depict", json={"smiles": "C" * 201}).json()
    assert "ICMA_DEPICT_MAX_HEAVY_ATOMS" in big["error"]["message"]
    r = httpx.get(nn_worker.url + "/v1/depict", params={"smiles": "CCO", "height": 1})
    assert r.status_code == 422 and "height" in r.json()["error"]["field"]


def test_job_from_uploaded_tsv_and_bad_files(nn_worker, shared, tmp_path):
    tsv = "\n".join((shared / "data/chebi20/test.txt").read_text().splitlines()[:6]) + "\n"
    r = httpx.post(nn_worker.url + "/v1/jobs/upload", data={"task": "cap2mol"},
                   files={"file": ("queries.tsv", tsv.encode())})
    assert r.status_code == 202, r.text
    job = _wait(nn_worker.url, r.json()["id"])
    lines = [json.loads(x) for x in httpx.get(nn_worker.url + job["results_url"]).text.splitlines()]
    assert len(lines) == 5 and all(x["valid"] and x["reference"] for x in lines)
    bad = httpx.post(nn_worker.url + "/v1/jobs/upload", data={"task": "mol2cap"},
                     files={"file": ("q.jsonl", b'{"input": "CCO"}\n{oops\n')})
    assert bad.status_code == 422 and "line 2" in bad.json()["error"]["message"]
    assert bad.json()["error"]["field"] == "file"
    opts = httpx.post(nn_worker.url + "/v1/jobs/upload", files={"file": ("q.jsonl", b'"CCO"\n')},
                      data={"task": "mol2cap", "options": '{"n_shot": -1}'})
    assert opts.status_code == 422 and opts.json()["error"]["field"] == "options.n_shot"
    assert httpx.get(nn_worker.url + "/v1/jobs/nope").status_code == 404


@pytest.fixture(scope="module")
def tiny_worker(retrieval, tiny_model, tmp_path_factory):
    """A worker on a tiny config-built Llama: generation slow enough to catch jobs running."""
    tmp = tmp_path_factory.mktemp("tiny-worker")
    app = worker_app(worker_settings(tmp, retrieval.url, llm_model=str(tiny_model),
                                     job_batch_size=2, max_jobs=3))
    with LiveServer(app) as w:
        w.wait_ready()
        w.tmp = tmp
        yield w


def test_cancel_queued_and_running_jobs_and_a_full_queue(tiny_worker):
    slow = {"generation": {"decoding": "greedy", "max_new_tokens": 200}, "n_shot": 1}
    items = ["CCO", "CCN", "CCC", "CCCl"] * 10
    a = httpx.post(tiny_worker.url + "/v1/jobs", json={"task": "mol2cap", "items": items,
                                                       "options": slow}).json()
    b = httpx.post(tiny_worker.url + "/v1/jobs", json={"task": "mol2cap", "items": items,
                                                       "options": slow}).json()
    c = httpx.post(tiny_worker.url + "/v1/jobs", json={"task": "mol2cap", "items": ["CCO"]})
    full = httpx.post(tiny_worker.url + "/v1/jobs", json={"task": "mol2cap", "items": ["CCO"]})
    assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
    assert full.headers["retry-after"]
    _wait(tiny_worker.url, a["id"], states=("running",))
    while httpx.get(tiny_worker.url + f"/v1/jobs/{a['id']}").json()["done"] == 0:
        time.sleep(0.05)
    gone = httpx.delete(tiny_worker.url + f"/v1/jobs/{a['id']}").json()
    assert gone["state"] == "cancelled"
    assert httpx.delete(tiny_worker.url + f"/v1/jobs/{b['id']}").json()["state"] == "cancelled"
    again = httpx.delete(tiny_worker.url + f"/v1/jobs/{b['id']}")
    assert again.status_code == 409 and again.json()["error"]["field"] == "job_id"
    time.sleep(1)  # the runner notices between batches
    a_now = httpx.get(tiny_worker.url + f"/v1/jobs/{a['id']}").json()
    assert a_now["state"] == "cancelled" and 0 < a_now["done"] < len(items)
    lines = [json.loads(x) for x in
             httpx.get(tiny_worker.url + f"/v1/jobs/{a['id']}/results").text.splitlines()]
    assert len(lines) == len(items)  # one line per input, cancelled ones say so
    assert sum(x["error"] is None for x in lines) == a_now["done"]
    assert all(x["error"]["code"] == "cancelled" for x in lines[a_now["done"]:])
    assert _wait(tiny_worker.url, c.json()["id"])["state"] == "succeeded"


def test_adapters_are_listed_and_applied_per_request(tiny_worker, tiny_model):
    from tests.test_engines import _random_lora

    assert httpx.get(tiny_worker.url + "/v1/adapters").json()["adapters"] == []
    _random_lora(tiny_model, tiny_worker.tmp / "adapters" / "chebi-m2c", 3)
    listed = httpx.get(tiny_worker.url + "/v1/adapters").json()
    assert [a["name"] for a in listed["adapters"]] == ["chebi-m2c"]
    assert listed["adapters"][0]["r"] == 4
    greedy = {"decoding": "greedy", "max_new_tokens": 12}
    base = httpx.post(tiny_worker.url + "/mol2cap", json={"smiles": ASPIRIN,
                                                          "generation": greedy}).json()
    tuned = httpx.post(tiny_worker.url + "/mol2cap", json={
        "smiles": ASPIRIN, "generation": greedy, "adapter": "chebi-m2c",
        "return_prompt": True}).json()
    assert tuned["adapter"] == "chebi-m2c" and base["adapter"] is None
    assert tuned["caption"] != base["caption"]
    assert not tuned["prime_answer"] and not tuned["prompt"].endswith("Caption:")


def test_sigkilled_worker_resumes_its_job_with_one_result_per_input(retrieval, tiny_model,
                                                                   tmp_path):
    env = {**os.environ, "ICMA_DATA_DIR": str(tmp_path), "ICMA_LLM_MODEL": str(tiny_model),
           "ICMA_JOBS_DB": str(tmp_path / "jobs.sqlite3"), "ICMA_JOB_BATCH_SIZE": "2",
           "ICMA_LLM_DEVICE": "cpu", "ICMA_PROGRESS": "false"}
    items = [f"C{'C' * (i % 7)}O" for i in range(30)]

    def start(port: int) -> subprocess.Popen:
        return spawn_service(["worker", "--port", str(port), "--retrieval-url", retrieval.url,
                              "--log-level", "warning"], f"http://127.0.0.1:{port}", env=env,
                             cwd=REPO, timeout=120, interval=0.1)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(port)
    try:
        job = httpx.post(url + "/v1/jobs", json={
            "task": "mol2cap", "items": items,
            "options": {"n_shot": 1, "generation": {"decoding": "greedy",
                                                    "max_new_tokens": 120}}}).json()
        while httpx.get(url + f"/v1/jobs/{job['id']}").json()["done"] < 6:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        before = [json.loads(x) for x in _results_now(tmp_path, job["id"])]
        assert 6 <= len(before) < len(items)  # killed mid-job
        proc = start(port)
        done = _wait(url, job["id"], timeout=300)
        assert done["state"] == "succeeded" and done["done"] == done["total"] == len(items)
        lines = [json.loads(x) for x in
                 httpx.get(url + job["results_url"] if "results_url" in job else
                           url + f"/v1/jobs/{job['id']}/results").text.splitlines()]
        assert [x["index"] for x in lines] == list(range(len(items)))  # none lost or doubled
        assert all(x["error"] is None for x in lines)
        assert lines[:len(before)] == before  # finished work was kept, not redone
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _results_now(data: Path, job_id: str) -> list[str]:
    from icma.jobs.results import iter_results
    from icma.jobs.store import JobStore

    store = JobStore(data / "jobs.sqlite3")
    try:
        return list(iter_results(store, job_id, follow=False))
    finally:
        store.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONSENSUS = {"decoding": "consensus", "num_samples": 4, "max_new_tokens": 8}


def _in_pool(answer: str, consensus: dict, examples: list[dict], field: str) -> bool:
    """Whether ``answer`` is what ``consensus`` says won: a sample, or that example's answer."""
    if consensus["source"] == "sample":
        return 0 <= consensus["sample"] < consensus["samples"]
    best = examples[consensus["rank"] - 1]
    return best["cid"] == consensus["cid"] and best[field] == answer


def test_consensus_over_http_picks_from_its_pool_and_repeats_for_a_seed(tiny_worker):
    for path, body, answer, field in (
            ("/mol2cap", {"smiles": ASPIRIN}, "caption", "description"),
            ("/cap2mol", {"caption": CAPTION}, "smiles", "smiles")):
        body = {**body, "generation": CONSENSUS}
        first, again = (httpx.post(tiny_worker.url + path, json=body, timeout=120)
                        for _ in range(2))
        assert first.status_code == 200, first.text
        out = first.json()
        c = out["consensus"]
        assert c["samples"] == 4 and 1 <= c["pool"] <= 4 + len(out["examples"])
        assert _in_pool(out[answer], c, out["examples"], field), out
        assert out["usage"]["completion_tokens"] <= 4 * 8
        same = again.json()
        assert (same[answer], same["consensus"]) == (out[answer], c)  # deterministic per seed
        if path == "/cap2mol":  # the random model writes no molecule: an example wins
            assert out["valid"] and c["source"] == "example"
    plain = httpx.post(tiny_worker.url + "/mol2cap", json={"smiles": ASPIRIN, "generation": {
        "max_new_tokens": 8}}, timeout=120).json()
    assert plain["consensus"] is None


def test_consensus_job_lines_say_where_each_answer_came_from(tiny_worker):
    items = ["CCO", "CC(=O)O", "c1ccccc1"]
    bad = httpx.post(tiny_worker.url + "/v1/jobs", json={
        "task": "mol2cap", "items": items,
        "options": {"generation": {**CONSENSUS, "num_samples": 1}}})
    assert bad.status_code == 422 and \
        bad.json()["error"]["field"] == "options.generation.num_samples", bad.text
    r = httpx.post(tiny_worker.url + "/v1/jobs", json={
        "task": "mol2cap", "items": items, "options": {"generation": CONSENSUS, "n_shot": 2}})
    assert r.status_code == 202, r.text
    job = _wait(tiny_worker.url, r.json()["id"])
    assert job["state"] == "succeeded" and job["failed"] == 0, job
    lines = [json.loads(x) for x in
             httpx.get(tiny_worker.url + job["results_url"]).text.splitlines()]
    assert len(lines) == 3
    for line in lines:
        c = line["consensus"]
        assert c["samples"] == 4 and c["source"] in ("sample", "example")
        assert len(c["answers"]) == 4  # kept, to measure other rules on the same samples
        if c["source"] == "example":
            assert c["cid"] == line["examples"][c["rank"] - 1]
        else:
            assert line["prediction"] == c["answers"][c["sample"]]


def test_icma_translate_with_consensus(svc_dir, chebi_val, tiny_model, tmp_path):
    src = tmp_path / "q.jsonl"
    recs = chebi_val.records[:3]
    src.write_text("".join(json.dumps({"input": r.description, "id": r.cid}) + "\n"
                           for r in recs))
    out = tmp_path / "pred.jsonl"
    env = {**os.environ, "ICMA_DATA_DIR": str(svc_dir), "ICMA_PROGRESS": "false"}
    cmd = [sys.executable, "-m", "icma", "translate", "--task", "cap2mol", "--input", str(src),
           "--output", str(out), "--model", str(tiny_model), "--engine", "transformers",
           "--decoding", "consensus", "--num-samples", "3", "--max-new-tokens", "8",
           "--no-repeat-ngram-size", "3"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    by_cid = {r.cid: r.smiles for r in chebi_val.records}
    for line in lines:
        c = line["consensus"]
        assert (c["samples"], c["source"]) == (3, "example"), line  # the random model's
        assert line["valid"] and line["prediction"] == by_cid[c["cid"]]  # are no molecules


def test_icma_translate_cli_writes_jsonl_that_icma_eval_reads(svc_dir, chebi_val, tmp_path):
    src = tmp_path / "q.jsonl"
    recs = chebi_val.records[:6]
    src.write_text("".join(json.dumps({"cid": r.cid, "smiles": r.smiles,
                                       "description": r.description}) + "\n" for r in recs)
                   + json.dumps({"input": "C1CC", "id": "broken", "reference": "x"}) + "\n")
    out = tmp_path / "out" / "pred.jsonl"
    env = {**os.environ, "ICMA_DATA_DIR": str(svc_dir), "ICMA_PROGRESS": "false"}
    cmd = [sys.executable, "-m", "icma", "translate", "--task", "mol2cap", "--input", str(src),
           "--output", str(out), "--engine", "nearest-neighbour", "--n-shot", "1"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "7 mol2cap inputs" in done.stderr and "1 failed" in done.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == [r.cid for r in recs] + ["broken"]
    assert not list(out.parent.glob("*.partial.sqlite3*"))  # nothing left behind
    ev = subprocess.run([sys.executable, "-m", "icma", "eval", "mol2cap", "--predictions",
                         str(out), "--json"], env=env, cwd=REPO, capture_output=True, text=True,
                        timeout=300)
    assert ev.returncode == 0, ev.stderr
    # every record is in the corpus it retrieves from; the top example of a molecule that is
    # not excluded is itself, so its caption comes back (BLEU near 1 on 6 of 7)
    assert json.loads(ev.stdout)["bleu2"] > 0.7
    missing = [x if x != str(src) else str(tmp_path / "missing.jsonl") for x in cmd]
    bad = subprocess.run(missing, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no such file" in bad.stderr and "Traceback" not in bad.stderr


def test_serve_all_starts_both_services_and_prints_curl_examples(svc_dir, tmp_path):
    env = {**os.environ, "ICMA_DATA_DIR": str(svc_dir), "ICMA_PROGRESS": "false",
           "ICMA_JOBS_DB": str(tmp_path / "jobs.sqlite3"),
           "ICMA_RETRIEVAL_KINDS": json.dumps(SERVICE_KINDS)}
    r_port, w_port = _free_port(), _free_port()
    done = subprocess.run([sys.executable, "-m", "icma", "serve", "all", "--once", "--engine",
                           "nearest-neighbour", "--retrieval-port", str(r_port), "--port",
                           str(w_port)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "POST /mol2cap -> The molecule is" in done.stdout
    assert "POST /cap2mol -> " in done.stdout and "(valid: True" in done.stdout
    assert f"curl -s http://127.0.0.1:{w_port}/mol2cap" in done.stdout
    for port in (r_port, w_port):  # both stopped
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
