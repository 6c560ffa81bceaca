"""Translation worker: a thin HTTP shell over icma.generation.pipeline, icma.generation.scheduler and icma.jobs.store.

    icma serve worker --port 8000 --retrieval-url http://127.0.0.1:8001

One engine per process, owned by one thread (``GenerationQueue``); requests and job batches wait
for it, interactive requests first. Retrieval is the retrieval service's, over HTTP.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Sequence

from fastapi import Depends, FastAPI, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import Gauge
from pydantic import ValidationError

from icma import __version__
from icma.generation.adapters import AdapterRegistry
from icma.generation.engines import Adapter, Generation, GenerationInput, GenerationParams, Generator, \
    load_engine
from icma.core.errors import InputError
from icma.jobs.store import Item, JobConflict, JobRunner, JobStore, iter_results, parse_items
from icma.generation.pipeline import DEFAULT_SHOTS, Options, Outcome, batch_translator, run_batch
from icma.generation.retrievers import METHODS, HttpRetriever, RetrievalOptions, Retriever
from icma.generation.scheduler import BATCH, INTERACTIVE, GenerationQueue
from icma.core.settings import Settings, get_settings
from icma.tuning import parse_config
from icma.jobs.tune import TuneRunner
from icma.tuning.run import check_sources
from icma.server.http import ERROR_RESPONSES, BodyLimit, Metrics, api_key_dependency, \
    install_error_handlers, install_health
from icma.workers.translator.protocol import (
    AdapterOut,
    Adapters,
    AnyJobCreate,
    Cap2MolRequest,
    Cap2MolResponse,
    ExampleUsed,
    Job,
    JobList,
    JobOptions,
    Mol2CapRequest,
    Mol2CapResponse,
    TranslationTimings,
    Usage,
)

JOBS_PATH = "/v1/jobs"
WORKER_ERRORS = {
    **ERROR_RESPONSES,
    404: {"model": ERROR_RESPONSES[422]["model"], "description": "unknown adapter, corpus or job"},
    503: {"model": ERROR_RESPONSES[422]["model"],
          "description": "the retrieval service is down, or the engine is still loading"},
}


class QueuedEngine(Generator):
    """The engine as seen by one caller: ``generate`` waits in the engine thread's queue at
    ``priority``. Token counting (for the prompt budget) runs in the caller's thread."""

    def __init__(self, queue: GenerationQueue, priority: int):
        self.queue, self.priority = queue, priority

    def generate(self, inputs: Sequence[GenerationInput], params: GenerationParams,
                 adapter: Adapter | None = None) -> list[Generation]:
        return self.queue.generate(inputs, params, adapter, self.priority)

    def count_tokens(self, text: str) -> int | None:
        return self.queue.check_ready().count_tokens(text)


def create_app(settings: Settings | None = None, retriever: Retriever | None = None,
               engine_loader=None) -> FastAPI:
    settings = settings or get_settings()
    retriever = retriever or HttpRetriever.from_settings(settings)
    queue = GenerationQueue(engine_loader or (lambda: load_engine(settings.engine,
                                                                  model=settings.llm_model)),
                            max_batch=max(settings.job_batch_size, 64))
    registry = AdapterRegistry(settings.adapters_path())
    store = JobStore(settings.jobs_path())
    metrics = Metrics("icma_worker")
    Gauge("icma_worker_engine_queue_prompts", "Prompts waiting for the engine",
          registry=metrics.registry).set_function(queue.depth)
    Gauge("icma_worker_engine_busy_seconds", "Seconds the engine spent generating",
          registry=metrics.registry).set_function(lambda: queue.busy_seconds)
    Gauge("icma_worker_jobs_active", "Queued and running jobs",
          registry=metrics.registry).set_function(store.count_active)
    interactive, batch = QueuedEngine(queue, INTERACTIVE), QueuedEngine(queue, BATCH)

    def options(task: str, req, n_shot: int | None, num_candidates: int = 1) -> Options:
        n_shot = DEFAULT_SHOTS[task] if n_shot is None else n_shot
        if n_shot > settings.max_k:
            raise InputError(f"must be at most {settings.max_k}, got {n_shot}", field="n_shot")
        if num_candidates > settings.max_candidates:
            raise InputError(f"must be at most {settings.max_candidates}, got "
                             f"{num_candidates}", field="num_candidates")
        if num_candidates > 1 and req.generation.decoding != "sample":
            raise InputError("more than one candidate needs decoding 'sample' (greedy and beam "
                             "search give the same molecule every time)", field="num_candidates")
        r = req.retrieval
        if r.method is not None and r.method not in METHODS[task]:
            raise InputError(f"{r.method!r} does not retrieve for {task}; use one of "
                             f"{', '.join(METHODS[task])}", field="retrieval.method")
        g = req.generation.model_dump()
        if g["repetition_penalty"] is None:
            del g["repetition_penalty"]
        adapter, prime = None, req.prime_answer
        if req.adapter:
            info = registry.get(req.adapter)
            adapter = info.as_adapter()
            if info.task and info.task != task:
                raise InputError(f"adapter {info.name!r} was tuned for {info.task}, not {task}",
                                 field="adapter")
            tuned_prime = (info.manifest.get("prompt") or {}).get("prime_answer")
            if prime is None and isinstance(tuned_prime, bool):
                prime = tuned_prime  # serve it with the prompt form it learned
        return Options(
            n_shot=n_shot,
            retrieval=RetrievalOptions(
                method=r.method, corpus=r.corpus, exclude_cids=tuple(r.exclude_cids),
                exclude_same=r.exclude_same_structure if task == "mol2cap"
                else r.exclude_same_caption,
                random_walk=None if r.random_walk is None else (r.random_walk.skip_probability,
                                                                r.random_walk.seed)),
            params=GenerationParams.for_task(task, **g), adapter=adapter,
            prime_answer=prime, cutoff=req.cutoff, num_candidates=num_candidates)

    def job_options(task: str, raw: dict) -> Options:
        opts = JobOptions.model_validate(raw)
        return options(task, opts, opts.n_shot, opts.num_candidates)

    runner = JobRunner(store, batch_translator(retriever, batch, job_options),
                       batch_size=settings.job_batch_size)
    tuner = TuneRunner(store, settings.data_dir, settings.adapters_path())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        queue.start()
        runner.start()  # (also queues jobs left running by a stopped worker again)
        tuner.start()
        yield
        tuner.stop()
        runner.stop()
        queue.stop()
        store.close()

    app = FastAPI(title="icma worker", version=__version__, lifespan=lifespan,
                  description="ICMA translation: molecule to caption and caption to molecule "
                              "with retrieved in-context examples, batch jobs and LoRA "
                              "adapters.")
    app.state.settings, app.state.queue, app.state.store = settings, queue, store
    app.state.tuner = tuner
    install_error_handlers(app)
    metrics.install(app)
    app.add_middleware(BodyLimit, default=settings.max_body_bytes,
                       limits={JOBS_PATH: settings.max_upload_bytes})
    key = api_key_dependency(
        lambda: settings.api_key.get_secret_value() if settings.api_key else None)
    guarded = [Depends(key)]

    install_health(app, metrics, lambda: "ready" if queue.ready else
                   ("failed" if queue.error else "loading"))

    def translated(task: str, out: Outcome, opts: Options, t0: float, return_prompt: bool):
        t = out.translation
        engine = queue.check_ready()
        timings = TranslationTimings(**{k: round(v, 3) for k, v in out.timings.items()},
                          total_ms=round((time.perf_counter() - t0) * 1e3, 3))
        return dict(
            examples=[ExampleUsed(cid=e.cid or "", smiles=e.smiles, description=e.caption,
                                  score=float(e.score if e.score is not None else 0.0),
                                  rank=i + 1) for i, e in enumerate(t.examples)],
            n_examples_dropped=t.dropped, engine=engine.name, model=engine.model,
            adapter=opts.adapter.name if opts.adapter else None,
            prime_answer=opts.prompt_options().prime_answer, finish_reason=t.finish_reason,
            usage=Usage(prompt_tokens=t.prompt_tokens, completion_tokens=t.completion_tokens),
            timings=timings, prompt=out.prompt if return_prompt else None)

    def one(task: str, query: str, opts: Options) -> Outcome:
        queue.check_ready()
        out = run_batch(task, [query], opts, retriever, interactive)[0]
        if out.error is not None:
            raise out.error
        return out

    @app.post("/mol2cap", response_model=Mol2CapResponse, dependencies=guarded,
              tags=["translate"], responses=WORKER_ERRORS)
    def mol2cap(req: Mol2CapRequest):
        """A caption for a molecule, written by the LLM from retrieved similar examples."""
        t0 = time.perf_counter()
        opts = options("mol2cap", req, req.n_shot)
        out = one("mol2cap", req.smiles, opts)
        metrics.observe("mol2cap", opts.retrieval.method_for("mol2cap"), t0, 1)
        return Mol2CapResponse(caption=out.translation.answer,
                               **translated("mol2cap", out, opts, t0, req.return_prompt))

    @app.post("/cap2mol", response_model=Cap2MolResponse, dependencies=guarded,
              tags=["translate"], responses=WORKER_ERRORS)
    def cap2mol(req: Cap2MolRequest):
        """A molecule for a caption, checked with RDKit; with ``num_candidates`` > 1, sampled
        again until one is valid."""
        t0 = time.perf_counter()
        opts = options("cap2mol", req, req.n_shot, req.num_candidates)
        out = one("cap2mol", req.caption, opts)
        t = out.translation
        metrics.observe("cap2mol", opts.retrieval.method_for("cap2mol"), t0, 1)
        return Cap2MolResponse(smiles=t.answer, canonical_smiles=t.canonical,
                               valid=bool(t.valid), candidates_tried=out.candidates_tried,
                               **translated("cap2mol", out, opts, t0, req.return_prompt))

    @app.get("/v1/adapters", response_model=Adapters, dependencies=guarded, tags=["adapters"],
             responses=ERROR_RESPONSES)
    def adapters():
        """Adapters this worker can apply (folders of the registry directory; new ones are
        served at once)."""
        return Adapters(directory=str(registry.root), adapters=[
            AdapterOut(name=a.name, base_model=a.base_model, r=a.r, lora_alpha=a.lora_alpha,
                       target_modules=a.target_modules, task=a.task,
                       prime_answer=(a.manifest.get("prompt") or {}).get("prime_answer"),
                       evaluation=_evaluation(a.manifest)) for a in registry.list()])

    def job_out(job) -> Job:
        return Job(id=job.id, kind=job.kind, task=job.task, state=job.state, total=job.total,
                   done=job.done, failed=job.failed,
                   progress=round(job.done / job.total, 4) if job.total else 1.0,
                   created=job.created, started=job.started, finished=job.finished,
                   message=job.message, options=job.options,
                   results_url=f"{JOBS_PATH}/{job.id}/results" if job.kind == "translate"
                   else None, tuning=job.progress if job.kind == "tune" else None)

    def submit(task: str, items: list[Item], opts: JobOptions) -> JSONResponse:
        if len(items) > settings.max_job_items:
            raise InputError(f"{len(items)} items; a job takes at most "
                             f"{settings.max_job_items}", field="items")
        options(task, opts, opts.n_shot, opts.num_candidates)  # refuse bad options now
        job = store.create("translate", task, opts.model_dump(exclude_defaults=True), items,
                           max_active=settings.max_jobs)
        runner.wake()
        return JSONResponse(job_out(job).model_dump(), status_code=202,
                            headers={"Location": f"{JOBS_PATH}/{job.id}"})

    job_responses = {**WORKER_ERRORS, 429: {"model": ERROR_RESPONSES[422]["model"],
                                            "description": "the job queue is full"}}

    @app.post(JOBS_PATH, response_model=Job, status_code=202, dependencies=guarded,
              tags=["jobs"], responses=job_responses)
    def create_job(req: AnyJobCreate):
        """Queue a job. ``kind: translate`` (the default): a batch translation; follow it at
        GET /v1/jobs/{id}, read its results (JSON lines, input order) at
        GET /v1/jobs/{id}/results. ``kind: tune``: in-context molecule tuning; GET
        /v1/jobs/{id} reports its phase, step, loss and ETA, and on success the adapter is in
        GET /v1/adapters under ``options.name``."""
        if req.kind == "tune":
            return submit_tune(req.task, req.options.model_dump(exclude_unset=True))
        items = [Item(x) if isinstance(x, str) else Item(x.input, x.id, x.reference)
                 for x in req.items]
        return submit(req.task, items, req.options)

    def submit_tune(task: str, raw: dict) -> JSONResponse:
        try:
            cfg = parse_config({**raw, "task": task})  # cross-field checks, as the CLI's
            check_sources(cfg, settings.data_dir)
        except InputError as exc:
            raise exc.at(f"options.{exc.field}") from None
        if (registry.root / cfg.name).exists():
            raise JobConflict(f"adapter {cfg.name!r} exists already; choose another name",
                              field="options.name")
        for other in store.list("queued") + store.list("running"):
            if other.kind == "tune" and other.options.get("name") == cfg.name:
                raise JobConflict(f"job {other.id} is tuning {cfg.name!r} already",
                                  field="options.name")
        job = store.create("tune", task, raw, [], max_active=settings.max_jobs)
        tuner.wake()
        return JSONResponse(job_out(job).model_dump(), status_code=202,
                            headers={"Location": f"{JOBS_PATH}/{job.id}"})

    @app.post(JOBS_PATH + "/upload", response_model=Job, status_code=202, dependencies=guarded,
              tags=["jobs"], responses=job_responses)
    def upload_job(task: str = Form(..., description="mol2cap or cap2mol"),
                   file: UploadFile = File(..., description="JSONL (input, id, reference) or "
                                                            "a corpus TSV (CID SMILES "
                                                            "description)"),
                   options_json: str = Form("{}", alias="options",
                                            description="JobOptions as JSON")):
        """Queue a job from a file: JSON lines or a corpus TSV."""
        if task not in DEFAULT_SHOTS:
            raise InputError(f"unknown task {task!r}; use mol2cap or cap2mol", field="task")
        try:
            opts = JobOptions.model_validate_json(options_json)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InputError(f"{first['msg']}" + (f" (at {where})" if where else ""),
                             field="options") from None
        try:
            text = file.file.read().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"not UTF-8 text (byte {exc.start})", field="file") from None
        name = (file.filename or "").lower()
        fmt = "jsonl" if name.endswith((".jsonl", ".ndjson", ".json")) else "tsv"
        return submit(task, parse_items(task, text, fmt, where="file"), opts)

    @app.get(JOBS_PATH, response_model=JobList, dependencies=guarded, tags=["jobs"],
             responses=ERROR_RESPONSES)
    def list_jobs(state: str | None = Query(default=None, pattern="^(queued|running|succeeded|"
                                                                  "failed|cancelled)$"),
                  limit: int = Query(default=100, ge=1, le=1000)):
        """Jobs, newest first."""
        return JobList(jobs=[job_out(j) for j in store.list(state, limit)])

    @app.get(JOBS_PATH + "/{job_id}", response_model=Job, dependencies=guarded, tags=["jobs"],
             responses=WORKER_ERRORS)
    def get_job(job_id: str):
        """State and progress counts of one job."""
        return job_out(store.get(job_id))

    @app.get(JOBS_PATH + "/{job_id}/results", dependencies=guarded, tags=["jobs"],
             responses={**WORKER_ERRORS, 200: {"content": {"application/x-ndjson": {}},
                                               "description": "one JSON line per input"}})
    def job_results(job_id: str, follow: bool = Query(
            default=True, description="wait for unfinished items until the job ends; false: "
                                      "stop at the first unfinished one")):
        """Results as JSON lines in input order, streamed (``icma eval --format jsonl`` reads
        them)."""
        if store.get(job_id).kind != "translate":  # 404 before the stream starts
            raise JobConflict("a tune job has no result lines: GET /v1/jobs/{id} reports it "
                              "and its adapter is listed at GET /v1/adapters", field="job_id")
        return StreamingResponse(iter_results(store, job_id, follow=follow),
                                 media_type="application/x-ndjson")

    @app.delete(JOBS_PATH + "/{job_id}", response_model=Job, dependencies=guarded,
                tags=["jobs"], responses=WORKER_ERRORS)
    def cancel_job(job_id: str):
        """Cancel a queued or running job (results so far are kept)."""
        return job_out(store.cancel(job_id))

    return app


def _evaluation(manifest: dict) -> dict | None:
    ev = manifest.get("evaluation") or {}
    metrics = ev.get("metrics")
    if not metrics:
        return None
    return {"split": ev.get("split"), "n": ev.get("n"),
            **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
