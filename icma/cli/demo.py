"""``icma demo``: the embedded corpus indexed (cached) and searched, with a prompt."""

from __future__ import annotations

import time
from pathlib import Path


def add_parser(sub) -> None:
    dm = sub.add_parser("demo", help="index the embedded corpus (cached) and show retrieval")
    dm.add_argument("--data-dir", type=Path, help="where to cache indexes (default ICMA_DATA_DIR)")
    dm.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from icma.core.corpus import embedded_corpus
    from icma.retrieval.examples import retrieve_examples
    from icma.core.prompts import build_prompt
    from icma.retrieval import Exclusion
    from icma.retrieval.cache import cached_index
    from icma.core.settings import get_settings

    settings = get_settings()
    corpus = embedded_corpus()
    print(f"embedded corpus: {corpus.name}, {len(corpus)} molecule-caption pairs (ChEBI-20 "
          "validation + test, CC BY 4.0)")
    indexes = {}
    for kind in ("graph", "bm25"):
        t0 = time.perf_counter()
        indexes[kind] = cached_index(kind, corpus, args.data_dir or settings.data_dir,
                                     settings=settings)
        print(f"{kind} index ready in {time.perf_counter() - t0:.1f} s")
    rec = corpus[corpus.position("5354212")] if "5354212" in corpus.cids else corpus[0]
    own = [Exclusion(cids=frozenset([rec.cid]))]

    def show(kind: str, query: str, n: int, line) -> list:
        t0 = time.perf_counter()
        examples = retrieve_examples(indexes[kind], [query], n, exclusions=own)[0]
        ms = (time.perf_counter() - t0) * 1000
        for e in examples:
            print("  " + line(e))
        print(f"  ({kind} retrieval: {ms:.1f} ms)")
        return examples

    print(f"\nmol2cap query (CID {rec.cid}, its own record excluded): {rec.smiles}")
    ex = show("graph", rec.smiles, 2,
              lambda e: f"CID {e.cid}  cosine {e.score:.3f}  {e.caption[:100]}")
    print(f"\n--- ICMA prompt ---\n{build_prompt('mol2cap', rec.smiles, ex).text}")
    print(f"\ncap2mol query: {rec.description[:100]}...")
    show("bm25", rec.description, 4, lambda e: f"CID {e.cid}  BM25 {e.score:.2f}  {e.smiles}")
    return 0
