"""BM25 caption retrieval: per-query latency of icma's BM25Index against rank_bm25 0.2.2.

Protocol (PubChem324k-IUPAC, ICMA's cap2mol setting): the 11,856 train captions are the
database, the 1,985 test captions are the queries, top 10, one query per call, tokenisation
included in both timings. (a) rank_bm25: ``BM25Okapi.get_scores(icma_tokenize(q))`` and a top-10
by stable argsort (ties by row, the rule that reproduces ICMA's files), on an evenly spaced subset
of the queries (rank_bm25 is slow). (b) ours: ``BM25Index.search([q], 10)`` on every query (Hit
objects included). Both run in the same process, interleaved (rank_bm25 right after ours on each
query it is timed on), on the same queries; the top-10 rows and scores
of every query timed with rank_bm25 must be identical to ours (checked, and recorded).

    .venv/bin/python benchmarks/bench_bm25.py [--quick] [--oracle-queries N]

Writes ``benchmarks/results/bm25.md`` and ``bm25.png`` (``bm25-quick.*`` with --quick).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, SHARED, cpu_model  # noqa: E402
from icma.core.corpus import read_corpus  # noqa: E402
from icma.retrieval.bm25 import BM25Index, icma_tokenize  # noqa: E402

DATA = SHARED / "data/pubchem324k-iupac"
K = 10
TARGET_SPEEDUP = 50.0


def machine_info() -> dict:
    import scipy

    cpu = cpu_model()
    try:
        load = "%.2f / %.2f / %.2f" % os.getloadavg()
    except OSError:
        load = "n/a"
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu model": cpu or "n/a",
        "cpu count": str(os.cpu_count()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "rank_bm25": metadata.version("rank-bm25"),
        "load average at start (1/5/15 min)": load,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def stats_us(seconds: list[float]) -> dict:
    a = np.asarray(seconds) * 1e6
    return {"n": len(a), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "min": float(a.min())}


def rank_bm25_top(bm25, q: str) -> tuple[list, list]:
    scores = bm25.get_scores(icma_tokenize(q))
    top = np.argsort(-scores, kind="stable")[:K]
    return top.tolist(), scores[top].tolist()


def ours_top(index: BM25Index, q: str) -> tuple[list, list]:
    hits = index.search([q], K)[0]
    return [h.row for h in hits], [h.score for h in hits]


def time_interleaved(index: BM25Index, bm25, queries: list[str], oracle_ix: list[int]):
    """Time ours on every query and rank_bm25 right after ours on the oracle queries, so that
    both see the same machine conditions (the machine may be shared)."""
    clock = time.perf_counter
    ours_lat, ours_out, ref_lat, ref_out = [], [], [], []
    oracle = set(oracle_ix)
    for i, q in enumerate(queries):
        t0 = clock()
        out = ours_top(index, q)
        ours_lat.append(clock() - t0)
        ours_out.append(out)
        if i in oracle:
            t0 = clock()
            out = rank_bm25_top(bm25, q)
            ref_lat.append(clock() - t0)
            ref_out.append(out)
    return ours_lat, ours_out, ref_lat, ref_out


def run(quick: bool, oracle_queries: int) -> dict:
    from rank_bm25 import BM25Okapi

    info = machine_info()
    train, _ = read_corpus(DATA / "train.txt", on_invalid="keep")
    test, _ = read_corpus(DATA / "test.txt", on_invalid="keep")
    queries = test.descriptions[:300] if quick else test.descriptions
    n_oracle = min(oracle_queries, len(queries))
    oracle_ix = np.unique(np.linspace(0, len(queries) - 1, n_oracle).round().astype(int)).tolist()

    builds = []
    for _ in range(1 if quick else 3):
        gc.collect()
        t0 = time.perf_counter()
        index = BM25Index.build(train)
        builds.append(time.perf_counter() - t0)
    gc.collect()
    t0 = time.perf_counter()
    bm25 = BM25Okapi([icma_tokenize(d) for d in train.descriptions])
    oracle_build = time.perf_counter() - t0

    # warm-up (first-call costs: caches, lazy imports), not recorded
    for q in queries[:50]:
        ours_top(index, q)
    for q in queries[:3]:
        rank_bm25_top(bm25, q)

    gc.collect()
    ours_lat, ours_out, ref_lat, ref_out = time_interleaved(index, bm25, queries, oracle_ix)

    identical = sum(ours_out[i] == ref_out[j] for j, i in enumerate(oracle_ix))
    ours_all = stats_us(ours_lat)
    ours_same = stats_us([ours_lat[i] for i in oracle_ix])
    ref = stats_us(ref_lat)
    return {
        "quick": quick, "info": info, "n_docs": len(train), "n_queries": len(queries),
        "oracle_ix": oracle_ix, "ours_lat": ours_lat, "ref_lat": ref_lat,
        "ours_all": ours_all, "ours_same": ours_same, "ref": ref,
        "speedup": ref["median"] / ours_all["median"],
        "speedup_same": ref["median"] / ours_same["median"],
        "identical": identical, "build_s": builds, "oracle_build_s": oracle_build,
        "vocab": len(index.vocab), "nnz": int(index.weights.nnz),
        "dense_columns": int(index._dense.shape[0]),
    }


def report(r: dict) -> str:
    def row(label, s):
        return (f"| {label} | {s['n']:,} | {s['median']:,.1f} | {s['p90']:,.1f} | "
                f"{s['p99']:,.1f} | {s['mean']:,.1f} | {s['min']:,.1f} |")

    info = "\n".join(f"| {k} | {v} |" for k, v in r["info"].items())
    n_or = len(r["oracle_ix"])
    verdict = "met" if r["speedup"] >= TARGET_SPEEDUP else "NOT met"
    builds = ", ".join(f"{b:.3f}" for b in r["build_s"])
    return f"""# BM25 caption retrieval: icma `BM25Index` vs rank_bm25 `BM25Okapi`
{"(quick run: first 300 queries only)" if r["quick"] else ""}
**Speed-up of median per-query latency: {r["speedup"]:,.0f}x** (target >= {TARGET_SPEEDUP:.0f}x:
{verdict}); {r["speedup_same"]:,.0f}x when ours is taken on the same {n_or} queries only.
Top-{K} rows and scores identical to rank_bm25's (bit for bit, ties by row) on
**{r["identical"]} of {n_or}** queries checked.

## Protocol
- Data: PubChem324k-IUPAC (ICMA's cap2mol setting; `../shared/data/pubchem324k-iupac`). Database:
  the {r["n_docs"]:,} train captions (IUPAC names); queries: {r["n_queries"]:,} test captions.
- Both: BM25Okapi k1 1.5, b 0.75, epsilon 0.25, ICMA's tokenisation (`icma_tokenize`), top {K},
  one query per call, wall-clock `time.perf_counter` per call, tokenisation included, same process,
  interleaved (rank_bm25 timed right after ours on each of its queries).
- rank_bm25: `get_scores(icma_tokenize(q))` + `np.argsort(-scores, kind="stable")[:{K}]`, on
  {n_or} evenly spaced queries (it takes tens of milliseconds a query).
- ours: `BM25Index.search([q], {K})` (returns `Hit` objects; exclusion machinery included) on all
  {r["n_queries"]:,} queries, after a 50-query warm-up.
- Index: {r["vocab"]:,} terms, {r["nnz"]:,} non-zero weights, {r["dense_columns"]} frequent
  terms also held as dense columns.

## Per-query latency (microseconds)
| method | queries | median | p90 | p99 | mean | min |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
{row("rank_bm25 get_scores + argsort", r["ref"])}
{row("icma BM25Index.search, all queries", r["ours_all"])}
{row("icma BM25Index.search, same queries as rank_bm25", r["ours_same"])}

## Build time
| method | seconds |
| --- | ---: |
| icma `BM25Index.build` (tokenise + weight matrix), {len(r["build_s"])} runs | {builds} |
| rank_bm25 `BM25Okapi(...)` (tokenise + term dicts) | {r["oracle_build_s"]:.3f} |

## Machine
| | |
| --- | --- |
{info}

The machine is shared; its load average is given above. Latencies are single-threaded.
![latency distributions](bm25{"-quick" if r["quick"] else ""}.png)
"""


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = np.asarray(r["ours_lat"]) * 1e3
    ref = np.asarray(r["ref_lat"]) * 1e3
    lo, hi = min(ours.min(), ref.min()) * 0.8, max(ours.max(), ref.max()) * 1.25
    bins = np.geomspace(lo, hi, 80)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    # weights 1/n: each histogram shows the share of its own queries, whatever their number
    ax.hist(ours, bins=bins, weights=np.full(len(ours), 1 / len(ours)), alpha=0.7,
            label=f"icma BM25Index.search ({len(ours)} queries)")
    ax.hist(ref, bins=bins, weights=np.full(len(ref), 1 / len(ref)), alpha=0.7,
            label=f"rank_bm25 get_scores + argsort ({len(ref)} queries)")
    for values, color in ((ours, "C0"), (ref, "C1")):
        ax.axvline(np.median(values), color=color, ls="--", lw=1)  # medians
    ax.set_xscale("log")
    ax.set_xlabel("per-query latency (ms, log scale)")
    ax.set_ylabel("share of queries")
    ax.set_title(f"BM25 top-{K}, PubChem324k-IUPAC test vs {r['n_docs']:,} train captions: "
                 f"{r['speedup']:,.0f}x", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="300 queries, 30 timed with rank_bm25")
    ap.add_argument("--oracle-queries", type=int, default=None,
                    help="queries timed with rank_bm25 (default 300, 30 with --quick)")
    args = ap.parse_args(argv)
    n_oracle = args.oracle_queries or (30 if args.quick else 300)
    r = run(args.quick, n_oracle)
    stem = "bm25-quick" if args.quick else "bm25"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.md").write_text(report(r))
    plot(r, RESULTS / f"{stem}.png")
    print(f"rank_bm25 median {r['ref']['median']:,.1f} us (p99 {r['ref']['p99']:,.1f}), "
          f"ours median {r['ours_all']['median']:,.1f} us (p99 {r['ours_all']['p99']:,.1f}), "
          f"speed-up {r['speedup']:,.1f}x; identical top-{K} on {r['identical']}/"
          f"{len(r['oracle_ix'])}; build {min(r['build_s']):.3f} s")
    print(f"wrote {RESULTS / stem}.md and .png")
    ok = r["identical"] == len(r["oracle_ix"])
    if not ok:
        print("ERROR: top-10 differs from rank_bm25", file=sys.stderr)
    if r["speedup"] < TARGET_SPEEDUP:
        print(f"WARNING: speed-up below the {TARGET_SPEEDUP:.0f}x target", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
