"""Translation worker: the HTTP routes over ``serving.TranslatorService``.

    icma serve worker --port 8000 --retrieval-url http://127.0.0.1:8001

Wiring only: each route hands its parsed request to one service method and returns what it
returns; errors carry their own status (``icma.core.errors``, mapped in ``icma.server.http``).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Literal

import anyio
from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse

from icma import __version__
from icma.core.chem import MAX_SMILES_CHARS
from icma.core.depict import DEFAULT_SIZE, SIZE_BOUNDS, Depiction
from icma.core.errors import InputError
from icma.core.settings import Settings, get_settings
from icma.generation.retrievers import Retriever
from icma.jobs.results import ResultStream
from icma.server.http import ERROR_RESPONSES, BodyLimit, CrossOrigin, JsonBodyRoute, \
    api_key_dependency, install_error_handlers, install_health
from icma.workers.translator.protocol import (
    Adapters,
    AnyJobCreate,
    Cap2MolRequest,
    Cap2MolResponse,
    DepictRequest,
    Job,
    JobList,
    JobMetrics,
    Mol2CapRequest,
    Mol2CapResponse,
)
from icma.workers.translator.page import install_page
from icma.workers.translator.serving import JOBS_PATH, TranslatorService

WORKER_ERRORS = {
    **ERROR_RESPONSES,
    404: {"model": ERROR_RESPONSES[422]["model"], "description": "unknown adapter, corpus or job"},
    503: {"model": ERROR_RESPONSES[422]["model"],
          "description": "the retrieval service is down, or the engine is still loading"},
}
JOB_ERRORS = {**WORKER_ERRORS, 429: {"model": ERROR_RESPONSES[422]["model"],
                                     "description": "the job queue is full"}}
RESULTS_ERRORS = {**WORKER_ERRORS, 429: {"model": ERROR_RESPONSES[422]["model"],
                                         "description": "too many result streams are open"}}

router = APIRouter(route_class=JsonBodyRoute)  # JSON bodies checked at the edge


async def service(request: Request) -> TranslatorService:  # async: no thread-pool hop
    return request.app.state.service


def accepted(job: Job) -> JSONResponse:
    return JSONResponse(job.model_dump(), status_code=202,
                        headers={"Location": f"{JOBS_PATH}/{job.id}"})


@router.post("/mol2cap", response_model=Mol2CapResponse, tags=["translate"],
             responses=WORKER_ERRORS)
def mol2cap(req: Mol2CapRequest, svc: TranslatorService = Depends(service)):
    """A caption for a molecule, written by the LLM from retrieved similar examples."""
    return svc.mol2cap(req)


@router.post("/cap2mol", response_model=Cap2MolResponse, tags=["translate"],
             responses=WORKER_ERRORS)
def cap2mol(req: Cap2MolRequest, svc: TranslatorService = Depends(service)):
    """A molecule for a caption, checked with RDKit; with ``num_candidates`` > 1, sampled
    again until one is valid."""
    return svc.cap2mol(req)


@router.get("/v1/adapters", response_model=Adapters, tags=["adapters"],
            responses=ERROR_RESPONSES)
def adapters(svc: TranslatorService = Depends(service)):
    """Adapters this worker can apply (folders of the registry directory; new ones are
    served at once)."""
    return svc.adapters()


@router.post(JOBS_PATH, response_model=Job, status_code=202, tags=["jobs"],
             responses=JOB_ERRORS)
def create_job(req: AnyJobCreate, svc: TranslatorService = Depends(service)):
    """Queue a job. ``kind: translate`` (the default): a batch translation; follow it at
    GET /v1/jobs/{id}, read its results (JSON lines, input order) at
    GET /v1/jobs/{id}/results. ``kind: tune``: in-context molecule tuning; GET
    /v1/jobs/{id} reports its phase, step, loss and ETA, and on success the adapter is in
    GET /v1/adapters under ``options.name``."""
    return accepted(svc.create_job(req))


@router.post(JOBS_PATH + "/upload", response_model=Job, status_code=202, tags=["jobs"],
             responses=JOB_ERRORS)
def upload_job(task: str = Form(..., description="mol2cap or cap2mol"),
               kind: Literal["translate", "tune"] = Form("translate"),
               file: UploadFile | None = File(None, description="translate: JSONL (input, id, "
                                                                 "reference) or a corpus TSV "
                                                                 "(CID SMILES description)"),
               options_json: str = Form("{}", alias="options",
                                        description="JobOptions (translate) or TuneOptions "
                                                    "(tune) as JSON"),
               train: UploadFile | None = File(None, description="tune: the training corpus "
                                                                 "(TSV or .jsonl)"),
               contexts: UploadFile | None = File(None, description="tune: the corpus the "
                                                                    "examples come from"),
               eval: UploadFile | None = File(None, description="tune: the evaluation corpus"),
               svc: TranslatorService = Depends(service)):
    """Queue a job from files. ``kind: translate``: inputs from ``file`` (JSON lines or a
    corpus TSV). ``kind: tune``: a tuning run on corpora uploaded as ``train``, ``contexts``
    and ``eval`` (kept by the server until the job ends), the rest of its settings in
    ``options``."""
    if kind == "tune":
        uploads = {name: (f.filename, f.file.read()) for name, f in
                   (("train", train), ("contexts", contexts), ("eval", eval)) if f is not None}
        return accepted(svc.upload_tune_job(task, options_json, uploads))
    if file is None:
        raise InputError("a translation job's inputs are uploaded as 'file'", field="file")
    return accepted(svc.upload_job(task, file.filename, file.file.read(), options_json))


@router.get(JOBS_PATH, response_model=JobList, tags=["jobs"], responses=ERROR_RESPONSES)
def list_jobs(state: str | None = Query(default=None, pattern="^(queued|running|succeeded|"
                                                              "failed|cancelled)$"),
              limit: int = Query(default=100, ge=1, le=1000),
              svc: TranslatorService = Depends(service)):
    """Jobs, newest first."""
    return svc.list_jobs(state, limit)


@router.get(JOBS_PATH + "/{job_id}", response_model=Job, tags=["jobs"],
            responses=WORKER_ERRORS)
def get_job(job_id: str, svc: TranslatorService = Depends(service)):
    """State and progress counts of one job."""
    return svc.get_job(job_id)


@router.get(JOBS_PATH + "/{job_id}/results", tags=["jobs"],
            responses={**RESULTS_ERRORS, 200: {"content": {"application/x-ndjson": {}},
                                              "description": "one JSON line per input"}})
def job_results(job_id: str, follow: bool = Query(
        default=True, description="wait for unfinished items until the job ends; false: "
                                  "stop at the first unfinished one"),
                svc: TranslatorService = Depends(service)):
    """Results as JSON lines in input order, streamed (``icma eval --format jsonl`` reads
    them)."""
    return ResultsResponse(svc.job_results(job_id, follow))


class ResultsResponse(StreamingResponse):
    """A job's result stream that closes it however the response ends, which gives its follower
    place back. It listens for the client leaving while it waits for lines: under ASGI 2.4
    Starlette's StreamingResponse would notice only at its next write, and a followed job may
    write nothing for a long time."""

    def __init__(self, stream: ResultStream):
        super().__init__(stream, media_type="application/x-ndjson")
        self.stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def respond() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client left in the middle of a write
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(respond)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.stream.lines.aclose()  # type: ignore[attr-defined]
            self.stream.close()


@router.get(JOBS_PATH + "/{job_id}/metrics", response_model=JobMetrics, tags=["jobs"],
            responses={**WORKER_ERRORS, 409: {"model": ERROR_RESPONSES[422]["model"],
                                              "description": "the job has not ended, is a "
                                                             "tune job, or had no references"}})
def job_metrics(job_id: str, svc: TranslatorService = Depends(service)):
    """MolT5's metrics over a finished translation job's inputs that had a reference (what
    `icma eval` reports for its result lines, without FCD)."""
    return svc.job_metrics(job_id)


SVG_RESPONSE = {200: {"content": {"image/svg+xml": {}},
                      "description": "the drawing; headers X-Heavy-Atoms, and with a reference "
                                     "X-Shared-Atoms and X-MCS-Complete (false: the search hit "
                                     "its time limit)"}}


def svg(d: Depiction) -> Response:
    headers = {"X-Heavy-Atoms": str(d.heavy_atoms),
               "Cache-Control": "private, max-age=86400"}  # a drawing of an input never changes
    if d.shared_atoms is not None:
        headers["X-Shared-Atoms"] = str(d.shared_atoms)
        headers["X-MCS-Complete"] = "true" if d.mcs_complete else "false"
    return Response(d.svg, media_type="image/svg+xml", headers=headers)


@router.post("/v1/depict", tags=["depict"], response_class=Response,
             responses={**ERROR_RESPONSES, **SVG_RESPONSE})
def depict_post(req: DepictRequest, svc: TranslatorService = Depends(service)):
    """A molecule drawn as SVG (RDKit); with ``reference``, the atoms it shares with that
    molecule highlighted."""
    return svg(svc.depict(req))


@router.get("/v1/depict", tags=["depict"], response_class=Response,
            responses={**ERROR_RESPONSES, **SVG_RESPONSE})
def depict_get(smiles: str = Query(min_length=1, max_length=MAX_SMILES_CHARS),
               reference: str | None = Query(default=None, max_length=MAX_SMILES_CHARS),
               width: int = Query(default=DEFAULT_SIZE[0], ge=SIZE_BOUNDS[0],
                                  le=SIZE_BOUNDS[1]),
               height: int = Query(default=DEFAULT_SIZE[1], ge=SIZE_BOUNDS[0],
                                   le=SIZE_BOUNDS[1]),
               svc: TranslatorService = Depends(service)):
    """POST /v1/depict with the fields as query parameters (a link to a drawing)."""
    return svg(svc.depict(DepictRequest(smiles=smiles, reference=reference, width=width,
                                        height=height)))


@router.delete(JOBS_PATH + "/{job_id}", response_model=Job, tags=["jobs"],
               responses=WORKER_ERRORS)
def cancel_job(job_id: str, svc: TranslatorService = Depends(service)):
    """Cancel a queued or running job (results so far are kept)."""
    return svc.cancel_job(job_id)


def create_app(settings: Settings | None = None, retriever: Retriever | None = None,
               engine_loader=None) -> FastAPI:
    settings = settings or get_settings()
    svc = TranslatorService(settings, retriever, engine_loader)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.start()
        yield
        svc.stop()

    app = FastAPI(title="icma worker", version=__version__, lifespan=lifespan,
                  description="ICMA translation: molecule to caption and caption to molecule "
                              "with retrieved in-context examples, batch jobs and LoRA "
                              "adapters.")
    app.state.service = svc
    install_error_handlers(app)
    svc.metrics.install(app)
    app.add_middleware(BodyLimit, default=settings.max_body_bytes,
                       limits={JOBS_PATH: settings.max_upload_bytes})
    app.add_middleware(CrossOrigin, allowed=settings.cors_origins)  # outermost: added last
    install_health(app, svc.metrics, svc.state)
    key = api_key_dependency(
        lambda: settings.api_key.get_secret_value() if settings.api_key else None)
    app.include_router(router, dependencies=[Depends(key)])
    install_page(app, settings)
    return app
