"""Retrieval service: a thin HTTP shell over ``RetrievalService`` (serving.py), which holds the
state and the operations; here only the wiring and one route function per endpoint.

    icma serve retrieval --host 127.0.0.1 --port 8001
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile

from icma import __version__
from icma.core.settings import Settings, get_settings
from icma.retrieval.store import CorpusStore
from icma.server.http import ERROR_RESPONSES, BodyLimit, CrossOrigin, JsonBodyRoute, \
    api_key_dependency, install_error_handlers, install_health
from icma.services.retrieval.protocol import (
    CaptionRequest,
    CaptionResponse,
    CorporaResponse,
    CorpusInfo,
    MoleculeRequest,
    MoleculeResponse,
)
from icma.services.retrieval.serving import RetrievalService

UPLOAD_PATH = "/v1/corpora"
RETRIEVE_ERRORS = {**ERROR_RESPONSES, 503: {
    "model": ERROR_RESPONSES[422]["model"],
    "description": "the corpus's indexes are still building, or loading in this worker: "
                   "retry after the Retry-After header's seconds"}}

#: The guarded endpoints; ``create_app`` includes them behind the app's API key.
router = APIRouter(route_class=JsonBodyRoute)  # JSON bodies checked at the edge


def service(request: Request) -> RetrievalService:
    return request.app.state.service


def create_app(settings: Settings | None = None, store: CorpusStore | None = None,
               background: bool = True) -> FastAPI:
    """The app. ``background=False`` builds missing indexes before serving (tests, scripts)."""
    settings = settings or get_settings()
    svc = RetrievalService(settings, store)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.start(background=background)
        yield

    app = FastAPI(title="icma retrieval", version=__version__, lifespan=lifespan,
                  description="Similar molecule-caption examples for ICMA prompts: graph, "
                              "fingerprint and random retrieval for molecules, BM25 (and "
                              "sentence-embedding) retrieval for captions.")
    app.state.service, app.state.store, app.state.settings = svc, svc.store, settings
    install_error_handlers(app)
    svc.metrics.install(app)
    app.add_middleware(BodyLimit, default=settings.max_body_bytes,
                       limits={UPLOAD_PATH: settings.max_upload_bytes})
    app.add_middleware(CrossOrigin, allowed=settings.cors_origins)  # outermost: added last
    key = api_key_dependency(
        lambda: settings.api_key.get_secret_value() if settings.api_key else None)
    install_health(app, svc.metrics, svc.state)
    app.include_router(router, dependencies=[Depends(key)])
    return app


# Sync routes run in FastAPI's thread pool (the upload parses, and may build, a whole corpus);
# the retrieve routes are async because the service answers small requests on the event loop.

@router.get("/v1/corpora", response_model=CorporaResponse, tags=["corpora"],
            responses=ERROR_RESPONSES)
def corpora(request: Request):
    """Loaded corpora: sizes, checksums, index kinds and encoders, build state and progress."""
    return service(request).list_corpora()


@router.post(UPLOAD_PATH, response_model=CorpusInfo, status_code=202, tags=["corpora"],
             responses={**ERROR_RESPONSES, 403: {"description": "uploads need an API key"}})
def upload(request: Request,
           name: str = Form(..., description="corpus name (letters, digits, . _ -)"),
           file: UploadFile = File(..., description="TSV (CID, SMILES, description) or JSONL")):
    """Add a corpus; its indexes are built in the background (watch GET /v1/corpora)."""
    return service(request).upload_corpus(name, file.filename, file.file.read())


@router.post("/v1/retrieve/molecules", response_model=MoleculeResponse, tags=["retrieval"],
             responses=RETRIEVE_ERRORS)
async def retrieve_molecules(req: MoleculeRequest, request: Request):
    """Examples for molecules (mol2cap): graph (GNN cosine), Morgan or RDKit-path Tanimoto,
    or random; in prompt order (best last) unless ``order`` is ``ranked``."""
    return await service(request).retrieve_molecules(req)


@router.post("/v1/retrieve/captions", response_model=CaptionResponse, tags=["retrieval"],
             responses=RETRIEVE_ERRORS)
async def retrieve_captions(req: CaptionRequest, request: Request):
    """Examples for captions (cap2mol): BM25 (rank_bm25-exact), sentence embeddings when
    built, or random; in prompt order (best last) unless ``order`` is ``ranked``."""
    return await service(request).retrieve_captions(req)
