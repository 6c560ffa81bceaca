"""Tune jobs through the worker over real HTTP: progress, the adapter registered and served
without a restart, cancellation, a killed training process resumed, and bad options."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from icma.core.corpus import write_corpus
from icma.generation.engines import load_engine
from icma.core.settings import Settings
from icma.services.retrieval.app import create_app as retrieval_app
from tests.conftest import SERVICE_KINDS
from tests.service_helpers import LiveServer
from icma.workers.translator.app import create_app as worker_app

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"


@pytest.fixture(scope="module")
def retrieval(svc_dir):
    with LiveServer(retrieval_app(Settings(data_dir=svc_dir, retrieval_kinds=SERVICE_KINDS))) as s:
        s.wait_ready()
        yield s


@pytest.fixture(scope="module")
def worker_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tune-worker")


@pytest.fixture(scope="module")
def train32(chebi_val, worker_dir) -> str:
    """A corpus of 32 pairs the retrieval service holds (stored as the service stores an
    upload, in the data directory the worker shares with it): tune jobs name it."""
    path = worker_dir / "corpora" / "train32.tsv"
    path.parent.mkdir()
    write_corpus(chebi_val.subset(range(32), name="train32"), path)
    return "train32"


@pytest.fixture(scope="module")
def worker(retrieval, tiny_learner, worker_dir):
    """The worker serving the tiny model, which its tune jobs also tune (from its models
    directory, by name). Tune jobs without an API key: the operator's setting."""
    tmp = worker_dir
    settings = Settings(data_dir=tmp, retrieval_url=retrieval.url, jobs_db=tmp / "jobs.sqlite3",
                        adapters_dir=tmp / "adapters", models_dir=tiny_learner.parent,
                        progress=False, max_jobs=4, allow_work_without_key=True)
    engine = load_engine("transformers", settings=settings, model=str(tiny_learner), device="cpu")
    with LiveServer(worker_app(settings, engine_loader=lambda: engine)) as w:
        w.wait_ready()
        w.app = w.server.config.app
        yield w


def options(base: Path, train32: str, name: str, **kw) -> dict:
    return {"name": name, "base_model": base.name, "train": train32,
            "retrieval": "morgan", "n_shot": 2, "cutoff": 512, "lora_r": 8, "lora_alpha": 16,
            "learning_rate": 2e-2, "warmup_steps": 0, "max_steps": 12, "batch_size": 8,
            "grad_accum": 1, "save_steps": 4, **kw}


def wait_for(worker, job_id: str, states=("succeeded", "failed", "cancelled"),
              timeout: float = 300, until=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{worker.url}/v1/jobs/{job_id}", timeout=10).json()
        if job["state"] in states or (until and until(job)):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['state']}: {job}")


def test_tune_job_registers_an_adapter_the_worker_serves_at_once(worker, tiny_learner, train32):
    r = httpx.post(worker.url + "/v1/jobs", timeout=30, json={
        "kind": "tune", "task": "mol2cap", "options": options(tiny_learner, train32, "job-icmt")})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "tune" and job["results_url"] is None
    seen = wait_for(worker, job["id"], until=lambda j: (j["tuning"] or {}).get("phase")
                    == "training" or j["state"] != "queued" and j["state"] != "running")
    if seen["state"] == "running":
        t = seen["tuning"]
        assert t["total_steps"] == 12 and 1 <= t["step"] <= 12 and t["loss"] > 0
        assert seen["total"] == 12
    done = wait_for(worker, job["id"])
    assert done["state"] == "succeeded", done
    assert done["tuning"]["adapter"] == "job-icmt" and done["tuning"]["steps"] == 12
    assert done["done"] == done["total"] == 12 and done["progress"] == 1.0
    # The loss curve the page draws: [step, loss] up to the last step, ending at the final loss.
    curve = done["tuning"]["curve"]
    steps = [p[0] for p in curve]
    assert steps == sorted(set(steps)) and steps[-1] == 12 and len(curve) >= 2
    assert curve[-1][1] == pytest.approx(done["tuning"]["final_loss"], abs=1e-4)
    listed = {a["name"]: a for a in httpx.get(worker.url + "/v1/adapters").json()["adapters"]}
    assert listed["job-icmt"]["task"] == "mol2cap" and listed["job-icmt"]["prime_answer"] is True
    # Served by name right away, with the prompt form it was tuned on.
    body = {"smiles": ASPIRIN, "generation": {"decoding": "greedy", "max_new_tokens": 8}}
    base = httpx.post(worker.url + "/mol2cap", json=body, timeout=60).json()
    tuned = httpx.post(worker.url + "/mol2cap", json={**body, "adapter": "job-icmt"},
                       timeout=60)
    assert tuned.status_code == 200, tuned.text
    assert tuned.json()["adapter"] == "job-icmt" and tuned.json()["prime_answer"] is True
    assert tuned.json()["caption"] != base["caption"]
    # It was tuned for mol2cap: cap2mol refuses it.
    r = httpx.post(worker.url + "/cap2mol", json={"caption": "The molecule is an acid.",
                                                  "adapter": "job-icmt"}, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["field"] == "adapter"
    r = httpx.get(f"{worker.url}/v1/jobs/{job['id']}/results")
    assert r.status_code == 409
    # The name is taken.
    r = httpx.post(worker.url + "/v1/jobs", json={
        "kind": "tune", "task": "mol2cap", "options": options(tiny_learner, train32, "job-icmt")})
    assert r.status_code == 409 and r.json()["error"]["field"] == "options.name"


@pytest.mark.parametrize("change,field", [
    ({"lora_r": 0}, "options.lora_r"),
    ({"learning_rat": 1e-3}, "options.learning_rat"),
    ({"retrieval": "bm25"}, "options.retrieval"),
    ({"base_model": "/no/such/model"}, "options.base_model"),
    ({"base_model": "no-such-model"}, "options.base_model"),
    ({"train": "/no/such/file.tsv"}, "options.train"),
    ({"train": "no-such-corpus"}, "options.train"),
    ({"name": "a b"}, "options.name"),
])
def test_bad_tune_options_are_refused_when_submitted(worker, tiny_learner, train32, change,
                                                     field):
    r = httpx.post(worker.url + "/v1/jobs", timeout=30, json={
        "kind": "tune", "task": "mol2cap",
        "options": {**options(tiny_learner, train32, "bad"), **change}})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field, r.json()


def test_errors_found_in_the_training_process_fail_the_job_with_the_reason(worker, tiny_learner,
                                                                           worker_dir):
    """Here the training corpus is uploaded with the job: the training process reads it from
    where the worker keeps it, and it is deleted when the job ends."""
    opts = options(tiny_learner, "x", "too-tight", cutoff=16)
    del opts["train"]
    train = (worker_dir / "corpora" / "train32.tsv").read_bytes()
    r = httpx.post(worker.url + "/v1/jobs/upload", timeout=30,
                   data={"kind": "tune", "task": "mol2cap", "options": json.dumps(opts)},
                   files={"train": ("train.tsv", train)})
    assert r.status_code == 202, r.text
    done = wait_for(worker, r.json()["id"])
    assert done["state"] == "failed" and done["message"].startswith("cutoff:"), done
    assert "32 of 32 skipped" in done["message"]  # the uploaded 32 were read; none fits
    uploads = worker_dir / "tuning" / ".uploads" / done["id"]
    deadline = time.monotonic() + 30
    while uploads.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not uploads.exists()


def test_cancel_stops_the_training_process(worker, tiny_learner, train32):
    r = httpx.post(worker.url + "/v1/jobs", timeout=30, json={
        "kind": "tune", "task": "mol2cap",
        "options": options(tiny_learner, train32, "cancelled", max_steps=100000)})
    job_id = r.json()["id"]
    wait_for(worker, job_id, until=lambda j: (j["tuning"] or {}).get("step", 0) >= 2)
    proc = worker.app.state.service.tuner._proc
    assert proc is not None and proc.poll() is None
    r = httpx.delete(f"{worker.url}/v1/jobs/{job_id}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    proc.wait(30)
    time.sleep(1.5)
    job = httpx.get(f"{worker.url}/v1/jobs/{job_id}").json()
    assert job["state"] == "cancelled" and job["tuning"]["step"] < 100000
    names = [a["name"] for a in httpx.get(worker.url + "/v1/adapters").json()["adapters"]]
    assert "cancelled" not in names


def test_killed_training_process_resumes_from_its_checkpoint(worker, tiny_learner, train32):
    r = httpx.post(worker.url + "/v1/jobs", timeout=30, json={
        "kind": "tune", "task": "mol2cap",
        "options": options(tiny_learner, train32, "survivor", max_steps=150, save_steps=10)})
    job_id = r.json()["id"]
    root = Path(worker.app.state.service.settings.data_dir) / "tuning" / "survivor" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(root.glob("step-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc = worker.app.state.service.tuner._proc
    os.kill(proc.pid, signal.SIGKILL)  # as the kernel's out-of-memory killer would
    done = wait_for(worker, job_id, timeout=600)
    assert done["state"] == "succeeded", done
    manifest = (Path(worker.app.state.service.settings.adapters_path()) / "survivor" /
                "icma-adapter.json").read_text()
    training = json.loads(manifest)["training"]
    assert training["resumed_from_step"] >= 10 and training["steps"] == 150
    assert len(training["losses"]) == 150
