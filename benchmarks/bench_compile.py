"""Does a static key/value cache, or torch.compile, pay off for the transformers engine here?

Protocol (issue 15): the prompts of ``bench_speculation`` (ChEBI-20 val-to-test, the first
``--queries`` test molecules, mol2cap, 2 graph examples, answer primed), the shipped
SmolLM2-135M-Instruct in bfloat16, greedy, at most 128 new tokens, batches of 8 in order.

Rows, alternated within each of ``--repeats`` repeats, every one over the same prompts:
- transformers ``generate()`` with its dynamic cache (what the engine runs without speculation);
- ``generate()`` with a static cache (``cache_implementation="static"``), eager;
- the same compiled: transformers compiles the decoding step with ``torch.compile``
  (inductor, ``dynamic=False``; transformers does so only on accelerators unless told to);
- the engine's default greedy path: prompt-lookup speculation, drafts of up to 8, continuous
  batching (``icma.generation.speculation``), the row to beat.

A static cache and a compiled step need one shape: every batch of the three ``generate()`` rows
is left-padded to the longest prompt of the run (so the compiled step is compiled once, in a
warm-up whose seconds are reported apart). The speculative row runs the engine as it serves,
each prompt over its own tokens. "Same answers" compares each row's answer texts (cut as the
engine cuts them) with the dynamic cache's.

    .venv/bin/python benchmarks/bench_compile.py [--queries 64] [--repeats 2]

Writes benchmarks/results/compile.md and compile.json.
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
DTYPE = "bfloat16"
ROWS = ("generate(), dynamic cache", "generate(), static cache",
        "generate(), static cache, torch.compile",
        "the engine's greedy path: speculation (drafts of 8)")


def generate_rows(engine, batches, how: str) -> dict:
    """One ``generate()`` per padded batch, with the engine's own greedy settings (its end
    tokens, repetition penalty, stop texts); answers cut as the engine cuts them."""
    import torch
    from transformers import CompileConfig

    from benchmarks.bench_engines import params as greedy

    p = greedy(MAX_NEW_TOKENS).for_engine()
    kwargs = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1,
                  eos_token_id=engine.eos_ids, pad_token_id=engine.tokenizer.pad_token_id,
                  repetition_penalty=p.repetition_penalty)
    stops = [x for x in p.stop if x]
    if stops:
        kwargs.update(stop_strings=stops, tokenizer=engine.tokenizer)
    if how != "dynamic":
        kwargs["cache_implementation"] = "static"
    if how == "compiled":
        config = CompileConfig(fullgraph=False, dynamic=False)
        config._compile_all_devices = True  # transformers compiles on accelerators only
        kwargs["compile_config"] = config
    else:
        kwargs["disable_compile"] = True
    texts, completion = [], 0
    t0 = time.perf_counter()
    for ids, mask in batches:
        with torch.inference_mode():
            out = engine.net.generate(input_ids=ids, attention_mask=mask, **kwargs)
        for row, n in zip(out[:, ids.shape[1]:].tolist(), mask.sum(1).tolist()):
            g = engine._generation(row, n, p)
            texts.append(g.text)
            completion += g.completion_tokens
    return {"seconds": time.perf_counter() - t0, "completion_tokens": completion,
            "texts": texts}


def engine_row(engine, inputs) -> dict:
    from benchmarks.bench_engines import params

    engine.speculative_tokens, engine.batch_size = 8, BATCH
    t0 = time.perf_counter()
    gens = engine.generate(inputs, params(MAX_NEW_TOKENS))
    return {"seconds": time.perf_counter() - t0,
            "completion_tokens": sum(g.completion_tokens for g in gens),
            "texts": [g.text for g in gens]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--render", action="store_true",
                    help="only rewrite compile.md from compile.json")
    args = ap.parse_args()
    if args.render:
        write("compile.md", render(json.loads((RESULTS / "compile.json").read_text())))
        return

    import torch
    import transformers

    from benchmarks.bench_engines import build_prompts
    from icma.core.settings import get_settings
    from icma.generation.engines import load_engine

    load = os.getloadavg()[0]
    engine = load_engine("transformers", settings=get_settings(), device="cpu", dtype=DTYPE)
    tok = engine.tokenizer
    inputs, data = build_prompts(args.queries, engine.count_tokens)
    encoded = [tok(x.prompt)["input_ids"] for x in inputs]  # as the engine tokenizes
    width = max(map(len, encoded))
    pad = tok.pad_token_id
    batches = []
    for i in range(0, len(encoded), BATCH):
        part = encoded[i:i + BATCH]
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in part])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in part])
        batches.append((ids, mask))
    print(f"{len(inputs)} prompts, padded to {width} tokens", flush=True)

    # Warm-up: the first call of each allocates; the compiled one compiles (timed apart).
    t0 = time.perf_counter()
    generate_rows(engine, batches[:1], "compiled")
    compile_seconds = time.perf_counter() - t0
    for how in ("dynamic", "static"):
        generate_rows(engine, batches[:1], how)
    engine_row(engine, inputs[:BATCH])
    print(f"compiled warm-up (compiles the step): {compile_seconds:.1f} s", flush=True)

    runs: dict[str, list[dict]] = {name: [] for name in ROWS}
    for _ in range(args.repeats):
        for name, how in zip(ROWS, ("dynamic", "static", "compiled", "engine")):
            r = engine_row(engine, inputs) if how == "engine" else \
                generate_rows(engine, batches, how)
            runs[name].append(r)
            print(f"  {name}: {r['seconds']:.1f} s", flush=True)
    engine.close()
    payload = {**data, "commit": git_commit(), "machine": machine(), "load_before": load,
               "load_after": os.getloadavg()[0], "torch": torch.__version__,
               "transformers": transformers.__version__, "threads": torch.get_num_threads(),
               "dtype": DTYPE, "batch": BATCH, "padded_to": width,
               "max_new_tokens": MAX_NEW_TOKENS, "repeats": args.repeats,
               "compile_seconds": compile_seconds,
               "runs": runs}
    (RESULTS / "compile.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(write("compile.md", render(payload)))


def render(p: dict) -> str:
    base = p["runs"][ROWS[0]]
    base_s = statistics.median(r["seconds"] for r in base)
    lines = [
        "# A static cache and torch.compile against the engine's speculation",
        "",
        f"Machine: {p['machine']}; torch {p['torch']}, transformers {p['transformers']}, "
        f"{p['threads']} threads; load average {p['load_before']:.2f} before, "
        f"{p['load_after']:.2f} after. Commit {p['commit']}.",
        "",
        f"Protocol: {p['protocol']} (database {p['database_size']} records); the first "
        f"{p['queries']} test molecules, mol2cap, {p['n_shot']} {p['retrieval']} examples, "
        f"SmolLM2-135M-Instruct in {p['dtype']}, greedy, at most {p['max_new_tokens']} new "
        f"tokens, batches of {p['batch']}. The generate() rows take every batch left-padded to "
        f"the longest prompt ({p['padded_to']} tokens), so that one compiled step serves all; "
        f"the engine row runs each prompt over its own tokens, as it serves. Medians of "
        f"{p['repeats']} repeats, rows alternated. The compiled row's warm-up, which compiles "
        f"the decoding step, took {p['compile_seconds']:.1f} s and is not in its time.",
        "",
        "| configuration | seconds | completion tokens/s | speed-up | same answers |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in ROWS:
        runs = p["runs"][name]
        s = statistics.median(r["seconds"] for r in runs)
        tps = statistics.median(r["completion_tokens"] / r["seconds"] for r in runs)
        same = sum(a == b for a, b in zip(runs[0]["texts"], base[0]["texts"]))
        lines.append(f"| {name} | {s:.1f} | {tps:.1f} | {base_s / s:.2f}x | "
                     f"{same}/{len(base[0]['texts'])} |")
    lines += ["", "Same answers: each row's answer texts (cut as the engine cuts them) against "
              "the dynamic cache's. In bfloat16 another kernel or cache shape sums in another "
              "order, which flips a near-tie now and then."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
