"""The Ray path against the local path on one machine: what Ray costs on one box.

``icma translate`` in this process, ``--executor local`` and ``--executor ray`` side by side
(alternating), on the first ChEBI-20 test molecules, mol2cap, greedy: the nearest-neighbour
engine (retrieval alone: the pipeline's own cost) and the shipped SmolLM2-135M (transformers,
float32). Ray runs on a local runtime this process starts once (``ray.init``: every CPU of the
machine), with one retrieval actor and one generation actor, each 1 CPU; each Ray run starts
its actors anew, as a submitted job would. Rows/s counts the whole command (reading, actors
starting, writing).

    .venv/bin/python benchmarks/bench_ray.py [--nn 330] [--llm 24] [--repeats 3]

Writes benchmarks/results/ray.md and ray.json.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, SHARED, alternated, facts_line, run_facts, write  # noqa


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nn", type=int, default=330, help="molecules for the nearest neighbour")
    ap.add_argument("--llm", type=int, default=24, help="molecules for SmolLM2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    from icma.core.settings import get_settings
    from icma.core.ray_cluster import connect
    from icma.jobs.translate_file import translate_file

    os.environ.setdefault("ICMA_PROGRESS", "false")
    get_settings.cache_clear()
    settings = get_settings()
    load_before = os.getloadavg()[0]
    lines = (SHARED / "data/chebi20/test.txt").read_text(encoding="utf-8").splitlines()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    t0 = time.perf_counter()
    connect(None)  # the local runtime, started once (a cluster is up before jobs come)
    ray_start_s = time.perf_counter() - t0
    rows, raw = [], {}
    for engine, n, repeats in (("nearest-neighbour", args.nn, args.repeats),
                               ("transformers", args.llm, max(1, args.repeats - 1))):
        src = tmp / f"{engine}.tsv"
        src.write_text("\n".join(lines[:n + 1]) + "\n", encoding="utf-8")
        times: dict[str, list[float]] = {"local": [], "ray": []}
        outputs = {}
        for rep in range(repeats):
            for executor in alternated(rep, ("local", "ray")):
                out = tmp / f"{engine}-{executor}-{rep}.jsonl"
                t = time.perf_counter()
                translate_file("mol2cap", src, out, settings=settings, fmt="tsv", engine=engine,
                               decoding="greedy", max_new_tokens=args.max_new_tokens,
                               executor=executor, progress=False)
                times[executor].append(time.perf_counter() - t)
                outputs[executor] = out.read_bytes()
                print(f"{engine} {executor} rep {rep}: {times[executor][-1]:.1f} s", flush=True)
        same = outputs["local"] == outputs["ray"]
        med = {k: statistics.median(v) for k, v in times.items()}
        raw[engine] = {"n": n, "seconds": times, "same_output": same}
        rows.append((engine, n, repeats, med["local"], med["ray"], same))
    facts = run_facts(load_before)
    out = {"facts": facts, "ray_start_s": ray_start_s, "runs": raw,
           "max_new_tokens": args.max_new_tokens}
    (RESULTS / "ray.json").write_text(json.dumps(out, indent=1))

    md = ["# Ray on one machine: the overhead of `--executor ray`", "",
          "Produced by `benchmarks/bench_ray.py`. ChEBI-20 test molecules (the first n), "
          "mol2cap, greedy, retrieval from the embedded corpus's graph index, n_shot 2. "
          f"SmolLM2-135M-Instruct in float32, at most {args.max_new_tokens} new tokens. "
          "The local path is this process (2 torch threads); the Ray path a local runtime "
          f"(started once: {ray_start_s:.1f} s, not counted) with 1 retrieval and 1 "
          "generation actor of 1 CPU each, started anew for every run. Medians of the runs, "
          "local and Ray alternating.", "", facts_line(facts), "",
          "| engine | n | runs each | local s | local rows/s | Ray s | Ray rows/s | Ray / local "
          "time | same lines |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for engine, n, reps, loc, ray, same in rows:
        md.append(f"| {engine} | {n} | {reps} | {loc:.1f} | {n / loc:.2f} | {ray:.1f} | "
                  f"{n / ray:.2f} | {ray / loc:.2f}x | {'yes' if same else 'NO'} |")
    write("ray.md", "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
