"""Scaling out on a real local Ray cluster (``ray start --head``, two CPUs, token
authentication as ``ray start`` sets it up), started once for these tests: ``icma translate
--executor ray`` gives the local path's lines (nearest-neighbour engine; a config-built model,
greedy), Parquet in and out; a generation actor killed mid-run (Ray restarts it and retries its
block: still one line per input); the driver killed mid-run (the next run does only what has
no result); the worker handing its jobs to Ray (``ICMA_JOB_EXECUTOR``, ``ICMA_RAY_ADDRESS``);
and an unreachable cluster as a one-line error."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.service_helpers import LiveServer
from tests.test_worker import retrieval, worker_settings  # noqa: F401  (a fixture)

RAY = Path(sys.executable).with_name("ray")
#: The cluster's clients present its token (``ray start`` enables token authentication).
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """The head of a one-node cluster, two CPUs; ``--block`` keeps it in this process group's
    child, so the teardown stops this cluster and no other on the machine."""
    port = _free_port()
    log = tmp_path_factory.mktemp("ray") / "head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(RAY), "start", "--head", "--block", f"--port={port}",
                                 "--num-cpus=2", "--include-dashboard=false",
                                 "--disable-usage-stats"], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **RAY_ENV}, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while "Ray runtime started" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"ray start failed:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _env(data_dir: Path) -> dict:
    return {**os.environ, **RAY_ENV, "ICMA_DATA_DIR": str(data_dir), "ICMA_PROGRESS": "false",
            "TOKENIZERS_PARALLELISM": "false"}


def _translate(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "icma", "translate", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_ray_gives_the_local_lines_with_the_nearest_neighbour(ray_cluster, svc_dir, chebi_val,
                                                             tmp_path):
    """A corpus TSV (one broken SMILES among 12): both executors write the same bytes; a
    Parquet output holds the same rows, and reads back as an input."""
    recs = chebi_val.records[:11]
    src = tmp_path / "q.tsv"
    src.write_text("CID\tSMILES\tdescription\n" + "".join(
        f"{r.cid}\t{r.smiles}\t{r.description}\n" for r in recs[:5]) + "x1\tC1CC\tbroken\n"
        + "".join(f"{r.cid}\t{r.smiles}\t{r.description}\n" for r in recs[5:]))
    common = ["--task", "mol2cap", "--input", str(src), "--engine", "nearest-neighbour",
              "--n-shot", "2", "--batch-size", "4"]
    env = _env(svc_dir)
    local = _translate(env, *common, "--output", str(tmp_path / "local.jsonl"))
    assert local.returncode == 0, local.stderr
    on_ray = _translate(env, *common, "--output", str(tmp_path / "ray.jsonl"),
                        "--executor", "ray", "--ray-address", ray_cluster)
    assert on_ray.returncode == 0, on_ray.stderr
    assert "12 mol2cap inputs" in on_ray.stderr and "1 failed" in on_ray.stderr
    assert (tmp_path / "ray.jsonl").read_bytes() == (tmp_path / "local.jsonl").read_bytes()
    lines = _lines(tmp_path / "ray.jsonl")
    assert [x["index"] for x in lines] == list(range(12))
    assert lines[5]["error"]["field"] == "smiles" and lines[5]["prediction"] == ""
    assert lines[0]["prediction"] == recs[0].description  # its own record ranks first

    import pyarrow.parquet as pq

    out = tmp_path / "ray.parquet"
    again = _translate(env, *common, "--output", str(out), "--executor", "ray",
                       "--ray-address", ray_cluster)
    assert again.returncode == 0, again.stderr
    assert pq.read_table(out).to_pylist() == lines
    # a Parquet input with the JSONL keys
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist([{"input": r.smiles, "id": r.cid} for r in recs[:3]]),
                   tmp_path / "in.parquet")
    third = _translate(env, "--task", "mol2cap", "--input", str(tmp_path / "in.parquet"),
                       "--output", str(tmp_path / "p.jsonl"), "--engine", "nearest-neighbour",
                       "--executor", "ray", "--ray-address", ray_cluster)
    assert third.returncode == 0, third.stderr
    assert [x["prediction"] for x in _lines(tmp_path / "p.jsonl")] == \
        [x["prediction"] for x in lines[:3]]


@pytest.fixture(scope="module")
def greedy_run(svc_dir, chebi_val, tiny_model, tmp_path_factory):
    """40 captions -> molecules with the config-built model, greedy, through the local path:
    the lines every Ray run below must reproduce."""
    tmp = tmp_path_factory.mktemp("ray-greedy")
    src = tmp / "q.jsonl"
    src.write_text("".join(json.dumps({"input": r.description, "id": r.cid}) + "\n"
                           for r in chebi_val.records[100:140]))
    args = ["--task", "cap2mol", "--input", str(src), "--engine", "transformers",
            "--model", str(tiny_model), "--decoding", "greedy", "--max-new-tokens", "48",
            "--n-shot", "2", "--batch-size", "2"]
    local = _translate(_env(svc_dir), *args, "--output", str(tmp / "local.jsonl"))
    assert local.returncode == 0, local.stderr
    return args, (tmp / "local.jsonl").read_bytes()


def _running(env: dict, args: list[str], out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "icma", "translate", *args, "--output",
                             str(out)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _done(out: Path) -> int:
    """Results recorded so far in a run's partial store (0 before it exists)."""
    partial = out.with_name(out.name + ".partial.sqlite3")
    if not partial.exists():
        return 0
    try:
        with sqlite3.connect(partial, timeout=5) as db:
            row = db.execute("SELECT sum(done) FROM jobs").fetchone()
        return int(row[0] or 0)
    except sqlite3.OperationalError:  # (its tables not made yet)
        return 0


def _wait_until(pred, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            pytest.fail(f"the run ended first:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail("timed out")
        time.sleep(0.2)


def _actor_pids(name: str) -> list[int]:
    """Processes of Ray actors whose title names ``name`` (Ray titles them ray::<actor>)."""
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in ps.splitlines()
            if "ray::" in line and name in line]


def test_a_generation_actor_killed_mid_run_costs_no_line(ray_cluster, svc_dir, greedy_run,
                                                         tmp_path):
    args, want = greedy_run
    out = tmp_path / "ray.jsonl"
    proc = _running(_env(svc_dir), [*args, "--executor", "ray", "--ray-address", ray_cluster],
                    out)
    _wait_until(lambda: _done(out) >= 4 and _actor_pids("MapBatches(Generate)"), proc)
    [victim] = _actor_pids("MapBatches(Generate)")
    os.kill(victim, signal.SIGKILL)
    assert _done(out) < 40, "the run ended before the kill: make it longer"
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "40 cap2mol inputs" in err
    assert out.read_bytes() == want  # one line per input, each the local path's
    assert victim not in _actor_pids("MapBatches(Generate)")


def test_a_killed_driver_resumes_without_redoing_what_it_recorded(ray_cluster, svc_dir,
                                                                  greedy_run, tmp_path):
    args, want = greedy_run
    out = tmp_path / "ray.jsonl"
    env = _env(svc_dir)
    ray_args = [*args, "--executor", "ray", "--ray-address", ray_cluster]
    proc = _running(env, ray_args, out)
    _wait_until(lambda: _done(out) >= 6, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    recorded = _done(out)
    assert 6 <= recorded < 40 and not out.exists()
    again = _translate(env, *ray_args, "--output", str(out))
    assert again.returncode == 0, again.stderr
    assert f"; {recorded} done by an earlier run" in again.stderr
    assert out.read_bytes() == want
    assert not list(tmp_path.glob("*.partial.sqlite3*"))


def test_the_worker_hands_jobs_to_ray(ray_cluster, retrieval, chebi_val, tmp_path):  # noqa: F811
    from icma.workers.translator.app import create_app as worker_app

    settings = worker_settings(tmp_path, retrieval.url, engine="nearest-neighbour",
                               job_executor="ray", ray_address=ray_cluster, job_batch_size=3)
    recs = chebi_val.records[:5]
    items = [{"input": r.smiles, "id": r.cid} for r in recs] + [{"input": "C1CC"}]
    os.environ.update(RAY_ENV)  # this process is the driver
    try:
        with LiveServer(worker_app(settings)) as w:
            w.wait_ready()
            r = httpx.post(w.url + "/v1/jobs", json={"task": "mol2cap", "items": items,
                                                     "options": {"n_shot": 2}})
            assert r.status_code == 202, r.text
            for _ in range(600):
                job = httpx.get(f"{w.url}/v1/jobs/{r.json()['id']}").json()
                if job["state"] in ("succeeded", "failed"):
                    break
                time.sleep(0.5)
            assert (job["state"], job["done"], job["failed"]) == ("succeeded", 6, 1), job
            assert f"the Ray cluster at {ray_cluster}" in job["message"]
            lines = [json.loads(x) for x in
                     httpx.get(w.url + job["results_url"]).text.splitlines()]
    finally:
        import ray

        ray.shutdown()
        for k in RAY_ENV:
            os.environ.pop(k, None)
    assert [x["id"] for x in lines] == [r.cid for r in recs] + [None]
    assert [x["prediction"] for x in lines[:5]] == [r.description for r in recs]
    assert lines[5]["error"]["field"] == "smiles"


def _refused(data_dir: Path, address: str, tmp_path: Path) -> str:
    """stderr of a run that cannot join ``address`` (no token offered): no traceback, no
    output file."""
    src = tmp_path / "q.jsonl"
    src.write_text('{"input": "CCO"}\n')
    env = {**_env(data_dir)}
    env.pop("RAY_AUTH_MODE")
    done = _translate(env, "--task", "mol2cap", "--input", str(src), "--output",
                      str(tmp_path / "o.jsonl"), "--engine", "nearest-neighbour",
                      "--executor", "ray", "--ray-address", address, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"cannot join the Ray cluster at {address}" in done.stderr
    assert not (tmp_path / "o.jsonl").exists()
    return done.stderr


def test_an_unreachable_cluster_is_a_one_line_error(svc_dir, tmp_path):
    """At once: ray.init would retry a dead address for minutes."""
    assert "nothing answers there" in _refused(svc_dir, f"127.0.0.1:{_free_port()}", tmp_path)


def test_a_cluster_that_wants_a_token_says_how_to_give_it(ray_cluster, svc_dir, tmp_path):
    assert "RAY_AUTH_MODE=token" in _refused(svc_dir, ray_cluster, tmp_path)


def test_tuning_on_two_ray_workers_matches_one_process(ray_cluster, tiny_learner, chebi_val,
                                                       tmp_path):
    """The same run in this process and on 2 Ray Train CPU workers (each taking one of a
    step's two micro-batches; gradients summed): the same losses within float tolerance, the
    adapter and manifest written alike, Ray's checkpoints kept in the run folder."""
    import torch
    from safetensors.torch import load_file

    from icma.core.corpus import write_corpus
    from icma.core.settings import get_settings
    from icma.tuning import tune
    from tests.test_tuning import tiny_config

    train = tmp_path / "train32.tsv"
    write_corpus(chebi_val.subset(range(32), name="train32"), train)
    cfg = dict(max_steps=6, save_steps=3, batch_size=4, grad_accum=2, lora_dropout=0.0)
    local = tune(tiny_config(tiny_learner, train, "alone", **cfg), settings=get_settings(),
                 data_dir=tmp_path / "a", adapters_dir=tmp_path / "a" / "adapters")
    data_dir = tmp_path / "b"
    flags = ["--task", "mol2cap", "--name", "together", "--base-model", str(tiny_learner),
             "--train", str(train), "--retrieval", "morgan", "--n-shot", "2", "--cutoff", "512",
             "--lora-r", "8", "--lora-alpha", "16", "--learning-rate", "2e-2",
             "--warmup-steps", "0", "--max-steps", "6", "--save-steps", "3", "--batch-size",
             "4", "--grad-accum", "2", "--lora-dropout", "0", "--seed", "1", "--data-dir",
             str(data_dir), "--json", "--executor", "ray", "--num-workers", "2",
             "--ray-address", ray_cluster]
    done = subprocess.run([sys.executable, "-m", "icma", "tune", *flags], env=_env(data_dir),
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    on_ray = json.loads(done.stdout)
    assert on_ray["training"]["device"] == "ray: 2 x cpu"
    assert on_ray["training"]["steps"] == local["training"]["steps"] == 6
    assert on_ray["training"]["losses"] == pytest.approx(local["training"]["losses"], rel=1e-4)
    assert on_ray["training"]["tokens"] == local["training"]["tokens"]
    assert on_ray["data"] == local["data"] and on_ray["prompt"] == local["prompt"]
    a = load_file(tmp_path / "a" / "adapters" / "alone" / "adapter_model.safetensors")
    b = load_file(data_dir / "adapters" / "together" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)
    assert list((data_dir / "tuning" / "together" / "ray").rglob("trainable.pt"))
