"""bfloat16 against float32 weights: the same answers? (issue 15: bf16 becomes the CPU default
only if the quality benchmark shows no loss against float32 on the first 300 test queries.)

Protocol: ``icma bench quality --protocol chebi20-val-test --limit 300 --decodings greedy
--no-zero-shot`` once per dtype (database = ChEBI-20 validation, queries = the first 300 test
rows; mol2cap with 2 graph examples, cap2mol with 4 BM25 examples, each query's own CID
excluded; the shipped SmolLM2-135M-Instruct, untuned; greedy with the engine's default
prompt-lookup speculation, at most 256 new tokens). Each run keeps its answers (``--answers``),
so an interrupted run goes on where it stopped. Compared: the metrics of both rows, and how
many answers are identical strings.

    .venv/bin/python benchmarks/bench_dtype_quality.py [--limit 300] [--work DIR]

Writes benchmarks/results/dtype_quality.md and dtype_quality.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, RESULTS, git_commit, machine, write  # noqa: E402

DTYPES = ("float32", "bfloat16")
TASKS = ("mol2cap", "cap2mol")
#: The metrics shown per task (the quality file has more).
SHOWN = {"mol2cap": ("bleu2", "bleu4", "rouge1", "rouge2", "rougeL", "meteor"),
         "cap2mol": ("bleu", "exact_match", "levenshtein", "validity", "maccs_fts", "rdk_fts",
                     "morgan_fts")}


def run(dtype: str, limit: int, work: Path) -> Path:
    out = work / f"quality-{dtype}"
    cmd = [str(REPO / ".venv/bin/icma"), "bench", "quality", "--protocol", "chebi20-val-test",
           "--limit", str(limit), "--decodings", "greedy", "--no-zero-shot", "--dtype", dtype,
           "--out", str(out), "--answers", str(out / "answers")]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return out


def answers(folder: Path, task: str) -> tuple[dict, list[dict]]:
    """The LLM row's header and answers for ``task`` (one answers file per row and task)."""
    files = sorted((folder / "answers").glob(f"{task}-*.jsonl"))
    if len(files) != 1:
        sys.exit(f"{folder / 'answers'}: expected one {task} answers file, found {len(files)}")
    lines = [json.loads(x) for x in files[0].read_text().splitlines() if x.strip()]
    return lines[0], lines[1:]


def llm_row(folder: Path, task: str) -> dict:
    rows = json.loads((folder / "quality-chebi20-val-test.json").read_text())["rows"]
    hits = [r for r in rows if r["task"] == task and r["system"].startswith("LLM")]
    if len(hits) != 1:
        sys.exit(f"{folder}: expected one LLM row for {task}, found {len(hits)}")
    return hits[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--work", type=Path, default=REPO / ".bench-dtype-quality")
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown")
    args = ap.parse_args()
    if args.render:
        write("dtype_quality.md", render(json.loads((RESULTS / "dtype_quality.json").read_text())))
        return
    folders = {d: run(d, args.limit, args.work) for d in DTYPES}
    tasks = {}
    for task in TASKS:
        got = {d: answers(folders[d], task)[1] for d in DTYPES}
        a, b = got["float32"], got["bfloat16"]
        if [x["query"] for x in a] != [x["query"] for x in b]:
            sys.exit(f"{task}: the two runs answered different queries")
        tasks[task] = {
            "queries": len(a),
            "same": sum(x["answer"] == y["answer"] for x, y in zip(a, b)),
            "metrics": {d: llm_row(folders[d], task)["scores"] for d in DTYPES},
            "system": llm_row(folders["float32"], task)["system"],
            "seconds": {d: llm_row(folders[d], task)["seconds"] for d in DTYPES}}
    payload = {"commit": git_commit(), "machine": machine(), "limit": args.limit,
               "tasks": tasks}
    (RESULTS / "dtype_quality.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(write("dtype_quality.md", render(payload)))


def render(p: dict) -> str:
    lines = ["# bfloat16 against float32 weights: answers and metrics", "",
             f"Machine: {p['machine']}. Commit {p['commit']}.", "",
             f"Protocol: `icma bench quality --protocol chebi20-val-test --limit {p['limit']} "
             "--decodings greedy --no-zero-shot --dtype D` for D = float32 and bfloat16: "
             "database = ChEBI-20 validation, queries = the first "
             f"{p['limit']} ChEBI-20 test rows (the paper used the 26k train split: not "
             "comparable with published numbers); mol2cap 2 graph examples, cap2mol 4 BM25 "
             "examples, own CID excluded; the shipped SmolLM2-135M-Instruct, untuned; greedy "
             "(with the engine's default prompt-lookup speculation), at most 256 new tokens. "
             "Produced by `benchmarks/bench_dtype_quality.py`.", ""]
    for task, t in p["tasks"].items():
        shown = SHOWN[task]
        lines += [f"## {task} ({t['system']})", "",
                  f"Identical answers: **{t['same']} of {t['queries']}**.", "",
                  "| weights | " + " | ".join(shown) + " |",
                  "|---|" + "---|" * len(shown)]
        for d, m in t["metrics"].items():
            lines.append(f"| {d} | " + " | ".join(f"{m[k]:.3f}" for k in shown) + " |")
        diff = {k: t["metrics"]["bfloat16"][k] - t["metrics"]["float32"][k] for k in shown}
        lines += ["| bfloat16 - float32 | " + " | ".join(f"{v:+.3f}" for v in diff.values())
                  + " |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
