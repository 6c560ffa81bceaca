"""Both services against a hostile or careless client, over real HTTP on 127.0.0.1: lone
surrogates in every string field, deep nesting, values that were coerced, over-long job items,
temperatures that overflow, an engine failing on one item, and what the log says about it all.
Every answer is a clear 4xx naming the field (or a 200), never a 5xx or a traceback."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from icma.core.jsontext import MAX_DEPTH, field_path
from icma.core.settings import Settings
from icma.generation.engines import load_engine
from icma.server.spawn import spawn_service, stop_services
from icma.services.retrieval.app import create_app as retrieval_app
from icma.services.retrieval.protocol import CaptionRequest, MoleculeRequest
from icma.workers.translator.app import create_app as worker_app
from icma.workers.translator.protocol import (
    Cap2MolRequest,
    JobCreate,
    JobOptions,
    Mol2CapRequest,
    TuneJobCreate,
)
from tests.conftest import REPO, SERVICE_KINDS
from tests.service_helpers import LiveServer

KEY = {"authorization": "Bearer k"}
LONE = "\ud800"  # valid in JSON text ("\ud800"), not a Unicode character: no UTF-8 for it


# --- servers -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def retrieval_data(svc_dir, tmp_path_factory) -> Path:
    """A copy of the session's indexed data directory: uploads here touch no other test's."""
    data = tmp_path_factory.mktemp("hostile") / "retrieval-data"
    shutil.copytree(svc_dir, data)
    return data


@pytest.fixture(scope="module")
def retrieval(retrieval_data):
    app = retrieval_app(Settings(data_dir=retrieval_data, retrieval_kinds=SERVICE_KINDS,
                                 api_key="k"))
    with LiveServer(app) as s:
        s.wait_ready()
        yield s


def _worker_settings(tmp: Path, retrieval_url: str, **kw) -> Settings:
    return Settings(data_dir=tmp, retrieval_url=retrieval_url, jobs_db=tmp / "jobs.sqlite3",
                    adapters_dir=tmp / "adapters", progress=False, api_key="k", **kw)


@pytest.fixture(scope="module")
def worker(retrieval, tmp_path_factory):
    """The nearest-neighbour worker: no model, fast."""
    tmp = tmp_path_factory.mktemp("hostile-worker")
    with LiveServer(worker_app(_worker_settings(tmp, retrieval.url,
                                                engine="nearest-neighbour"))) as w:
        w.wait_ready()
        yield w


@pytest.fixture(scope="module")
def tiny_worker(retrieval, tiny_model, tmp_path_factory):
    """The transformers engine on conftest's tiny Llama."""
    tmp = tmp_path_factory.mktemp("hostile-tiny")
    with LiveServer(worker_app(_worker_settings(tmp, retrieval.url, llm_model=str(tiny_model),
                                                llm_device="cpu", job_batch_size=4))) as w:
        w.wait_ready()
        yield w


def post_json(url: str, body, timeout: float = 30) -> httpx.Response:
    # json.dumps writes a lone surrogate as the escape "\ud800", as any client may.
    return httpx.post(url, content=json.dumps(body).encode("ascii"), timeout=timeout,
                      headers={**KEY, "content-type": "application/json"})


def upload(url: str, filename: str, content: bytes, **data) -> httpx.Response:
    return httpx.post(url, data=data, files={"file": (filename, content)}, headers=KEY,
                      timeout=60)


def assert_error(r: httpx.Response, status: int, field: str, *words: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["field"] == field, r.text
    assert all(w in error["message"] for w in words), r.text
    return error


def wait_job(url: str, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", headers=KEY, timeout=10).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job['state']}")


def results(url: str, job: dict) -> list[dict]:
    text = httpx.get(url + job["results_url"], headers=KEY, timeout=30).text
    return [json.loads(line) for line in text.splitlines()]


# --- every string field of every request schema ------------------------------------------------

def string_paths(model) -> list[tuple]:
    """Paths (keys, 0 for a list's first element) to every string a request schema takes."""
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})
    found: list[tuple] = []

    def walk(node: dict, path: tuple) -> None:
        if "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[-1]]
        for option in node.get("anyOf", node.get("oneOf", [])):
            walk(option, path)
        if node.get("type") == "string" or isinstance(node.get("const"), str) or \
                any(isinstance(v, str) for v in node.get("enum", [])):
            found.append(path)
        if node.get("type") == "array" and "items" in node:
            walk(node["items"], path + (0,))
        for name, sub in node.get("properties", {}).items():
            walk(sub, path + (name,))

    walk(schema, ())
    return list(dict.fromkeys(found))


def with_value(base, path: tuple, value):
    """A copy of ``base`` with ``value`` at ``path`` (objects and lists made on the way)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(head, int):
        return [with_value(None, rest, value)]
    out = dict(base) if isinstance(base, dict) else {}
    out[head] = with_value(out.get(head), rest, value)
    return out


#: (service, path, a valid body, its schema)
ENDPOINTS = [
    ("retrieval", "/v1/retrieve/molecules", {"smiles": "CCO"}, MoleculeRequest),
    ("retrieval", "/v1/retrieve/captions", {"caption": "an acid"}, CaptionRequest),
    ("worker", "/mol2cap", {"smiles": "CCO"}, Mol2CapRequest),
    ("worker", "/cap2mol", {"caption": "an acid"}, Cap2MolRequest),
    ("worker", "/v1/jobs", {"task": "mol2cap", "items": ["CCO"]}, JobCreate),
    ("worker", "/v1/jobs", {"kind": "tune", "task": "mol2cap", "options": {"name": "t"}},
     TuneJobCreate),
]
SURROGATE_CASES = [pytest.param(service, path, with_value(base, where, LONE), field_path(where),
                                id=f"{path} {field_path(where)}")
                   for service, path, base, model in ENDPOINTS for where in string_paths(model)]
SURROGATE_CASES += [pytest.param(service, path, {**base, LONE: 1}, "body",
                                 id=f"{path} {model.__name__} key")
                    for service, path, base, model in ENDPOINTS]


@pytest.mark.parametrize("service,path,body,field", SURROGATE_CASES)
def test_a_lone_surrogate_in_any_string_field_is_a_422_naming_it(retrieval, worker, service,
                                                                  path, body, field):
    url = (retrieval if service == "retrieval" else worker).url
    error = assert_error(post_json(url + path, body), 422, field, "not valid Unicode")
    assert "\\ud800" in error["message"]  # shown escaped: a response can hold no surrogate


@pytest.mark.parametrize("where", string_paths(JobOptions), ids=field_path)
def test_a_lone_surrogate_in_an_uploaded_jobs_options_names_the_option(worker, where):
    r = upload(worker.url + "/v1/jobs/upload", "q.jsonl", b'"CCO"\n', task="mol2cap",
               options=json.dumps(with_value({}, where, LONE)))
    assert_error(r, 422, "options." + field_path(where), "not valid Unicode")


JOB_LINES = [
    ('"CCO"\n"\\ud800"\n', "line 2"),
    ('{"input": "CCO", "id": "\\ud800"}\n', "line 1: id: not valid Unicode"),
    ('"CCO"\n{"input": "CCO", "reference": "an \\ud800"}\n', "line 2: reference: not valid"),
    ('{"input": "CCO", "\\ud800": 1}\n', "line 1: a key is not valid Unicode"),
    ('{"input": "CCO", "note": ["x", "\\udc00"]}\n', "line 1: note[1]: not valid Unicode"),
    ('"CCO"\n' + "[" * 1000 + "]" * 1000 + "\n", "line 2: nested deeper than 32"),
    ('"CCO"\n{"input": "CCO", "x": ' + "{\"a\": " * 40 + "1" + "}" * 41 + "\n",
     "line 2: nested deeper"),
    ('{"input": "CCO", "id": NaN}\n', "line 1: id: not a finite number"),
    ('{"input": "CCO", "id": 1e400}\n', "line 1: id: not a finite number"),
    ('"CCO"\n"' + "C" * 4097 + '"\n', "line 2: input longer than 4096 characters"),
    ('{"input": "CCO", "id": "' + "i" * 257 + '"}\n', "line 1: id longer than 256"),
    ('{"input": "CCO", "reference": "' + "r" * 8193 + '"}\n', "line 1: reference longer"),
]


@pytest.mark.parametrize("text,words", JOB_LINES, ids=[w for _, w in JOB_LINES])
def test_a_bad_jsonl_job_upload_is_a_422_naming_the_line(worker, text, words):
    r = upload(worker.url + "/v1/jobs/upload", "q.jsonl", text.encode("ascii"), task="mol2cap")
    assert_error(r, 422, "file", words)


CORPUS_LINES = [
    ('{"cid": "1", "smiles": "CCO", "description": "an \\ud800"}', "description: not valid"),
    ('{"cid": "\\udfff", "smiles": "CCO", "description": "ethanol"}', "cid: not valid"),
    ('{"cid": "1", "smiles": "CC\\ud800O", "description": "ethanol"}', "smiles: not valid"),
    ('{"cid": "1", "smiles": "CCO", "description": "x", "\\ud800": 0}', "a key is not valid"),
    ('{"cid": "1", "smiles": "CCO", "description": ' + "[" * 1000 + "]" * 1000 + "}",
     "nested deeper than 32"),
]


@pytest.mark.parametrize("line,words", CORPUS_LINES, ids=[w for _, w in CORPUS_LINES])
def test_a_bad_jsonl_corpus_line_is_refused_and_leaves_no_file(retrieval, retrieval_data, line,
                                                               words):
    before = sorted(p.relative_to(retrieval_data) for p in retrieval_data.rglob("*"))
    r = upload(retrieval.url + "/v1/corpora", "c.jsonl", line.encode("ascii") + b"\n",
               name="hostile")
    error = assert_error(r, 422, "file", "line 1", words)
    assert "\\ud8" in error["message"] or "\\udf" in error["message"] or "nested" in words
    assert sorted(p.relative_to(retrieval_data) for p in retrieval_data.rglob("*")) == before


def test_tsv_uploads_name_the_file(retrieval, worker):
    """A headerless TSV upload (a job's, a corpus's) names ``file`` (it said ``corpus``, a field
    the endpoint does not have); TSV text cannot hold a lone surrogate (its UTF-8 form is refused)."""
    r = upload(worker.url + "/v1/jobs/upload", "q.tsv", b"CCO\tCCO\n", task="mol2cap")
    assert_error(r, 422, "file", "lacks column")
    r = upload(retrieval.url + "/v1/corpora", "c.tsv", b"CCO\tCCO\n", name="headless")
    assert_error(r, 422, "file", "lacks column")  # the corpus upload's file too
    surrogate_bytes = "\ud800".encode("utf-8", "surrogatepass")
    tsv = b"CID\tSMILES\tdescription\n1\tCCO\tan " + surrogate_bytes + b"\n"
    assert_error(upload(worker.url + "/v1/jobs/upload", "q.tsv", tsv, task="mol2cap"),
                 422, "file", "not UTF-8")
    assert_error(upload(retrieval.url + "/v1/corpora", "c.tsv", tsv, name="hostile"),
                 422, "file", "not UTF-8")
    long = b"CID\tSMILES\tdescription\n1\tCCO\tok\n2\tCCO\t" + b"d" * 8193 + b"\n"
    assert_error(upload(worker.url + "/v1/jobs/upload", "q.tsv", long, task="cap2mol"),
                 422, "file", "line 3: input longer than 8192 characters")


# --- deep nesting in request bodies --------------------------------------------------------------

@pytest.mark.parametrize("service,path", [("retrieval", "/v1/retrieve/molecules"),
                                          ("retrieval", "/v1/retrieve/captions"),
                                          ("worker", "/mol2cap"), ("worker", "/v1/jobs")])
def test_deeply_nested_bodies_are_a_400(retrieval, worker, service, path):
    url = (retrieval if service == "retrieval" else worker).url + path
    for depth in (100_000, 1000, MAX_DEPTH + 1):
        body = b"[" * depth + b"]" * depth
        r = httpx.post(url, content=body, headers={**KEY, "content-type": "application/json"},
                       timeout=30)
        assert_error(r, 400, "body", "nested deeper than 32 levels")
        r = httpx.post(url, content=b'{"smiles": ' + body + b', "caption": "x"}',
                       headers={**KEY, "content-type": "application/json"}, timeout=30)
        assert_error(r, 400, "body", "nested deeper than 32 levels")
    nan = httpx.post(url, content=b'{"smiles": "CCO", "k": NaN}', timeout=30,
                     headers={**KEY, "content-type": "application/json"})
    assert_error(nan, 422, "k", "not a finite number")


def test_deep_nesting_in_an_uploaded_jobs_options(worker):
    deep = '{"retrieval": ' * 40 + "{}" + "}" * 40
    r = upload(worker.url + "/v1/jobs/upload", "q.jsonl", b'"CCO"\n', task="mol2cap",
               options=deep)
    assert_error(r, 422, "options", "nested deeper than 32")


# --- strict types ----------------------------------------------------------------------------------

LAX = [
    ("retrieval", "/v1/retrieve/molecules", {"smiles": "CCO", "k": "2"}, "k"),
    ("retrieval", "/v1/retrieve/molecules", {"smiles": "CCO", "k": True}, "k"),
    ("retrieval", "/v1/retrieve/molecules", {"smiles": "CCO", "k": 2.0}, "k"),
    ("retrieval", "/v1/retrieve/molecules",
     {"smiles": "CCO", "exclude_same_structure": "yes"}, "exclude_same_structure"),
    ("retrieval", "/v1/retrieve/molecules", {"smiles": "CCO", "corpus": ""}, "corpus"),
    ("retrieval", "/v1/retrieve/captions",
     {"caption": "an acid", "random_walk": {"skip_probability": "0.2"}},
     "random_walk.skip_probability"),
    ("retrieval", "/v1/retrieve/captions", {"caption": "an acid", "corpus": "a b"}, "corpus"),
    ("worker", "/mol2cap", {"smiles": "CCO", "generation": {"top_k": 40.0}}, "generation.top_k"),
    ("worker", "/mol2cap", {"smiles": "CCO", "generation": {"top_k": 2**40}},
     "generation.top_k"),
    ("worker", "/mol2cap", {"smiles": "CCO", "n_shot": "2"}, "n_shot"),
    ("worker", "/mol2cap", {"smiles": "CCO", "return_prompt": 1}, "return_prompt"),
    ("worker", "/mol2cap", {"smiles": "CCO", "retrieval": {"exclude_same_structure": "yes"}},
     "retrieval.exclude_same_structure"),
    ("worker", "/mol2cap", {"smiles": "CCO", "retrieval": {"corpus": ""}}, "retrieval.corpus"),
    ("worker", "/mol2cap", {"smiles": "CCO", "adapter": ""}, "adapter"),
    ("worker", "/cap2mol", {"caption": "an acid", "generation": {"temperature": "0.7"}},
     "generation.temperature"),
    ("worker", "/cap2mol", {"caption": "an acid", "generation": {"repetition_penalty": 1e-300}},
     "generation.repetition_penalty"),
    ("worker", "/v1/jobs", {"task": "mol2cap", "items": ["CCO"], "options": {"n_shot": "2"}},
     "options.n_shot"),
    ("worker", "/v1/jobs", {"task": "mol2cap", "items": ["CCO"], "options": {"n_shot": 99}},
     "options.n_shot"),
    ("worker", "/v1/jobs", {"task": "mol2cap", "items": ["CCO"],
                            "options": {"retrieval": {"corpus": ""}}},
     "options.retrieval.corpus"),
    ("worker", "/v1/jobs", {"task": "mol2cap", "items": ["CCO"], "options": {"adapter": ""}},
     "options.adapter"),
    ("worker", "/v1/jobs", {"kind": "tune", "task": "mol2cap",
                            "options": {"name": "t", "max_steps": "1"}}, "options.max_steps"),
]


@pytest.mark.parametrize("service,path,body,field", LAX,
                         ids=[f"{p} {json.dumps(b)[:60]}" for _, p, b, _ in LAX])
def test_values_that_were_coerced_are_a_422_naming_the_field(retrieval, worker, service, path,
                                                               body, field):
    url = (retrieval if service == "retrieval" else worker).url
    assert_error(post_json(url + path, body), 422, field)


def test_an_uploaded_jobs_option_errors_name_the_option(worker):
    for options, field in [('{"n_shot": 99}', "options.n_shot"),
                           ('{"n_shot": "2"}', "options.n_shot"),
                           ('{"generation": {"top_k": 1e30}}', "options.generation.top_k"),
                           ('{"retrieval": {"corpus": ""}}', "options.retrieval.corpus"),
                           ('{"n_shot": 1', "options"), ("[]", "options")]:
        r = upload(worker.url + "/v1/jobs/upload", "q.jsonl", b'"CCO"\n', task="mol2cap",
                   options=options)
        assert_error(r, 422, field)


# --- job item length limits ------------------------------------------------------------------------

def test_over_long_job_items_are_a_422_naming_the_item(worker):
    jobs = worker.url + "/v1/jobs"
    assert_error(post_json(jobs, {"task": "mol2cap", "items": ["CCO", "C" * 4097]}), 422,
                 "items[1]", "longer than 4096 characters")
    assert_error(post_json(jobs, {"task": "mol2cap", "items": [{"input": "C" * 4097}]}), 422,
                 "items[0].input", "longer than 4096")
    assert_error(post_json(jobs, {"task": "cap2mol", "items": ["x" * 8193]}), 422,
                 "items[0]", "longer than 8192")
    assert_error(post_json(jobs, {"task": "mol2cap",
                                  "items": [{"input": "CCO", "reference": "r" * 8193}]}),
                 422, "items[0].reference", "longer than 8192")
    assert_error(post_json(jobs, {"task": "cap2mol",
                                  "items": [{"input": "an acid", "reference": "C" * 4097}]}),
                 422, "items[0].reference", "longer than 4096")
    # The limit is the task's query limit, exactly.
    ok = post_json(jobs, {"task": "cap2mol", "items": ["The molecule is " + "x" * 8176]})
    assert ok.status_code == 202, ok.text
    httpx.delete(f"{jobs}/{ok.json()['id']}", headers=KEY)


# --- numbers that overflow sampling -----------------------------------------------------------------

def test_a_vanishing_temperature_decodes_greedily(tiny_worker):
    base = {"smiles": "CCO", "n_shot": 1, "generation": {"max_new_tokens": 8}}
    greedy = post_json(tiny_worker.url + "/mol2cap",
                       {**base, "generation": {"max_new_tokens": 8, "decoding": "greedy"}})
    assert greedy.status_code == 200, greedy.text
    for t in (1e-300, 1e-40, 0.0099):
        cold = post_json(tiny_worker.url + "/mol2cap",
                         {**base, "generation": {"max_new_tokens": 8, "temperature": t}},
                         timeout=60)
        assert cold.status_code == 200, cold.text
        assert cold.json()["caption"] == greedy.json()["caption"]


def test_a_job_with_a_vanishing_temperature_has_results_for_every_item(tiny_worker):
    items = ["CCO", "CCN", "c1ccccc1", "CC(=O)O", "not a smiles", "CCCl"]
    r = post_json(tiny_worker.url + "/v1/jobs", {
        "task": "mol2cap", "items": items,
        "options": {"n_shot": 1, "generation": {"temperature": 1e-300, "max_new_tokens": 4}}})
    assert r.status_code == 202, r.text
    job = wait_job(tiny_worker.url, r.json()["id"])
    assert (job["state"], job["done"], job["failed"]) == ("succeeded", 6, 1), job
    lines = results(tiny_worker.url, job)
    assert [x["error"] is None for x in lines] == [True] * 4 + [False, True]
    assert lines[4]["error"]["field"] == "smiles"


class FailingOn:
    """An engine that fails (as a bug would) on prompts holding ``marker``."""

    def __init__(self, engine, marker: str):
        self.engine, self.marker = engine, marker

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, inputs, params, adapter=None):
        if any(self.marker in x.prompt for x in inputs):
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return self.engine.generate(inputs, params, adapter=adapter)


def test_an_engine_failure_on_one_item_is_that_items_error(retrieval, tmp_path, caplog):
    settings = _worker_settings(tmp_path, retrieval.url, engine="nearest-neighbour",
                                job_batch_size=8)
    # (the prompt's last line holds the query: "... for the molecule: C1CC1. ")
    engine = FailingOn(load_engine("nearest-neighbour", settings=settings), "molecule: C1CC1.")
    items = ["CCO", "CCN", "C1CC1", "CCCl", "CC(=O)O"]
    with LiveServer(worker_app(settings, engine_loader=lambda: engine)) as w:
        w.wait_ready()
        caplog.set_level(logging.WARNING)
        r = post_json(w.url + "/v1/jobs", {"task": "mol2cap", "items": items,
                                          "options": {"n_shot": 1}})
        job = wait_job(w.url, r.json()["id"])
        lines = results(w.url, job)
    assert (job["state"], job["done"], job["failed"]) == ("succeeded", 5, 1), job
    assert [x["error"] is None for x in lines] == [True, True, False, True, True]
    assert lines[2]["error"] == {"code": "internal", "field": None,
                                 "message": "internal error (the worker's log has the details)"}
    assert all(x["prediction"] for i, x in enumerate(lines) if i != 2)
    tracebacks = [rec for rec in caplog.records if rec.exc_info]
    assert len(tracebacks) == 1 and tracebacks[0].exc_info[0] is RuntimeError


# --- the log --------------------------------------------------------------------------------------

def test_bad_requests_log_one_line_each_and_no_traceback(retrieval, tmp_path):
    """A client error is uvicorn's access line and nothing else (a 19-byte body with a lone
    surrogate once wrote 9 KB of tracebacks)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "worker.log"
    env = {**os.environ, "ICMA_DATA_DIR": str(tmp_path), "ICMA_ENGINE": "nearest-neighbour",
           "ICMA_JOBS_DB": str(tmp_path / "jobs.sqlite3"), "ICMA_API_KEY": "k",
           "ICMA_PROGRESS": "false"}
    proc = spawn_service(["worker", "--port", str(port), "--retrieval-url", retrieval.url,
                          "--log-level", "info"], url, env=env, cwd=REPO, log=log,
                         timeout=120, interval=0.1)
    try:
        start = log.stat().st_size
        json_type = {**KEY, "content-type": "application/json"}
        sent = [
            post_json(url + "/mol2cap", {"smiles": LONE}),
            httpx.post(url + "/mol2cap", content=b'{"smiles":"\\ud800"}', headers=json_type),
            httpx.post(url + "/mol2cap", content=b"[" * 100_000, headers=json_type),
            httpx.post(url + "/mol2cap", content=b"{oops", headers=json_type),
            post_json(url + "/mol2cap", {"smiles": "CCO", "generation": {"top_k": 1e30}}),
            post_json(url + "/v1/jobs", {"task": "mol2cap", "items": [LONE]}),
            upload(url + "/v1/jobs/upload", "q.jsonl", b"[" * 1000 + b"\n", task="mol2cap"),
            upload(url + "/v1/jobs/upload", "q.tsv", b"CCO\tCCO\n", task="mol2cap"),
            httpx.post(url + "/mol2cap", headers=json_type,
                       content=(b"x" * 65536 for _ in range(40))),  # chunked, over the limit
            httpx.post(url + "/mol2cap", json={"smiles": "CCO"}),  # no key
        ]
        assert [r.status_code for r in sent] == [422, 422, 400, 400, 422, 422, 422, 422, 413,
                                                 401], [r.text for r in sent]
        time.sleep(0.5)  # (the access lines are written after the responses)
    finally:
        stop_services([proc])
    lines = [x for x in log.read_bytes()[start:].decode().splitlines()
             if "/readyz" not in x and "/healthz" not in x]
    stopping = [i for i, x in enumerate(lines) if "Shutting down" in x]
    during = lines[:stopping[0]] if stopping else lines
    assert "Traceback" not in "\n".join(lines), "\n".join(lines)
    assert len(during) == len(sent), "\n".join(during)  # one access line each, nothing else
    assert all(len(x) < 200 for x in during)


def test_a_server_error_logs_its_traceback_once(retrieval, tmp_path, caplog):
    """A genuine bug still logs its traceback, once (Starlette re-raised it after the 500 and
    uvicorn logged it a second time)."""
    app = worker_app(_worker_settings(tmp_path, retrieval.url, engine="nearest-neighbour"))

    @app.get("/boom")
    def boom():
        raise ZeroDivisionError("a bug")

    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    uvicorn_log = logging.getLogger("uvicorn")
    with LiveServer(app) as w:
        uvicorn_log.addHandler(handler)
        caplog.set_level(logging.ERROR)
        try:
            r = httpx.get(w.url + "/boom", timeout=10)
            time.sleep(0.3)
        finally:
            uvicorn_log.removeHandler(handler)
    assert r.status_code == 500 and r.json()["error"]["message"] == "internal error"
    records = {id(x): x for x in [*seen, *caplog.records]}.values()
    tracebacks = [x for x in records if x.exc_info]
    assert len(tracebacks) == 1 and tracebacks[0].exc_info[0] is ZeroDivisionError


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
