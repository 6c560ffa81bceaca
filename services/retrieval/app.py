"""Retrieval service: a thin HTTP shell over icma.retrieval, icma.core.rerank and icma.retrieval.store.

    icma serve retrieval --host 127.0.0.1 --port 8001
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Sequence

from fastapi import Depends, FastAPI, File, Form, UploadFile
from starlette.concurrency import run_in_threadpool

from icma import __version__

from icma.core import chem
from icma.retrieval.store import CorpusStore
from icma.core.errors import InputError
from icma.retrieval.examples import retrieve_examples, select_examples
from icma.core.prompts import Example
from icma.core.rerank import RerankConfig, prompt_order
from icma.retrieval import Exclusion
from icma.core.settings import Settings, get_settings
from icma.server.http import ERROR_RESPONSES, ApiError, BodyLimit, Metrics, api_key_dependency, \
    install_error_handlers, install_health
from icma.services.retrieval.protocol import (
    MAX_LENGTHS,
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

UPLOAD_PATH = "/v1/corpora"
#: Caption requests of at most this many BM25 or random queries run on the event loop.
INLINE_CAPTION_QUERIES = 8
#: Molecule requests of at most this many queries are searched on the event loop (a graph query
#: costs about 3 ms of CPU on 2 cores; a loop batch is at most 64 queries).
INLINE_MOLECULE_QUERIES = 8


def create_app(settings: Settings | None = None, store: CorpusStore | None = None,
               background: bool = True) -> FastAPI:
    """The app. ``background=False`` builds missing indexes before serving (tests, scripts)."""
    settings = settings or get_settings()
    store = store or CorpusStore(settings.data_dir, settings.retrieval_kinds,
                                 max_uploads=settings.max_corpora, settings=settings)
    metrics = Metrics("icma_retrieval")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store.start(background=background)
        yield

    app = FastAPI(title="icma retrieval", version=__version__, lifespan=lifespan,
                  description="Similar molecule-caption examples for ICMA prompts: graph, "
                              "fingerprint and random retrieval for molecules, BM25 (and "
                              "sentence-embedding) retrieval for captions.")
    app.state.store, app.state.settings = store, settings
    install_error_handlers(app)
    metrics.install(app)
    app.add_middleware(BodyLimit, default=settings.max_body_bytes,
                       limits={UPLOAD_PATH: settings.max_upload_bytes})
    key = api_key_dependency(
        lambda: settings.api_key.get_secret_value() if settings.api_key else None)
    guarded = [Depends(key)]

    install_health(app, metrics, lambda: "ready" if store.ready else "loading")

    @app.get("/v1/corpora", response_model=CorporaResponse, dependencies=guarded,
             tags=["corpora"], responses=ERROR_RESPONSES)
    def corpora():
        """Loaded corpora: sizes, checksums, index kinds and encoders, build state and progress."""
        return CorporaResponse(default=store.default,
                               corpora=[CorpusInfo(**c) for c in store.describe()])

    @app.post(UPLOAD_PATH, response_model=CorpusInfo, status_code=202, dependencies=guarded,
              tags=["corpora"], responses={**ERROR_RESPONSES,
                                           403: {"description": "uploads need an API key"}})
    def upload(name: str = Form(..., description="corpus name (letters, digits, . _ -)"),
               file: UploadFile = File(..., description="TSV (CID, SMILES, description) or JSONL")):
        """Add a corpus; its indexes are built in the background (watch GET /v1/corpora)."""
        if settings.api_key is None:
            raise ApiError(403, "forbidden", "corpus uploads are disabled: set ICMA_API_KEY to "
                           "enable them", "file")
        raw = file.file.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"upload is not UTF-8 text (byte {exc.start})", field="file") from None
        fmt = "jsonl" if (file.filename or "").lower().endswith((".jsonl", ".ndjson")) else "tsv"
        entry = store.add(name, text, fmt)
        return CorpusInfo(**entry.describe())

    @app.post("/v1/retrieve/molecules", response_model=MoleculeResponse, dependencies=guarded,
              tags=["retrieval"], responses=ERROR_RESPONSES)
    async def retrieve_molecules(req: MoleculeRequest):
        """Examples for molecules (mol2cap): graph (GNN cosine), Morgan or RDKit-path Tanimoto,
        or random; in prompt order (best last) unless ``order`` is ``ranked``."""
        # A few queries (a few ms) are answered on the event loop, batched per loop turn with
        # the other small requests (icma.retrieval.batching.LoopBatcher): no thread hand-offs. Larger
        # batches go to the thread pool, so that they never hold the loop for long.
        n = 1 if isinstance(req.smiles, str) else len(req.smiles)
        if n > INLINE_MOLECULE_QUERIES:
            return await run_in_threadpool(molecules_in_thread, req)
        t0, queries, canonical, exclusions = molecule_queries(req)
        batcher = store.loop_searcher(req.corpus, req.method)
        t1 = time.perf_counter()
        rerank = _rerank(req)
        hits = await batcher.search(canonical, rerank.pool_size(req.k), exclusions)
        found = select_examples(batcher, hits, req.k, rerank, canonical)
        return molecule_response(req, batcher.corpus.name, t0, t1, queries, canonical, found)

    def molecules_in_thread(req: MoleculeRequest) -> MoleculeResponse:
        t0, queries, canonical, exclusions = molecule_queries(req)
        index = store.searcher(req.corpus, req.method)
        t1 = time.perf_counter()
        found = retrieve_examples(index, canonical, req.k, rerank=_rerank(req),
                                  exclusions=exclusions, keys=canonical)
        return molecule_response(req, index.corpus.name, t0, t1, queries, canonical, found)

    def molecule_queries(req: MoleculeRequest):
        t0 = time.perf_counter()
        queries = _queries(req.smiles, "smiles", settings)
        _check_k(req.k, settings)
        canonical = [chem.canonical_smiles(q, field=f"smiles[{i}]" if isinstance(req.smiles, list)
                                           else "smiles") for i, q in enumerate(queries)]
        cids = frozenset(req.exclude_cids)
        exclusions = [Exclusion(cids=cids, canonical_smiles=c if req.exclude_same_structure
                                else None) for c in canonical]
        return t0, queries, canonical, exclusions

    def molecule_response(req, corpus_name, t0, t1, queries, canonical, found):
        t2 = time.perf_counter()
        results = [MoleculeResult(query=q, canonical_smiles=c, examples=_out(ex, req.order))
                   for q, c, ex in zip(queries, canonical, found)]
        metrics.observe("molecules", req.method, t0, len(queries))
        return MoleculeResponse(corpus=corpus_name, method=req.method, k=req.k,
                                order=req.order, results=results, timings=_timings(t0, t1, t2))

    @app.post("/v1/retrieve/captions", response_model=CaptionResponse, dependencies=guarded,
              tags=["retrieval"], responses=ERROR_RESPONSES)
    async def retrieve_captions(req: CaptionRequest):
        """Examples for captions (cap2mol): BM25 (rank_bm25-exact), sentence embeddings when
        built, or random; in prompt order (best last) unless ``order`` is ``ranked``."""
        # A BM25 (or random) query takes ~0.3 ms of Python and NumPy that hold the GIL: a
        # thread-pool hand-off costs more than that, so small requests are answered on the event
        # loop, unbatched (a batcher would block the loop while another thread's batch runs).
        # Large batches and sentence embeddings (a transformer forward) go to the thread pool.
        n = 1 if isinstance(req.caption, str) else len(req.caption)
        if req.method != "sentence" and n <= INLINE_CAPTION_QUERIES:
            return captions(req, inline=True)
        return await run_in_threadpool(captions, req, inline=False)

    def captions(req: CaptionRequest, inline: bool) -> CaptionResponse:
        t0 = time.perf_counter()
        queries = _queries(req.caption, "caption", settings)
        _check_k(req.k, settings)
        index = (store.index if inline else store.searcher)(req.corpus, req.method)
        cids = frozenset(req.exclude_cids)
        exclusions = [Exclusion(cids=cids, caption=q if req.exclude_same_caption else None)
                      for q in queries]
        t1 = time.perf_counter()
        found = retrieve_examples(index, queries, req.k, rerank=_rerank(req),
                                  exclusions=exclusions)
        t2 = time.perf_counter()
        results = [CaptionResult(query=q, examples=_out(ex, req.order))
                   for q, ex in zip(queries, found)]
        metrics.observe("captions", req.method, t0, len(queries))
        return CaptionResponse(corpus=index.corpus.name, method=req.method, k=req.k,
                               order=req.order, results=results, timings=_timings(t0, t1, t2))

    return app


def _queries(value: str | list[str], name: str, settings: Settings) -> list[str]:
    queries = [value] if isinstance(value, str) else list(value)
    if not queries:
        raise InputError("empty list: give at least one query", field=name)
    if len(queries) > settings.max_batch:
        raise InputError(f"{len(queries)} queries in one request; at most {settings.max_batch}",
                         field=name)
    limit = MAX_LENGTHS[name]
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


def _rerank(req) -> RerankConfig:
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
