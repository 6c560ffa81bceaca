"""Retrieval as a nearest-neighbour caption baseline, ChEBI-20 val -> test.

Protocol ("ChEBI-20 val-to-test"): the 3,301 validation pairs are the database, the 3,300 test
molecules are the queries; the prediction for a query is the caption of its top-1 retrieved
molecule. The paper's database is the 26k train split, which is not available offline, so these
numbers are not comparable with published ones. Scored with BLEU-2/4 and METEOR on SciBERT word
pieces and ROUGE-1/2/L (MolT5's recipe, ``icma.evaluation.metrics``).

    .venv/bin/python benchmarks/bench_retrieval_quality.py [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, SHARED, machine, write  # noqa: E402
from icma.core.corpus import read_corpus  # noqa: E402
from icma.core.settings import get_settings  # noqa: E402
from icma.evaluation.metrics import CAPTION_TOKENIZER, caption_scores  # noqa: E402
from icma.retrieval import build_index  # noqa: E402

KEYS = ("bleu2", "bleu4", "rouge1", "rouge2", "rougeL", "meteor")
ENCODERS = ["gcn_supervised_contextpred", "gcn_contextpred", "graphsage_contextpred",
            "gat_contextpred"]


def methods():
    yield "random (seed 0)", "random", {"seed": 0}
    yield "RDKit path fingerprint (MolReGPT's \"Morgan\")", "rdkit", {}
    yield "Morgan r=2, 2048 bits", "morgan", {}
    for name in ENCODERS:
        yield f"graph: {name}", "graph", {"encoder": str(SHARED / f"models/pretrain-gnns/{name}.pth")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, help="only the first N test queries")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the JSON")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads((RESULTS / "retrieval_quality.json").read_text())["rows"])
        return
    db, _ = read_corpus(SHARED / "data/chebi20/validation.txt")
    test, _ = read_corpus(SHARED / "data/chebi20/test.txt")
    queries = test.records[: args.limit] if args.limit else test.records
    refs = [r.description for r in queries]
    settings = get_settings()
    rows = []
    for label, kind, params in methods():
        t0 = time.perf_counter()
        index = build_index(kind, db, settings=settings,
                            **({"progress": False} if kind == "graph" else {}), **params)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        hits = index.search([r.smiles for r in queries], 1)
        search_s = time.perf_counter() - t0
        preds = [db.descriptions[h[0].row] for h in hits]
        s = caption_scores(preds, refs, data_dir=settings.data_dir)
        rows.append({"method": label, "kind": kind, **s, "build_s": build_s,
                     "search_ms_per_query": 1000 * search_s / len(queries)})
        print(f"{label}: " + ", ".join(f"{k} {s[k]:.3f}" for k in KEYS))
    lines = [
        "# Retrieval quality: nearest-neighbour caption baseline",
        "",
        f"Protocol: ChEBI-20 val-to-test — database = validation split ({len(db)} pairs), queries "
        f"= {len(queries)} test molecules; prediction = the top-1 retrieved molecule's caption. "
        "Not comparable with published numbers (those use the 26k train split as database).",
        f"Tokenizer: {CAPTION_TOKENIZER}; BLEU = nltk corpus_bleu (no smoothing); ROUGE = "
        "rouge_score F-measure, no stemmer, averaged; METEOR = nltk meteor_score per sample on "
        "the word pieces (WordNet 3.0 from Debian), averaged.",
        f"Machine: {machine()}.",
        "",
        "| method | BLEU-2 | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L | METEOR | build (s) "
        "| search (ms/query, batched) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['bleu2']:.3f} | {r['bleu4']:.3f} | {r['rouge1']:.3f} | "
                     f"{r['rouge2']:.3f} | {r['rougeL']:.3f} | {r['meteor']:.3f} | "
                     f"{r['build_s']:.1f} | "
                     f"{r['search_ms_per_query']:.2f} |")
    best = max(rows, key=lambda r: r["bleu2"])
    lines += ["", f"Best by BLEU-2 in this run: {best['method']}."]
    lines.append("")
    write("retrieval_quality.md", "\n".join(lines))
    write("retrieval_quality.json", json.dumps({"protocol": "chebi20-val-test", "n": len(queries),
                                                "tokenizer": CAPTION_TOKENIZER, "rows": rows},
                                               indent=2) + "\n")
    plot(rows)


def plot(rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = list(KEYS)
    x = np.arange(len(keys))
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(10, 5.5))
    for i, r in enumerate(rows):
        ax.bar(x + i * width, [r[k] for k in keys], width, label=r["method"])
    ax.set_xticks(x + 0.4 - width / 2, ["BLEU-2", "BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L",
                                         "METEOR"])
    ax.set_ylabel("score")
    ax.set_title("Nearest-neighbour caption baseline, ChEBI-20 val-to-test (top-1 caption)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, frameon=False)
    fig.tight_layout()
    path = RESULTS / "retrieval_quality.png"
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
