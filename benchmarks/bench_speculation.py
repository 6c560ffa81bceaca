"""Prompt-lookup speculation in the transformers engine: speed, acceptance, same answers.

Protocol (issue 15): ChEBI-20 val-to-test (database = ChEBI-20 validation, queries = the first
``--queries`` rows of ChEBI-20 test, mol2cap), 2 examples per query from graph retrieval, ICMA
prompts as ``translate`` writes them (``bench_engines.build_prompts``: answer primed, budget
2048), the shipped SmolLM2-135M-Instruct, greedy, at most 128 new tokens, ICMA's stop texts.

Two measurements, each configuration run side by side with the others and alternated, medians
over ``--repeats``:
- batch: one engine ``generate`` over all the queries' prompts, in batches of 8 (the engine's
  default); tokens/s = completion tokens / seconds, prompts/s likewise.
- one at a time: the first ``--latency-queries`` prompts, each alone (a request at concurrency
  1); the median seconds per prompt.

Configurations: float32 (today's CPU default) and bfloat16 weights, speculation off and with
drafts of up to k tokens. "Same answers" compares each run's texts with the same dtype's
run without speculation (float32 sums in the same order far more often than bfloat16).

    .venv/bin/python benchmarks/bench_speculation.py [--queries 64] [--repeats 2]

Writes benchmarks/results/speculation.md and speculation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, git_commit, machine, write  # noqa: E402

MAX_NEW_TOKENS = 128
BATCH = 8
#: (dtype, draft tokens): 0 is speculation off.
CONFIGS = [("float32", 0), ("float32", 8), ("bfloat16", 0), ("bfloat16", 4), ("bfloat16", 8),
           ("bfloat16", 16)]
#: One-at-a-time runs: today's default, and bf16 with and without drafts.
LATENCY_CONFIGS = [("float32", 0), ("float32", 8), ("bfloat16", 0), ("bfloat16", 8)]
#: Worker runs (``--part worker``): the same, each a worker started with those settings.
WORKER_CONFIGS = LATENCY_CONFIGS
RETRIEVAL_PORT, WORKER_PORT = 18101, 18100


def params():
    from icma.generation.engines import GenerationParams

    return GenerationParams.for_task("mol2cap", decoding="greedy", max_new_tokens=MAX_NEW_TOKENS)


def label(dtype: str, k: int) -> str:
    return f"{dtype}, " + (f"drafts of up to {k}" if k else "no speculation")


def run(engine, inputs, k: int, batch_size: int) -> dict:
    engine.speculative_tokens, engine.batch_size = k, batch_size
    t0 = time.perf_counter()
    gens = engine.generate(inputs, params())
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "completion_tokens": sum(g.completion_tokens for g in gens),
            "draft_tokens": sum(g.draft_tokens for g in gens),
            "accepted_tokens": sum(g.accepted_tokens for g in gens),
            "texts": [g.text for g in gens]}


def worker_latency(n_queries: int, concurrency: tuple[int, ...]) -> dict:
    """``/mol2cap`` through the product's two services (``icma serve``), one worker per
    configuration, each request greedy with at most 128 new tokens and its own CID excluded;
    per concurrency level, every query once (a closed loop of that many clients)."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from benchmarks.common import SHARED, start_service, stop_services
    from icma.core.corpus import read_corpus

    test, _ = read_corpus(SHARED / "data/chebi20/test.txt")
    records = test.records[:n_queries]
    tmp = Path(tempfile.mkdtemp(prefix="bench-speculation-"))
    env = {**os.environ, "ICMA_JOBS_DB": str(tmp / "jobs.sqlite3"), "ICMA_PROGRESS": "false",
           "ICMA_TORCH_THREADS": "2", "ICMA_ENGINE": "transformers",
           "ICMA_RETRIEVAL_KINDS": '["graph", "bm25"]'}
    retrieval = f"http://127.0.0.1:{RETRIEVAL_PORT}"
    worker = f"http://127.0.0.1:{WORKER_PORT}"

    def ask(rec) -> dict:
        body = {"smiles": rec.smiles, "retrieval": {"exclude_cids": [rec.cid]},
                "generation": {"decoding": "greedy", "max_new_tokens": MAX_NEW_TOKENS}}
        t0 = time.perf_counter()
        r = httpx.post(worker + "/mol2cap", json=body, timeout=900)
        r.raise_for_status()
        j = r.json()
        return {"ms": (time.perf_counter() - t0) * 1e3, "caption": j["caption"],
                "generation_ms": j["timings"]["generation_ms"], **j["usage"]}

    out: dict[str, dict] = {}
    services = [start_service(["retrieval", "--port", str(RETRIEVAL_PORT)], retrieval, env)]
    try:
        for dtype, k in WORKER_CONFIGS:
            cfg_env = {**env, "ICMA_LLM_DTYPE": dtype, "ICMA_SPECULATIVE_TOKENS": str(k)}
            proc = start_service(["worker", "--port", str(WORKER_PORT), "--retrieval-url",
                                  retrieval], worker, cfg_env)
            try:
                ask(records[0])  # warm up: the first request allocates
                runs = {}
                for c in concurrency:
                    with ThreadPoolExecutor(c) as pool:
                        runs[str(c)] = list(pool.map(ask, records))
                    ms = [r["ms"] for r in runs[str(c)]]
                    print(f"  worker {label(dtype, k)}, concurrency {c}: p50 "
                          f"{statistics.median(ms):.0f} ms", flush=True)
                out[label(dtype, k)] = runs
            finally:
                stop_services([proc], timeout=60)
    finally:
        stop_services(services, timeout=60)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--latency-queries", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--part", choices=("engine", "worker"), default="engine",
                    help="engine: the batch and one-at-a-time tables; worker: /mol2cap through "
                         "the services (a part left out keeps its figures)")
    ap.add_argument("--worker-queries", type=int, default=16)
    ap.add_argument("--render", action="store_true",
                    help="only rewrite speculation.md from speculation.json")
    args = ap.parse_args()
    if args.render:
        write("speculation.md", render(json.loads((RESULTS / "speculation.json").read_text())))
        return

    if args.part == "worker":
        payload = json.loads((RESULTS / "speculation.json").read_text())
        payload["worker"] = worker_latency(args.worker_queries, (1, 8))
        payload["worker_started"] = time.strftime("%Y-%m-%d %H:%M")
        payload["worker_commit"] = git_commit()
        (RESULTS / "speculation.json").write_text(json.dumps(payload, indent=1) + "\n")
        print(write("speculation.md", render(payload)))
        return

    import torch
    import transformers

    from benchmarks.bench_engines import build_prompts
    from icma.core.settings import get_settings
    from icma.generation.engines import load_engine

    load = os.getloadavg()[0]
    engines = {d: load_engine("transformers", settings=get_settings(), device="cpu", dtype=d)
               for d in ("float32", "bfloat16")}
    inputs, data = build_prompts(args.queries, engines["float32"].count_tokens)
    print(f"{len(inputs)} prompts built", flush=True)
    for eng in engines.values():  # warm up: first calls allocate
        run(eng, inputs[:BATCH], 8, BATCH)
    batch: dict[str, list[dict]] = {label(*c): [] for c in CONFIGS}
    alone: dict[str, list[float]] = {label(*c): [] for c in LATENCY_CONFIGS}
    alone_texts: dict[str, list[str]] = {label(*c): [] for c in LATENCY_CONFIGS}
    for rep in range(args.repeats):
        for dtype, k in CONFIGS:
            batch[label(dtype, k)].append(run(engines[dtype], inputs, k, BATCH))
            print(f"  {label(dtype, k)}: {batch[label(dtype, k)][-1]['seconds']:.1f} s",
                  flush=True)
        for i, x in enumerate(inputs[:args.latency_queries]):
            for dtype, k in LATENCY_CONFIGS:
                r = run(engines[dtype], [x], k, 1)
                alone[label(dtype, k)].append(r["seconds"])
                if rep == 0:
                    alone_texts[label(dtype, k)] += r["texts"]
        print(f"repeat {rep + 1}: " + ", ".join(f"{name} {rs[-1]['seconds']:.1f} s"
                                                for name, rs in batch.items()), flush=True)
    payload = {**data, "commit": git_commit(), "machine": machine(), "load_before": load,
               "load_after": os.getloadavg()[0], "torch": torch.__version__,
               "transformers": transformers.__version__, "threads": torch.get_num_threads(),
               "max_new_tokens": MAX_NEW_TOKENS, "batch_size": BATCH, "repeats": args.repeats,
               "latency_queries": args.latency_queries,
               "configs": [list(c) for c in CONFIGS], "batch": batch, "alone": alone,
               "alone_texts": alone_texts}
    old = RESULTS / "speculation.json"
    if old.exists():  # the worker part's figures stay until it runs again
        payload.update({k: v for k, v in json.loads(old.read_text()).items()
                        if k.startswith("worker")})
    old.write_text(json.dumps(payload, indent=1) + "\n")
    print(write("speculation.md", render(payload)))


def render(p: dict) -> str:
    med = statistics.median
    rows = []
    base = {}
    for dtype, k in p["configs"]:
        rs = p["batch"][label(dtype, k)]
        secs = med(r["seconds"] for r in rs)
        tokens = rs[0]["completion_tokens"]
        if k == 0:
            base[dtype] = (secs, rs[0]["texts"])
        ref_secs, ref_texts = base[dtype]
        same = sum(a == b for a, b in zip(rs[0]["texts"], ref_texts))
        drafted = sum(r["draft_tokens"] for r in rs)
        rate = f"{sum(r['accepted_tokens'] for r in rs) / drafted:.2f}" if drafted else "-"
        first = base["float32"][0]
        runs = ", ".join(f"{r['seconds']:.1f}" for r in rs)
        rows.append(f"| {label(dtype, k)} | {tokens / secs:.1f} | {p['queries'] / secs:.2f} | "
                    f"{secs:.1f} ({runs}) | {rate} | "
                    f"{ref_secs / secs:.2f}x | {first / secs:.2f}x | {same}/{len(ref_texts)} |")
    lat = []
    lat_base = med(p["alone"][label("float32", 0)])
    for name, secs in p["alone"].items():
        texts = p.get("alone_texts", {}).get(name)
        # Rounding without speculation: the same prompts alone against in batches of 8.
        batched = p["batch"][name][0]["texts"]
        same = f"{sum(a == b for a, b in zip(texts, batched))}/{len(texts)}" if texts else "-"
        lat.append(f"| {name} | {med(secs):.2f} | {sorted(secs)[int(0.9 * (len(secs) - 1))]:.2f} | "
                   f"{lat_base / med(secs):.2f}x | {same} |")
    return "\n".join([*_engine_part(p, rows, lat), *_worker_part(p)])


def _worker_part(p: dict) -> list[str]:
    if "worker" not in p:
        return []
    med = statistics.median
    lines = [f"## `/mol2cap` through the services (run {p['worker_started']}, commit "
             f"{p['worker_commit']})", "",
             "The product's two services (`icma serve retrieval`, `icma serve worker`) on "
             "127.0.0.1, the embedded corpus, each query's own CID excluded; one worker per "
             "configuration; greedy, at most 128 new tokens; per concurrency level every query "
             "once, by that many clients.", "",
             "| configuration | concurrency | p50 ms | p90 ms | generation p50 ms | acceptance |",
             "|---|---|---|---|---|---|"]
    for name, runs in p["worker"].items():
        for c, rs in runs.items():
            ms = sorted(r["ms"] for r in rs)
            drafted = sum(r.get("draft_tokens", 0) for r in rs)
            rate = (f"{sum(r.get('accepted_tokens', 0) for r in rs) / drafted:.2f}"
                    if drafted else "-")
            lines.append(f"| {name} | {c} | {med(ms):.0f} | {ms[int(0.9 * (len(ms) - 1))]:.0f} | "
                         f"{med(r['generation_ms'] for r in rs):.0f} | {rate} |")
    return [*lines, ""]


def _engine_part(p: dict, rows: list[str], lat: list[str]) -> list[str]:
    return [
        "# Prompt-lookup speculation (transformers engine)",
        "",
        f"Machine: {p['machine']}; torch {p['torch']}, transformers {p['transformers']}, "
        f"{p['threads']} threads; load average {p['load_before']:.2f} before, "
        f"{p['load_after']:.2f} after. Commit {p['commit']}.",
        "",
        f"Protocol: {p['protocol']}; the first {p['queries']} test queries, mol2cap, "
        f"{p['n_shot']} {p['retrieval']} examples each (own CID excluded), ICMA prompts with the "
        f"answer primed; the shipped SmolLM2-135M-Instruct (untuned); greedy, at most "
        f"{p['max_new_tokens']} new tokens, ICMA's stop texts. Configurations alternated within "
        f"each of {p['repeats']} repeats; medians. Produced by `benchmarks/bench_speculation.py`.",
        "",
        f"## Batch: all {p['queries']} prompts, batches of {p['batch_size']}",
        "",
        "| configuration | tokens/s | prompts/s | seconds (runs) | acceptance | vs same dtype "
        "without | vs float32 without | same answers as same dtype without |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"## One prompt at a time (the first {p['latency_queries']} prompts, each alone)",
        "",
        "| configuration | median s/prompt | p90 s/prompt | vs float32 without | same answers "
        "as in batches of 8 |",
        "|---|---|---|---|---|",
        *lat,
        "",
        "Acceptance: drafted tokens greedy decoding confirmed and the answer kept, over all "
        "drafted tokens. Same answers: texts identical to the run without speculation in the "
        "same dtype; a difference is rounding (a forward pass over several positions sums in "
        "another order than one over a single position), which flips the argmax where two "
        "tokens tie to within it. The last column measures the same rounding without "
        "speculation: a prompt alone against the same prompt in a batch of 8.",
        "",
    ]


if __name__ == "__main__":
    main()
