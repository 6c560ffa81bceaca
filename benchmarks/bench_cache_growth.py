"""Does growing the speculative batch's cache in place beat concatenating it every step?

``speculation.md`` could not settle it (one pair of runs each, and they disagreed), so this
benchmark asks only that question, with the pairs alternated: each repeat runs both variants
back to back on the same prompts, in swapped order every other repeat, so that drift in the
machine's load falls on both alike. The figure is the median over repeats of each pair's ratio
(concatenated seconds / grown seconds; above 1 means growing is faster).

Protocol: issue 15's (ChEBI-20 val-to-test, mol2cap, the first ``--queries`` test queries, 2
graph examples, the shipped SmolLM2-135M, greedy, 128 new tokens, drafts of up to 8), for
float32 and bfloat16, in a batch (batch 8) and one prompt at a time (the first
``--alone-queries``, summed). The answers of the two variants are compared, not assumed equal.

    .venv/bin/python benchmarks/bench_cache_growth.py [--queries 16] [--alone-queries 8] [--repeats 5]

Writes benchmarks/results/cache_growth.md and cache_growth.json.
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

from benchmarks.bench_speculation import BATCH, MAX_NEW_TOKENS, run  # noqa: E402
from benchmarks.common import (RESULTS, alternated, facts_line, run_facts,  # noqa: E402
                               write)

DRAFTS = 8
VARIANTS = ("grown", "concatenated")


def timed(engine, inputs, variant: str, alone: bool) -> dict:
    """Seconds and texts of ``inputs`` with the cache ``variant``; ``alone``: one prompt at a time."""
    from icma.generation import speculation

    grow = speculation._grow_in_place
    if variant == "concatenated":
        speculation._grow_in_place = lambda cache: None
    try:
        runs = ([run(engine, [x], DRAFTS, 1) for x in inputs] if alone
                else [run(engine, inputs, DRAFTS, BATCH)])
    finally:
        speculation._grow_in_place = grow
    return {"seconds": sum(r["seconds"] for r in runs),
            "texts": [t for r in runs for t in r["texts"]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--alone-queries", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown")
    args = ap.parse_args()
    if args.render:
        write("cache_growth.md", render(json.loads((RESULTS / "cache_growth.json").read_text())))
        return

    from benchmarks.bench_engines import both_dtypes

    load = os.getloadavg()[0]
    engines, inputs, data = both_dtypes(args.queries)
    modes = {"batch": (inputs, False), "one at a time": (inputs[:args.alone_queries], True)}
    for eng in engines.values():  # warm up: first calls allocate
        timed(eng, inputs[:BATCH], "grown", False)
    cells: dict[str, dict[str, list[float]]] = {}
    same: dict[str, list[int]] = {}
    for rep in range(args.repeats):
        order = alternated(rep, VARIANTS)
        for dtype, eng in engines.items():
            for mode, (xs, alone) in modes.items():
                key = f"{dtype}, {mode}"
                res = {v: timed(eng, xs, v, alone) for v in order}
                for v in VARIANTS:
                    cells.setdefault(key, {}).setdefault(v, []).append(res[v]["seconds"])
                same.setdefault(key, []).append(
                    sum(a == b for a, b in zip(res["grown"]["texts"], res["concatenated"]["texts"])))
                print(f"  {rep} {key}: " + ", ".join(
                    f"{v} {res[v]['seconds']:.2f} s" for v in order), flush=True)
    for eng in engines.values():
        eng.close()
    payload = {**data, **run_facts(load), "repeats": args.repeats,
               "queries": args.queries, "alone_queries": args.alone_queries,
               "drafts": DRAFTS, "max_new_tokens": MAX_NEW_TOKENS, "cells": cells, "same": same,
               "started": time.strftime("%Y-%m-%d %H:%M")}
    (RESULTS / "cache_growth.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(write("cache_growth.md", render(payload)))


def render(p: dict) -> str:
    med = statistics.median
    lines = [
        "# The speculative batch's cache: grown in place against concatenated every step", "",
        facts_line(p), "",
        f"Protocol: ChEBI-20 val-to-test, mol2cap, the first {p['queries']} test queries "
        f"(one at a time: the first {p['alone_queries']}, seconds summed), 2 graph examples, "
        f"SmolLM2-135M, greedy, at most {p['max_new_tokens']} new tokens, drafts of up to "
        f"{p['drafts']}, batch {BATCH}. {p['repeats']} repeats; in each the two variants run "
        "back to back, in swapped order every other repeat. Ratio = concatenated / grown "
        "seconds of one pair (above 1: growing in place is faster); the median of the pairs' "
        "ratios, and their range.", "",
        "| engine, mode | grown, median s | concatenated, median s | ratio (median) "
        "| ratios (min-max) | same answers |",
        "|---|---:|---:|---:|---|---|"]
    for key, cell in p["cells"].items():
        ratios = [c / g for g, c in zip(cell["grown"], cell["concatenated"])]
        n = p["queries"] if "batch" in key else p["alone_queries"]
        lines.append(
            f"| transformers {key} | {med(cell['grown']):.2f} | {med(cell['concatenated']):.2f} "
            f"| {med(ratios):.3f}x | {min(ratios):.3f}-{max(ratios):.3f} "
            f"| {min(p['same'][key])}/{n} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
