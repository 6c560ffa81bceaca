"""The retrieval service's operations, without HTTP (vLLM's serving classes are the model).

``RetrievalService`` holds the state (settings, the corpus store, the metrics); each method takes
and returns protocol objects and raises ``icma.core.errors`` errors, which carry their HTTP status.
``app.py`` routes each endpoint to one method.
"""

from __future__ import annotations

import time
from typing import Sequence

from anyio import to_thread

from icma.core import chem
from icma.core.errors import InputError
from icma.core.names import check_name
from icma.core.prompts import MAX_CHARS, Example
from icma.core.rerank import RerankConfig, prompt_order
from icma.core.settings import Settings
from icma.retrieval import Exclusion
from icma.retrieval.examples import retrieve_examples, select_examples
from icma.retrieval.store import CorpusStore
from icma.server.http import Metrics, require_key_for_work
from icma.services.retrieval.protocol import (
    CaptionRequest,
    CaptionResponse,
    CaptionResult,
    CorporaResponse,
    CorpusInfo,
    ExampleOut,
    MoleculeRequest,
    MoleculeResponse,
    MoleculeResult,
    Timings,
)

#: Caption requests of at most this many BM25 or random queries run on the event loop.
INLINE_CAPTION_QUERIES = 8
#: Molecule requests of at most this many queries, and this many SMILES characters in all, are
#: searched on the event loop (a typical graph query costs about 3 ms of CPU on 2 cores; a loop
#: batch is at most 64 queries). The characters bound the cost before anything is parsed: a
#: query's cost grows with its atoms, to tens of ms at the default ICMA_MAX_HEAVY_ATOMS
#: (benchmarks/results/atoms.md), and in the thread pool a large request lets /healthz and the
#: small requests in between RDKit's calls instead of holding the loop for all of them.
INLINE_MOLECULE_QUERIES = 8
INLINE_MOLECULE_CHARS = 512


class RetrievalService:
    """Similar molecule-caption examples from the corpora of one ``CorpusStore``.

    The retrieve methods are coroutines to be awaited on the service's event loop: small requests
    are answered on the loop itself, larger ones in the thread pool (see the methods)."""

    def __init__(self, settings: Settings, store: CorpusStore | None = None,
                 metrics: Metrics | None = None):
        self.settings = settings
        self.store = store or CorpusStore(settings.data_dir, settings.retrieval_kinds,
                                          max_uploads=settings.max_corpora, settings=settings)
        self.metrics = metrics or Metrics("icma_retrieval")

    def start(self, background: bool = True) -> None:
        """Load the corpora. ``background=False`` builds missing indexes before returning
        (tests, scripts); otherwise a builder thread does, and ``state`` says when it is done."""
        self.store.start(background=background)

    def state(self) -> str:
        """"ready" once the default corpus can be searched; "failed" when building its
        indexes failed; else "loading"."""
        return "ready" if self.store.ready else "failed" if self.store.failed else "loading"

    def list_corpora(self) -> CorporaResponse:
        return CorporaResponse(default=self.store.default,
                               corpora=[CorpusInfo(**c) for c in self.store.describe()])

    def upload_corpus(self, name: str, filename: str | None, raw: bytes) -> CorpusInfo:
        """Store a TSV corpus (JSONL when ``filename`` ends in .jsonl or .ndjson) and queue its
        indexes. Blocks for the parse and write (and the build, when the store has no builder
        thread): call it from a thread."""
        require_key_for_work(self.settings.api_key, self.settings.allow_work_without_key,
                             "corpus uploads")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"upload is not UTF-8 text (byte {exc.start})", field="file") from None
        fmt = "jsonl" if (filename or "").lower().endswith((".jsonl", ".ndjson")) else "tsv"
        return CorpusInfo(**self.store.add(name, text, fmt).describe())

    async def retrieve_molecules(self, req: MoleculeRequest) -> MoleculeResponse:
        # A few queries (a few ms) are answered on the event loop, batched per loop turn with
        # the other small requests (icma.retrieval.batching.LoopBatcher): no thread hand-offs.
        # Larger batches go to the thread pool, so that they never hold the loop for long.
        smiles = [req.smiles] if isinstance(req.smiles, str) else req.smiles
        if len(smiles) > INLINE_MOLECULE_QUERIES or \
                sum(map(len, smiles)) > INLINE_MOLECULE_CHARS:
            return await to_thread.run_sync(self._molecules_in_thread, req)
        t0, queries, canonical, exclusions = self._molecule_queries(req)
        batcher = self.store.loop_searcher(req.corpus, req.method)
        t1 = time.perf_counter()
        rerank = _rerank(req)
        hits = await batcher.search(canonical, rerank.pool_size(req.k), exclusions)
        found = select_examples(batcher, hits, req.k, rerank, canonical)
        return self._molecule_response(req, batcher.corpus.name, t0, t1, queries, canonical,
                                       found)

    def _molecules_in_thread(self, req: MoleculeRequest) -> MoleculeResponse:
        t0, queries, canonical, exclusions = self._molecule_queries(req)
        index = self.store.searcher(req.corpus, req.method)
        t1 = time.perf_counter()
        found = retrieve_examples(index, canonical, req.k, rerank=_rerank(req),
                                  exclusions=exclusions, keys=canonical)
        return self._molecule_response(req, index.corpus.name, t0, t1, queries, canonical, found)

    def _molecule_queries(self, req: MoleculeRequest):
        t0 = time.perf_counter()
        queries = _queries(req.smiles, "smiles", self.settings)
        _check_k(req.k, self.settings)
        limit = self.settings.max_heavy_atoms
        _check_corpus(req.corpus)
        canonical = [chem.canonical_smiles(q, field=f"smiles[{i}]" if isinstance(req.smiles, list)
                                           else "smiles", max_heavy_atoms=limit)
                     for i, q in enumerate(queries)]
        cids = frozenset(req.exclude_cids)
        exclusions = [Exclusion(cids=cids, canonical_smiles=c if req.exclude_same_structure
                                else None) for c in canonical]
        return t0, queries, canonical, exclusions

    def _molecule_response(self, req: MoleculeRequest, corpus_name: str, t0: float, t1: float,
                           queries: list[str], canonical: list[str],
                           found: list[list[Example]]) -> MoleculeResponse:
        t2 = time.perf_counter()
        results = [MoleculeResult(query=q, canonical_smiles=c, examples=_out(ex, req.order))
                   for q, c, ex in zip(queries, canonical, found)]
        self.metrics.observe("molecules", req.method, t0, len(queries))
        return MoleculeResponse(corpus=corpus_name, method=req.method, k=req.k,
                                order=req.order, results=results, timings=_timings(t0, t1, t2))

    async def retrieve_captions(self, req: CaptionRequest) -> CaptionResponse:
        # A BM25 (or random) query takes ~0.3 ms of Python and NumPy that hold the GIL: a
        # thread-pool hand-off costs more than that, so small requests are answered on the event
        # loop, unbatched (a batcher would block the loop while another thread's batch runs).
        # Large batches and sentence embeddings (a transformer forward) go to the thread pool.
        n = 1 if isinstance(req.caption, str) else len(req.caption)
        if req.method != "sentence" and n <= INLINE_CAPTION_QUERIES:
            return self._captions(req, inline=True)
        return await to_thread.run_sync(self._captions, req, False)

    def _captions(self, req: CaptionRequest, inline: bool) -> CaptionResponse:
        t0 = time.perf_counter()
        queries = _queries(req.caption, "caption", self.settings)
        _check_k(req.k, self.settings)
        _check_corpus(req.corpus)
        index = (self.store.index if inline else self.store.searcher)(req.corpus, req.method)
        cids = frozenset(req.exclude_cids)
        exclusions = [Exclusion(cids=cids, caption=q if req.exclude_same_caption else None)
                      for q in queries]
        t1 = time.perf_counter()
        found = retrieve_examples(index, queries, req.k, rerank=_rerank(req),
                                  exclusions=exclusions)
        t2 = time.perf_counter()
        results = [CaptionResult(query=q, examples=_out(ex, req.order))
                   for q, ex in zip(queries, found)]
        self.metrics.observe("captions", req.method, t0, len(queries))
        return CaptionResponse(corpus=index.corpus.name, method=req.method, k=req.k,
                               order=req.order, results=results, timings=_timings(t0, t1, t2))


def _queries(value: str | list[str], name: str, settings: Settings) -> list[str]:
    queries = [value] if isinstance(value, str) else list(value)
    if not queries:
        raise InputError("empty list: give at least one query", field=name)
    if len(queries) > settings.max_batch:
        raise InputError(f"{len(queries)} queries in one request; at most {settings.max_batch}",
                         field=name)
    limit = MAX_CHARS[name]
    for i, q in enumerate(queries):
        where = f"{name}[{i}]" if isinstance(value, list) else name
        if not q.strip():
            raise InputError(f"empty {name}", field=where)
        if len(q) > limit:
            raise InputError(f"{name} longer than {limit} characters ({len(q)})", field=where)
    return queries


def _check_k(k: int, settings: Settings) -> None:
    if k > settings.max_k:
        raise InputError(f"k must be at most {settings.max_k}, got {k}", field="k")


def _check_corpus(name: str | None) -> None:
    if name is not None:  # (an empty name once meant the default corpus, silently)
        check_name(name, field="corpus", what="corpus name")


def _rerank(req: MoleculeRequest | CaptionRequest) -> RerankConfig:
    if req.random_walk is None:
        return RerankConfig()
    return RerankConfig(method="random_walk", skip_prob=req.random_walk.skip_probability,
                        seed=req.random_walk.seed)


def _out(best_first: Sequence[Example], order: str) -> list[ExampleOut]:
    ranked = [ExampleOut(cid=e.cid or "", smiles=e.smiles, description=e.caption,
                         score=float(e.score if e.score is not None else 0.0), rank=i + 1)
              for i, e in enumerate(best_first)]
    return prompt_order(ranked, order)  # type: ignore[arg-type]


def _timings(t0: float, t1: float, t2: float) -> Timings:
    return Timings(retrieval_ms=round((t2 - t1) * 1000, 3),
                   total_ms=round((time.perf_counter() - t0) * 1000, 3))
