"""The translation worker on this machine: per-request latency breakdown, and batch-job overhead.

Both services run as the product runs them (`icma serve retrieval`, `icma serve worker`, one
process each, on 127.0.0.1), with the embedded ChEBI-20 corpus and the shipped SmolLM2-135M
(float32, the CPU default).

1. Latency: the first 20 ChEBI-20 test molecules to /mol2cap (2 examples, graph retrieval) and
   their captions to /cap2mol (4 examples, BM25), one request at a time, each excluding its own
   CID from the examples (the embedded corpus holds the test split). ICMA's sampling settings,
   at most 128 new tokens. The worker reports retrieval / prompt / generation per request; the
   client measures the whole round trip.
2. Job overhead: 64 ChEBI-20 test molecules (mol2cap, greedy, 64 new tokens) as one job
   (`POST /v1/jobs`, 16 items per engine call, timed from submission to the last result line
   read) against the same prompts given straight to the engine in this process (same examples
   from the same retrieval service, the same 16-prompt batches, same model and settings).
   Alternated, 3 runs each; greedy outputs are compared.

    .venv/bin/python benchmarks/bench_worker.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RESULTS,
    SHARED,
    git_commit,
    machine,
    pct,
    start_service,
    stop_services,
    write,
)

LATENCY_QUERIES = 20
JOB_ITEMS = 64
JOB_BATCH = 16
REPEATS = 4
RETRIEVAL_PORT, WORKER_PORT = 18001, 18000




def latency(worker: str, test) -> dict:
    out = {}
    for path, field, side in (("/mol2cap", "smiles", "smiles"),
                              ("/cap2mol", "caption", "description")):
        rows = []
        for rec in test.records[:LATENCY_QUERIES]:
            body = {field: getattr(rec, side), "retrieval": {"exclude_cids": [rec.cid]},
                    "generation": {"max_new_tokens": 128}}
            t0 = time.perf_counter()
            r = httpx.post(worker + path, json=body, timeout=600)
            wall = (time.perf_counter() - t0) * 1e3
            r.raise_for_status()
            j = r.json()
            rows.append({**j["timings"], "client_ms": wall,
                         "completion_tokens": j["usage"]["completion_tokens"],
                         "prompt_tokens": j["usage"]["prompt_tokens"]})
        out[path] = rows
        print(path, "median total", statistics.median(x["total_ms"] for x in rows), "ms")
    return out


def job_overhead(worker: str, retrieval: str, test) -> dict:
    from icma.generation.engines import load_engine
    from icma.generation.options import RetrievalOptions, build_options
    from icma.generation.pipeline import translate
    from icma.core.settings import get_settings
    from icma.generation.retrievers import HttpRetriever

    recs = test.records[:JOB_ITEMS]
    queries = [r.smiles for r in recs]
    excluded = tuple(r.cid for r in recs)  # no query sees itself (the same for both paths)
    params = {"decoding": "greedy", "max_new_tokens": 64}
    retriever = HttpRetriever(retrieval)
    examples = retriever.examples("mol2cap", queries, 2,
                                  RetrievalOptions(exclude_cids=excluded))
    engine = load_engine("transformers", settings=get_settings())
    options = build_options("mol2cap", {"generation": params, "prime_answer": True})
    times: dict[str, list[float]] = {"job": [], "direct": []}
    answers: dict[str, list[str]] = {}
    def run_direct() -> None:
        t0 = time.perf_counter()
        direct = []
        for lo in range(0, len(queries), JOB_BATCH):
            direct += translate("mol2cap", queries[lo:lo + JOB_BATCH],
                                examples[lo:lo + JOB_BATCH], engine, options)
        times["direct"].append(time.perf_counter() - t0)
        answers["direct"] = [t.answer for t in direct]

    def run_job() -> None:
        t0 = time.perf_counter()
        job = httpx.post(worker + "/v1/jobs", json={
            "task": "mol2cap", "items": queries,
            "options": {"generation": params, "retrieval": {"exclude_cids": list(excluded)}}},
            timeout=60).json()
        lines = httpx.get(worker + f"/v1/jobs/{job['id']}/results", timeout=3600).text
        times["job"].append(time.perf_counter() - t0)
        answers["job"] = [json.loads(x)["prediction"] for x in lines.splitlines()]

    for rep in range(REPEATS):
        # Alternate which goes first, so that drift on a shared machine hits both alike.
        for run in ((run_direct, run_job) if rep % 2 == 0 else (run_job, run_direct)):
            run()
        print(f"run {rep + 1}: direct {times['direct'][-1]:.1f} s, job {times['job'][-1]:.1f} s",
              flush=True)
    same = sum(a == b for a, b in zip(answers["job"], answers["direct"]))
    return {"times_s": times, "same_answers": same, "n": len(queries)}


def report(lat: dict, jobs: dict, started: str) -> str:
    import torch

    lines = [
        "# Translation worker: latency breakdown and job overhead", "",
        f"On {machine()} (the date is this file's), torch {torch.__version__}, commit {git_commit()}. "
        "Both services started with the "
        "product's commands on 127.0.0.1 (one process each), the embedded ChEBI-20 corpus "
        "(validation + test, 6,601 pairs) and the shipped SmolLM2-135M-Instruct in float32 "
        "(the CPU default), 2 torch threads. Produced by `benchmarks/bench_worker.py`.", "",
        "## Per-request latency (one request at a time)", "",
        f"Run {started}.", "",
        f"The first {LATENCY_QUERIES} ChEBI-20 test molecules (mol2cap: SMILES in, 2 graph-"
        "retrieved examples) and their captions (cap2mol: 4 BM25 examples), each excluding its "
        "own CID; ICMA's sampling (temperature 0.7, top_p 0.85, top_k 40), at most 128 new "
        "tokens, answer priming on. Milliseconds; the worker's own timings, and the round trip "
        "the client saw.", "",
        "| endpoint | retrieval median | prompt median | generation median | total median | "
        "total p90 | client median | new tokens (median) | prompt tokens (median) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for path, rows in lat.items():
        col = {k: [r[k] for r in rows] for k in rows[0]}
        lines.append(
            f"| `{path}` | {statistics.median(col['retrieval_ms']):.1f} | "
            f"{statistics.median(col['prompt_ms']):.1f} | "
            f"{statistics.median(col['generation_ms']):.0f} | "
            f"{statistics.median(col['total_ms']):.0f} | {pct(col['total_ms'], 90):.0f} | "
            f"{statistics.median(col['client_ms']):.0f} | "
            f"{statistics.median(col['completion_tokens']):.0f} | "
            f"{statistics.median(col['prompt_tokens']):.0f} |")
    gen_share = {p: statistics.median(r["generation_ms"] / r["total_ms"] for r in rows)
                 for p, rows in lat.items()}
    lines += ["", "Generation is " + ", ".join(f"{100 * v:.1f}% of `{p}`" for p, v in
                                                gen_share.items())
              + " (median per request): the model, not retrieval or the HTTP hops, sets the "
                "latency on this CPU.", ""]
    t = jobs["times_s"]
    dj, jj = statistics.median(t["direct"]), statistics.median(t["job"])
    lines += [
        "## Batch job against the engine called directly", "",
        f"{jobs['n']} ChEBI-20 test molecules, mol2cap, 2 examples each (graph retrieval from "
        "the retrieval service; every query's CID excluded), greedy, at most 64 new tokens, "
        f"{JOB_BATCH} prompts per engine call (the worker's `ICMA_JOB_BATCH_SIZE`; transformers "
        "generates them 8 at a time, `ICMA_GENERATION_BATCH_SIZE`). Direct: `icma.generation.pipeline` on "
        "the same examples with the engine in the benchmark's process. Job: `POST /v1/jobs`, "
        "timed until the last result line was read from `GET /v1/jobs/{id}/results` "
        "(retrieval, SQLite writes and HTTP included). "
        f"{REPEATS} runs each, alternating which goes first; the worker was idle otherwise. "
        f"Run {jobs.get('started', started)}.", "",
        "| path | median s | runs (s) | items/s |", "| --- | ---: | --- | ---: |",
        f"| engine directly | {dj:.1f} | {', '.join(f'{x:.1f}' for x in t['direct'])} | "
        f"{jobs['n'] / dj:.2f} |",
        f"| job | {jj:.1f} | {', '.join(f'{x:.1f}' for x in t['job'])} | {jobs['n'] / jj:.2f} |",
        "",
        f"Job overhead: **{100 * (jj / dj - 1):+.1f}%** of the direct time (target: within "
        f"10%). Greedy answers identical on {jobs['same_answers']} of {jobs['n']} molecules.",
    ]
    return "\n".join(lines) + "\n"


def plot(lat: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [("retrieval_ms", "retrieval"), ("prompt_ms", "prompt"),
             ("generation_ms", "generation")]
    fig, ax = plt.subplots(figsize=(7, 2.6))
    names = list(lat)
    left = [0.0] * len(names)
    for key, label in parts:
        vals = [statistics.median(r[key] for r in lat[n]) for n in names]
        ax.barh(names, vals, left=left, label=f"{label}")
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("median ms per request (SmolLM2-135M, float32, 2-core CPU)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="latency,jobs",
                    help="what to run; a part left out keeps its figures from worker.json")
    parts = set(ap.parse_args().parts.split(","))
    from icma.core.corpus import read_corpus

    started = time.strftime("%Y-%m-%d %H:%M")
    test, _ = read_corpus(SHARED / "data/chebi20/test.txt")
    tmp = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    env = {**os.environ, "ICMA_JOBS_DB": str(tmp / "jobs.sqlite3"), "ICMA_PROGRESS": "false",
           "ICMA_JOB_BATCH_SIZE": str(JOB_BATCH), "ICMA_TORCH_THREADS": "2",
           "ICMA_LLM_DTYPE": "float32", "ICMA_ENGINE": "transformers",
           "ICMA_RETRIEVAL_KINDS": '["graph", "bm25"]'}
    os.environ.update({k: v for k, v in env.items() if k.startswith("ICMA_")})
    retrieval = f"http://127.0.0.1:{RETRIEVAL_PORT}"
    worker = f"http://127.0.0.1:{WORKER_PORT}"
    procs = [start_service(["retrieval", "--port", str(RETRIEVAL_PORT)], retrieval, env)]
    try:
        procs.append(start_service(["worker", "--port", str(WORKER_PORT), "--retrieval-url",
                                   retrieval], worker, env))
        old = (json.loads((RESULTS / "worker.json").read_text())
               if (RESULTS / "worker.json").exists() else {})
        lat = latency(worker, test) if "latency" in parts else old["latency"]
        lat_started = started if "latency" in parts else old.get("latency_started", "?")
        jobs = job_overhead(worker, retrieval, test) if "jobs" in parts else old["jobs"]
        if "jobs" in parts:
            jobs["started"] = started
    finally:
        stop_services(procs, timeout=60)
    (RESULTS / "worker.json").write_text(json.dumps(
        {"latency": lat, "latency_started": lat_started, "jobs": jobs}, indent=1))
    write("worker.md", report(lat, jobs, lat_started))
    plot(lat, RESULTS / "worker.png")


if __name__ == "__main__":
    main()
