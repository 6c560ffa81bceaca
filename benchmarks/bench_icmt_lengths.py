"""How long ICMT training texts are, before choosing a cutoff (issue: "a cutoff that keeps every
example; measure the token lengths first").

Protocol ("ChEBI-20 val-to-test"): every ChEBI-20 validation pair becomes a training example
exactly as ``icma tune`` builds it (``icma.tuning.data.build_training_set``: contexts retrieved
from the validation split itself, each pair's own CID excluded, ICMA's reversed order, answer
primed, SmolLM2's tokenizer, ``</s>`` EOS), with a cutoff large enough to drop nothing. Counted:
tokens of prompt + answer + EOS per example, for naive SFT (0 examples) and ICMT (ICMA's 2 / 4
examples), by retrieval method.

    .venv/bin/python benchmarks/bench_icmt_lengths.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import SHARED, git_commit, machine, pct, write  # noqa: E402

NO_CUTOFF = 16384
CUTOFFS = (512, 768, 1024, 1536, 2048)
#: (task, retrieval method, examples per prompt)
SETUPS = [("mol2cap", "graph", 0), ("mol2cap", "graph", 2), ("mol2cap", "morgan", 2),
          ("cap2mol", "bm25", 0), ("cap2mol", "bm25", 4)]


def main() -> None:
    from icma.core.corpus import read_corpus
    from icma.core.settings import get_settings
    from icma.retrieval import ExclusionRule
    from icma.retrieval.cache import cached_index
    from icma.tuning.data import Tokens, build_training_set
    from icma.tuning.model import load_tokenizer

    settings = get_settings()
    corpus, _ = read_corpus(SHARED / "data/chebi20/validation.txt")
    tokens = Tokens(load_tokenizer("smollm2-135m-instruct", settings.data_dir), "</s>")
    rows = []
    for task, method, n_shot in SETUPS:
        t0 = time.perf_counter()
        index = cached_index(method, corpus, settings.data_dir, settings=settings)
        data = build_training_set(task, corpus.records, index, tokens, n_shot=n_shot,
                                  cutoff=NO_CUTOFF, prime_answer=True,
                                  rule=ExclusionRule(self_cid=True))
        lengths = [len(e.input_ids) for e in data.examples]
        rows.append({"task": task, "method": method if n_shot else "-", "n_shot": n_shot,
                     "n": len(lengths), "skipped": len(data.skipped),
                     "p50": pct(lengths, 50), "p90": pct(lengths, 90), "p99": pct(lengths, 99),
                     "max": max(lengths), "mean": sum(lengths) / len(lengths),
                     "fit": {c: sum(n <= c for n in lengths) for c in CUTOFFS},
                     "seconds": time.perf_counter() - t0})
        print(rows[-1])
    head = ("| task | examples | retrieval | pairs | mean | p50 | p90 | p99 | max | "
            + " | ".join(f"fit {c}" for c in CUTOFFS) + " |")
    lines = [head, "| " + " | ".join(["---"] * (9 + len(CUTOFFS))) + " |"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['n_shot']} | {r['method']} | {r['n']} | "
                     f"{r['mean']:.0f} | {r['p50']:.0f} | {r['p90']:.0f} | {r['p99']:.0f} | "
                     f"{r['max']} | " + " | ".join(f"{r['fit'][c]}" for c in CUTOFFS) + " |")
    text = (
        "# ICMT training-text lengths (SmolLM2 tokens)\n\n"
        "Protocol: ChEBI-20 val-to-test. Every validation pair (3,301) as an `icma tune` "
        "training example: contexts retrieved from the validation split, own CID excluded, "
        "reversed order, answer primed, `</s>` EOS, SmolLM2-135M's tokenizer; tokens of prompt + "
        "answer + EOS, with no cutoff. `fit N`: examples of at most N tokens (the cutoff that "
        "would keep every example whole is the max).\n\n"
        + "\n".join(lines) + "\n\n"
        f"Machine: {machine()}; commit {git_commit()}.\n")
    write("icmt_lengths.md", text)


if __name__ == "__main__":
    main()
