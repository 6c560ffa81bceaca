"""The services against a hostile client, over real HTTP: tune jobs name data, never server
paths; work needs a key (or the operator's explicit setting); the CORS policy and the
cross-site request defence; no internal path in any response; `icma serve` refuses to listen
beyond loopback without a key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from icma.core.corpus import write_corpus
from icma.core.settings import Settings
from icma.services.retrieval.app import create_app as retrieval_app
from icma.workers.translator.app import create_app as worker_app
from tests.conftest import REPO
from tests.service_helpers import LiveServer

KEY = {"authorization": "Bearer k"}
PAGE = "http://page.example"
EVIL = "http://evil.example"


def worker_settings(tmp: Path, **kw) -> Settings:
    # The retrieval URL points nowhere: nothing here translates.
    return Settings(data_dir=tmp, retrieval_url="http://127.0.0.1:9", jobs_db=tmp / "jobs.db",
                    adapters_dir=tmp / "adapters", models_dir=tmp / "models",
                    engine="nearest-neighbour", progress=False, **kw)


def stock(data: Path, corpus, model: Path) -> Path:
    """``data`` as a worker's data directory holding a small corpus named ``small`` (as the
    retrieval service stores uploads) and a model folder ``tiny`` in the models directory: a
    tune job that does start is over in seconds."""
    (data / "corpora").mkdir(parents=True)
    write_corpus(corpus.subset(range(8)), data / "corpora" / "small.tsv")
    (data / "models").mkdir()
    os.symlink(model, data / "models" / "tiny")
    return data


@pytest.fixture(scope="module")
def worker(tmp_path_factory, chebi_val, tiny_model):
    """A worker with an API key and one allowed browser origin. ``outside`` is a perfectly
    valid corpus file outside its data directory: a path it must not read however good."""
    root = tmp_path_factory.mktemp("security")
    outside = root / "elsewhere" / "valid.tsv"
    outside.parent.mkdir()
    write_corpus(chebi_val.subset(range(8)), outside)
    data = stock(root / "data", chebi_val, tiny_model)
    with LiveServer(worker_app(worker_settings(data, api_key="k",
                                               cors_origins=[PAGE]))) as w:
        w.data, w.outside = data, outside
        yield w


def tune(worker, headers=KEY, **options):
    body = {"kind": "tune", "task": "mol2cap",
            "options": {"name": "t", "max_steps": 1, **options}}
    return httpx.post(worker.url + "/v1/jobs", json=body, headers=headers, timeout=30)


def error(r, status: int, field: str) -> str:
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field, r.json()
    return r.json()["error"]["message"]


PATHS = ["/etc/passwd", "/root/.ssh/id_rsa", "/nonexistent", "../../../../etc/passwd",
         "~", "~/.bashrc", "/etc/passwd\n", "embedded\n", "small\n", "corpora/small.tsv",
         "./small.tsv"]


@pytest.mark.parametrize("field", ["train", "contexts", "eval"])
def test_tune_jobs_never_read_a_path(worker, field):
    messages = set()
    for value in [*PATHS, str(worker.outside), str(worker.data / "corpora" / "small.tsv")]:
        r = tune(worker, **{field: value})
        messages.add(error(r, 422, f"options.{field}"))
        body = r.text
        assert str(worker.data.parent) not in body and "/etc" not in body and "passwd" not in body
        assert "id_rsa" not in body and os.path.expanduser("~") not in body
    # One message whatever the path: it cannot tell whether a file exists.
    assert len(messages) == 1, messages
    assert httpx.get(worker.url + "/v1/jobs", headers=KEY).json()["jobs"] == []


def test_tune_job_base_model_is_the_default_or_a_models_folder(worker, tiny_model):
    messages = set()
    for value in ["/root", "/nonexistent", "~", "~/", "..", "../models/tiny", str(tiny_model),
                  "gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "tiny\n", "models/tiny"]:
        r = tune(worker, base_model=value, train="small")
        message = error(r, 422, "options.base_model")
        assert str(tiny_model) not in r.text and os.path.expanduser("~") not in r.text
        messages.add(message)
    assert len(messages) == 1, messages
    assert "ICMA_ALLOW_MODEL_DOWNLOADS" in messages.pop()
    # A folder of the models directory, by name, and a corpus the service holds, by name.
    r = tune(worker, base_model="tiny", train="small", name="allowed")
    assert r.status_code == 202, r.text
    assert r.json()["options"]["train"] == "small"
    httpx.delete(f"{worker.url}/v1/jobs/{r.json()['id']}", headers=KEY)
    r = tune(worker, train="no-such-corpus")
    assert "no corpus named 'no-such-corpus'" in error(r, 422, "options.train")


def test_hub_ids_only_with_downloads_allowed(tmp_path):
    from icma.core.errors import InputError
    from icma.generation.models import resolve_model
    from icma.tuning.sources import Sources

    closed = Sources.for_job(tmp_path, tmp_path, tmp_path / "models", allow_downloads=False)
    opened = Sources.for_job(tmp_path, tmp_path, tmp_path / "models", allow_downloads=True)
    with pytest.raises(InputError) as e:
        closed.base_model("HuggingFaceTB/SmolLM2-135M")
    assert e.value.field == "base_model"
    assert opened.base_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(InputError):
        opened.base_model("/etc")  # downloads allowed, paths still not
    # The worker's own model setting: a hub id is an error, not a download attempt.
    with pytest.raises(InputError) as e:
        resolve_model("gpt2", tmp_path)
    assert "ICMA_ALLOW_MODEL_DOWNLOADS" in e.value.message
    assert resolve_model("gpt2", tmp_path, allow_downloads=True) == "gpt2"


def test_tune_job_with_uploaded_corpora(worker):
    tsv = worker.outside.read_bytes()
    r = httpx.post(worker.url + "/v1/jobs/upload", headers=KEY, timeout=30,
                   data={"kind": "tune", "task": "mol2cap",
                         "options": json.dumps({"name": "up", "base_model": "tiny",
                                                "max_steps": 1})},
                   files={"train": ("mine.tsv", tsv), "eval": ("test.tsv", tsv)})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "tune" and job["options"]["train"] == "@upload"
    assert job["options"]["eval"] == "@upload"
    folder = worker.data / "tuning" / ".uploads" / job["id"]
    assert sorted(p.name for p in folder.iterdir()) == ["eval.tsv", "train.tsv"]
    assert str(worker.data) not in r.text
    httpx.delete(f"{worker.url}/v1/jobs/{job['id']}", headers=KEY)
    deadline = time.monotonic() + 60
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not folder.exists()  # removed once the job ended
    # A bad file is refused when submitted, under its own field; nothing is kept.
    r = httpx.post(worker.url + "/v1/jobs/upload", headers=KEY,
                   data={"kind": "tune", "task": "mol2cap", "options": '{"name": "bad"}'},
                   files={"train": ("x.tsv", b"root:x:0:0:root:/root:/bin/bash\n")})
    error(r, 422, "train")
    # Given twice, or "@upload" in a JSON job (no file): refused.
    r = httpx.post(worker.url + "/v1/jobs/upload", headers=KEY,
                   data={"kind": "tune", "task": "mol2cap",
                         "options": '{"name": "two", "train": "small"}'},
                   files={"train": ("x.tsv", tsv)})
    error(r, 422, "options.train")
    error(tune(worker, train="@upload"), 422, "options.train")
    assert [p.name for p in (worker.data / "tuning" / ".uploads").iterdir()] == []


def test_work_needs_a_key_or_the_operator_setting(tmp_path, chebi_val, tiny_model):
    tsv = tmp_path / "c.tsv"
    write_corpus(chebi_val.subset(range(8)), tsv)
    for allow in (False, True):
        data = stock(tmp_path / f"w{allow}", chebi_val, tiny_model)
        with LiveServer(worker_app(worker_settings(data, allow_work_without_key=allow))) as w:
            r = tune(w, headers={}, train="small", base_model="tiny", name=f"n{int(allow)}")
            up = httpx.post(w.url + "/v1/jobs/upload", timeout=30,
                            data={"kind": "tune", "task": "mol2cap",
                                  "options": '{"name": "u", "base_model": "tiny", '
                                             '"max_steps": 1}'},
                            files={"train": ("c.tsv", tsv.read_bytes())})
            if allow:
                assert r.status_code == 202 and up.status_code == 202, (r.text, up.text)
                for job in (r.json(), up.json()):
                    httpx.delete(f"{w.url}/v1/jobs/{job['id']}")
            else:
                for resp in (r, up):
                    message = error(resp, 403, "authorization")
                    assert "ICMA_API_KEY" in message and "ICMA_ALLOW_WORK_WITHOUT_KEY" in message
                assert httpx.get(w.url + "/v1/jobs").json()["jobs"] == []
            # Translation jobs stay open without a key.
            t = httpx.post(w.url + "/v1/jobs", json={"task": "mol2cap", "items": ["CCO"]})
            assert t.status_code == 202, t.text
    for allow in (False, True):
        # 'random' only: no index to build for the embedded corpus.
        settings = Settings(data_dir=tmp_path / f"r{allow}", retrieval_kinds=["random"],
                            allow_work_without_key=allow)
        with LiveServer(retrieval_app(settings)) as s:
            r = httpx.post(s.url + "/v1/corpora", data={"name": "mine"},
                           files={"file": ("c.tsv", tsv.read_bytes())}, timeout=60)
            if allow:
                assert r.status_code == 202, r.text
            else:
                assert "ICMA_ALLOW_WORK_WITHOUT_KEY" in error(r, 403, "authorization")


def test_cors_policy(worker):
    pre = {"access-control-request-method": "POST",
           "access-control-request-headers": "authorization, content-type"}
    ok = httpx.options(worker.url + "/v1/jobs", headers={"origin": PAGE, **pre})
    assert ok.status_code == 204
    assert ok.headers["access-control-allow-origin"] == PAGE
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "authorization" in ok.headers["access-control-allow-headers"]
    bad = httpx.options(worker.url + "/v1/jobs", headers={"origin": EVIL, **pre})
    assert bad.status_code == 403 and "access-control-allow-origin" not in bad.headers
    # Simple requests: headers for the allowed page only.
    got = httpx.get(worker.url + "/v1/jobs", headers={"origin": PAGE, **KEY})
    assert got.status_code == 200 and got.headers["access-control-allow-origin"] == PAGE
    got = httpx.get(worker.url + "/v1/jobs", headers={"origin": EVIL, **KEY})
    assert got.status_code == 200 and "access-control-allow-origin" not in got.headers


def test_cross_site_posts_are_refused(tmp_path):
    """The reported attack: a page elsewhere submits a multipart form to a worker without a
    key. No preflight is needed for that, so the server itself must refuse it."""
    with LiveServer(worker_app(worker_settings(tmp_path, allow_work_without_key=True))) as w:
        form = {"data": {"task": "mol2cap"}, "files": {"file": ("q.jsonl", b'"CCO"\n')}}
        for origin in (EVIL, "null", f"https://127.0.0.1:{w.port}", "http://127.0.0.1:1"):
            r = httpx.post(w.url + "/v1/jobs/upload", headers={"origin": origin}, **form)
            assert "cross-site" in error(r, 403, "origin"), origin
            assert "access-control-allow-origin" not in r.headers
        r = httpx.delete(w.url + "/v1/jobs/x", headers={"origin": EVIL})
        error(r, 403, "origin")
        assert httpx.get(w.url + "/v1/jobs").json()["jobs"] == []  # nothing queued
        # The page's own origin, and clients that send none (curl, the worker's httpx).
        same = httpx.post(w.url + "/v1/jobs/upload", headers={"origin": w.url}, **form)
        assert same.status_code == 202, same.text
        assert httpx.post(w.url + "/v1/jobs/upload", **form).status_code == 202
    with LiveServer(retrieval_app(Settings(data_dir=tmp_path / "r", retrieval_kinds=["random"],
                                           allow_work_without_key=True))) as s:
        r = httpx.post(s.url + "/v1/corpora", data={"name": "x"}, headers={"origin": EVIL},
                       files={"file": ("c.tsv", b"CID\tSMILES\tdescription\n1\tCCO\tethanol\n")})
        error(r, 403, "origin")
        assert [c["name"] for c in httpx.get(s.url + "/v1/corpora").json()["corpora"]] == \
            ["chebi20-embedded"]


def test_no_internal_path_in_responses(worker, tiny_model):
    adapters = worker.data / "adapters"
    (adapters / "lora1").mkdir(parents=True, exist_ok=True)
    (adapters / "lora1" / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": str(tiny_model), "r": 4, "lora_alpha": 8,
         "target_modules": ["q_proj"]}))
    hidden = str(worker.data.parent)
    r = httpx.get(worker.url + "/v1/adapters", headers=KEY)
    assert r.status_code == 200 and hidden not in r.text and "directory" not in r.json()
    assert r.json()["adapters"][0]["base_model"] == Path(tiny_model).name
    r = httpx.post(worker.url + "/mol2cap", headers=KEY,
                   json={"smiles": "CCO", "adapter": "nope"})
    error(r, 404, "adapter")
    assert hidden not in r.text and "lora1" in r.text
    # A name taken by an adapter: the tune job's conflict, and the run's own check.
    r = tune(worker, name="lora1", train="small", base_model="tiny")
    error(r, 409, "options.name")
    assert hidden not in r.text


def test_run_conflict_and_job_messages_show_no_folder(tmp_path):
    from icma.core.errors import InputError, public_message
    from icma.tuning import parse_config, tune as run

    (tmp_path / "adapters" / "taken").mkdir(parents=True)
    with pytest.raises(InputError) as e:
        run(parse_config({"task": "mol2cap", "name": "taken"}),
            settings=Settings(data_dir=tmp_path), adapters_dir=tmp_path / "adapters")
    assert str(tmp_path) not in str(e.value) and "'taken'" in str(e.value)
    text = f"{tmp_path}/tuning/x/checkpoints holds checkpoints; {Path.home()}/.cache/y"
    out = public_message(text, {"<data_dir>": tmp_path})
    assert out == "<data_dir>/tuning/x/checkpoints holds checkpoints; ~/.cache/y"


def test_bearer_scheme_is_case_insensitive_and_spaces_are_allowed(worker):
    for header in ("bearer k", "BEARER k", "Bearer    k", "bearer \t k"):
        r = httpx.get(worker.url + "/v1/jobs", headers={"authorization": header})
        assert r.status_code == 200, (header, r.text)
    assert httpx.get(worker.url + "/v1/jobs",
                     headers={"authorization": "bearer kk"}).status_code == 401


def _serve(args: list[str], **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ICMA_")}
    return subprocess.run([sys.executable, "-m", "icma", "serve", *args], cwd=REPO,
                          env={**clean, **env}, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("service", ["retrieval", "worker", "all"])
def test_serve_refuses_a_public_address_without_a_key(service, tmp_path):
    t0 = time.monotonic()
    run = _serve([service, "--host", "0.0.0.0", "--port", "0"], ICMA_DATA_DIR=str(tmp_path))
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("icma: error: --host: 0.0.0.0"), run.stderr
    assert "ICMA_API_KEY" in lines[0] and "ICMA_ALLOW_REMOTE_WITHOUT_KEY" in lines[0]
    assert time.monotonic() - t0 < 60
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


def test_serve_worker_refuses_a_hub_model_without_downloads(tmp_path):
    run = _serve(["worker", "--port", "0"], ICMA_DATA_DIR=str(tmp_path), ICMA_LLM_MODEL="gpt2")
    assert run.returncode == 2 and "ICMA_ALLOW_MODEL_DOWNLOADS" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


# --- path traversal in every name-like field ------------------------------------------------

TRAVERSALS = ["../../../../etc/passwd", "/etc/passwd", "..", ".", "~", "a/../../b", "a\\b",
              "x\n", "%2e%2e%2fetc", ""]


@pytest.fixture(scope="module")
def retrieval_keyed(svc_dir):
    from tests.conftest import SERVICE_KINDS

    with LiveServer(retrieval_app(Settings(data_dir=svc_dir, retrieval_kinds=SERVICE_KINDS,
                                           api_key="k"))) as s:
        s.wait_ready()
        yield s


def _bodies(name: str):
    caption = "The molecule is an alpha-amino acid."
    yield "worker", "/mol2cap", {"smiles": "CCO", "retrieval": {"corpus": name}}, \
        "retrieval.corpus"
    yield "worker", "/cap2mol", {"caption": caption, "retrieval": {"corpus": name}}, \
        "retrieval.corpus"
    yield "worker", "/mol2cap", {"smiles": "CCO", "adapter": name}, "adapter"
    yield "worker", "/v1/jobs", {"task": "mol2cap", "items": ["CCO"],
                                 "options": {"adapter": name}}, "options.adapter"
    yield "worker", "/v1/jobs", {"task": "cap2mol", "items": [caption],
                                 "options": {"retrieval": {"corpus": name}}}, \
        "options.retrieval.corpus"
    yield "worker", "/v1/jobs", {"kind": "tune", "task": "mol2cap",
                                 "options": {"name": name, "max_steps": 1}}, "options.name"
    yield "retrieval", "/v1/retrieve/molecules", {"smiles": "CCO", "corpus": name}, "corpus"
    yield "retrieval", "/v1/retrieve/captions", {"caption": caption, "corpus": name}, "corpus"


@pytest.mark.parametrize("name", TRAVERSALS)
def test_no_name_like_field_leaves_its_folder(worker, retrieval_keyed, name):
    """Every field that names something the server keeps as a file, with traversal, absolute
    paths, a trailing newline or nothing: a 4xx naming that field, whose message shows no
    server path; job ids in the URL likewise."""
    servers = {"worker": worker, "retrieval": retrieval_keyed}
    for server, path, body, field in _bodies(name):
        r = httpx.post(servers[server].url + path, json=body, headers=KEY, timeout=30)
        assert r.status_code == 422, (path, field, r.status_code, r.text)
        assert r.json()["error"]["field"] == field, (path, r.json())
        assert str(worker.data) not in r.text and "root:" not in r.text
    r = httpx.post(retrieval_keyed.url + "/v1/corpora", headers=KEY, timeout=30,
                   data={"name": name}, files={"file": ("c.tsv", b"CID\tSMILES\tdescription\n"
                                                                 b"1\tCCO\tThe molecule is x.\n")})
    assert r.status_code == 422 and r.json()["error"]["field"] == "name", r.text
    job = quote(name, safe="")
    for method, url in [("GET", f"/v1/jobs/{job}"), ("GET", f"/v1/jobs/{job}/results"),
                        ("DELETE", f"/v1/jobs/{job}")]:
        r = httpx.request(method, worker.url + url, headers=KEY, timeout=30)
        # ("", "." and ".." leave no job id in the URL: those reach other routes)
        lowest = 200 if name in ("", ".", "..") else 400
        assert lowest <= r.status_code < 500 and "root:" not in r.text, (url, r.status_code)
        assert str(worker.data) not in r.text
