"""Sampled decoding (ICMA's default) with and without prompt-lookup speculation.

Speculative sampling keeps the sampling distribution (``icma.generation.speculation``; tests
check it), not the answer a seed gives, so this benchmark compares speed and the shape of the
answers, not the answers themselves.

Protocol: issue 15's (ChEBI-20 val-to-test, mol2cap, the first ``--queries`` test queries, 2
graph examples, ICMA prompts as ``translate`` writes them, the shipped SmolLM2-135M, at most
128 new tokens) with ICMA's sampling (temperature 0.7, top_p 0.85, top_k 40, seed 42) and
consensus decoding's sampling (``--consensus-queries`` queries, 8 samples each), in float32
(the CPU default) and bfloat16. Off = transformers' generate() (``ICMA_SPECULATIVE_SAMPLING=false``),
on = drafts of up to 8. The two run back to back, in swapped order every other repeat; medians
over ``--repeats``.

    .venv/bin/python benchmarks/bench_sampling.py [--queries 32] [--consensus-queries 8] [--repeats 2]

Writes benchmarks/results/sampling.md and sampling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (RESULTS, alternated, facts_line, run_facts,  # noqa: E402
                               write)

MAX_NEW_TOKENS = 128
SAMPLES = 8  # consensus decoding's samples per prompt in this benchmark
DRAFTS = 8


def params(num_samples: int = 1):
    from icma.generation.engines import GenerationParams

    return GenerationParams.for_task("mol2cap", decoding="sample", max_new_tokens=MAX_NEW_TOKENS,
                                     num_samples=num_samples)


def timed(engine, inputs, p, speculate: bool) -> dict:
    engine.speculative_tokens, engine.speculative_sampling = DRAFTS, speculate
    t = time.perf_counter()
    gens = engine.generate(inputs, p)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "completion_tokens": sum(g.completion_tokens for g in gens),
            "answers": len(gens), "stopped": sum(g.finish_reason == "stop" for g in gens),
            "draft_tokens": sum(g.draft_tokens for g in gens),
            "accepted_tokens": sum(g.accepted_tokens for g in gens)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--consensus-queries", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown")
    args = ap.parse_args()
    if args.render:
        write("sampling.md", render(json.loads((RESULTS / "sampling.json").read_text())))
        return

    from benchmarks.bench_engines import both_dtypes

    load = os.getloadavg()[0]
    engines, inputs, data = both_dtypes(args.queries)
    work = {"sample": (inputs, params()),
            f"consensus, {SAMPLES} samples": (inputs[:args.consensus_queries], params(SAMPLES))}
    for eng in engines.values():  # warm up (first calls allocate; stop-text tables are built)
        for on in (False, True):
            timed(eng, inputs[:2], replace(params(), max_new_tokens=8), on)
    cells: dict[str, dict[str, list[dict]]] = {}
    for rep in range(args.repeats):
        order = alternated(rep, (False, True))
        for dtype, eng in engines.items():
            for what, (xs, p) in work.items():
                key = f"{dtype}, {what}"
                for on in order:
                    r = timed(eng, xs, p, on)
                    cells.setdefault(key, {}).setdefault("on" if on else "off", []).append(r)
                    print(f"  {rep} {key} {'on' if on else 'off'}: {r['seconds']:.1f} s, "
                          f"{r['completion_tokens']} tokens", flush=True)
    for eng in engines.values():
        eng.close()
    payload = {**data, **run_facts(load), "repeats": args.repeats,
               "queries": args.queries, "consensus_queries": args.consensus_queries,
               "samples": SAMPLES, "drafts": DRAFTS, "max_new_tokens": MAX_NEW_TOKENS,
               "cells": cells, "started": time.strftime("%Y-%m-%d %H:%M")}
    (RESULTS / "sampling.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(write("sampling.md", render(payload)))


def render(p: dict) -> str:
    med = statistics.median
    lines = [
        "# Sampled decoding with and without prompt-lookup speculation", "",
        facts_line(p), "",
        f"Protocol: {p['protocol']}; mol2cap, the first {p['queries']} test queries (consensus "
        f"rows: the first {p['consensus_queries']}, {p['samples']} samples each), "
        f"{p['n_shot']} {p['retrieval']} examples, SmolLM2-135M, ICMA's sampling (temperature "
        f"0.7, top_p 0.85, top_k 40, seed 42), at most {p['max_new_tokens']} new tokens, "
        "batches of 8 rows. Off: transformers' generate(); on: drafts of up to "
        f"{p['drafts']}, verified by rejection sampling (the same distribution, other draws). "
        f"Medians of {p['repeats']} repeats, off and on back to back in alternating order. "
        "Tokens/s = completion tokens / seconds (the two draw different answers, so their "
        "token counts differ too: compare tokens/s).", "",
        "| dtype, decoding | off: s | off: tokens/s | on: s | on: tokens/s | speed-up "
        "(tokens/s) | acceptance | tokens per answer off / on | ended by a stop off / on |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for key, cell in p["cells"].items():
        rate = {k: med(r["completion_tokens"] / r["seconds"] for r in cell[k]) for k in cell}
        sec = {k: med(r["seconds"] for r in cell[k]) for k in cell}
        per = {k: med(r["completion_tokens"] / r["answers"] for r in cell[k]) for k in cell}
        stop = {k: sum(r["stopped"] for r in cell[k]) / sum(r["answers"] for r in cell[k])
                for k in cell}
        acc = sum(r["accepted_tokens"] for r in cell["on"]) / max(
            1, sum(r["draft_tokens"] for r in cell["on"]))
        lines.append(
            f"| {key} | {sec['off']:.1f} | {rate['off']:.1f} | {sec['on']:.1f} "
            f"| {rate['on']:.1f} | {rate['on'] / rate['off']:.2f}x | {acc:.2f} "
            f"| {per['off']:.0f} / {per['on']:.0f} | {stop['off']:.0%} / {stop['on']:.0%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
