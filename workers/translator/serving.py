"""The translation worker's state and operations, without HTTP (vLLM's serving classes are the
model): ``app.py`` routes each endpoint to one method here, and tests call them directly.

One engine per process, owned by one thread (``GenerationQueue``); requests and job batches
wait for it, interactive requests first. Retrieval is the retrieval service's, over HTTP.
"""

from __future__ import annotations

import time
import uuid
from typing import Sequence

from prometheus_client import Gauge
from pydantic import ValidationError

from icma.core.corpus import parse_corpus_text
from icma.core.depict import Depiction, depict
from icma.core.errors import IcmaError, InputError
from icma.core.jsontext import JsonTextError, parse_json
from icma.core.settings import Settings
from icma.core.tempfiles import sweep
from icma.core.tasks import check_task
from icma.generation.adapters import BASE, AdapterInfo, AdapterRegistry, DefaultAdapters
from icma.generation.engines import Adapter, Generation, GenerationInput, GenerationParams, \
    Generator, load_engine
from icma.generation.models import TEMP_PATTERNS as MODEL_TEMPS
from icma.generation.options import Options, build_options
from icma.generation.pipeline import Outcome, run_batch
from icma.generation.retrievers import HttpRetriever, Retriever
from icma.generation.scheduler import BATCH, INTERACTIVE, GenerationQueue
from icma.jobs.items import check_item, parse_items
from icma.jobs.results import Followers, ResultStream, aiter_results
from icma.jobs.runner import JobRunner, batch_translator
from icma.jobs.store import Item, JobConflict, JobStore
from icma.jobs.tune import TuneRunner
from icma.retrieval.store import usable_corpus
from icma.server.http import Metrics, json_input_error, require_key_for_work, \
    validation_input_error
from icma.tuning import parse_config
from icma.tuning.run import ADAPTER_TEMP_PATTERNS, TEMP_PATTERNS as TUNING_TEMPS, \
    check_sources
from icma.tuning.sources import UPLOADED, Sources, remove_uploads, uploads_dir
from icma.workers.translator.protocol import (
    AdapterOut,
    Adapters,
    Cap2MolRequest,
    Cap2MolResponse,
    DepictRequest,
    ExampleUsed,
    Job,
    JobCreate,
    JobList,
    JobMetrics,
    JobOptions,
    Mol2CapRequest,
    Mol2CapResponse,
    TranslationTimings,
    TuneJobCreate,
    Usage,
)

JOBS_PATH = "/v1/jobs"


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

    def chat_text(self, messages: list[dict[str, str]]) -> str | None:
        return self.queue.check_ready().chat_text(messages)

    @property
    def chat_api(self) -> bool:  # (the engine's, like its tokenizer: a chat prompt style's)
        return self.queue.check_ready().chat_api


class TranslatorService:
    """Translation, batch jobs, tune jobs and the adapter registry of one worker process."""

    def __init__(self, settings: Settings, retriever: Retriever | None = None,
                 engine_loader=None):
        self.settings = settings
        self.retriever = retriever or HttpRetriever.from_settings(settings)
        self.queue = GenerationQueue(
            engine_loader or (lambda: load_engine(settings.engine, settings=settings,
                                                  model=settings.llm_model)),
            max_batch=max(settings.job_batch_size, 64))
        self.registry = AdapterRegistry.from_settings(settings)
        self.defaults = DefaultAdapters.from_settings(settings, self.registry)
        self.store = JobStore(settings.jobs_path())
        self.metrics = Metrics("icma_worker")
        for name, text, value in [
                ("engine_queue_prompts", "Prompts waiting for the engine", self.queue.depth),
                ("engine_busy_seconds", "Seconds the engine spent generating",
                 lambda: self.queue.busy_seconds),
                ("speculative_draft_tokens", "Tokens prompt-lookup speculation proposed, since "
                 "start", lambda: self.queue.draft_tokens),
                ("speculative_accepted_tokens", "Proposed tokens the answers kept, since start",
                 lambda: self.queue.accepted_tokens),
                ("prompt_tokens", "Prompt tokens generated from, since start, as the engine "
                 "counted them (openai: the server's usage)", lambda: self.queue.prompt_tokens),
                ("completion_tokens", "Tokens generated, since start (openai: the server's "
                 "usage)", lambda: self.queue.completion_tokens),
                ("jobs_active", "Queued and running jobs", self.store.count_active)]:
            Gauge(f"icma_worker_{name}", text, registry=self.metrics.registry) \
                .set_function(value)
        self.interactive = QueuedEngine(self.queue, INTERACTIVE)
        executor = None
        if settings.job_executor == "ray":  # jobs go to the cluster; requests stay here
            from icma.jobs.ray_executor import Parts, ray_executor

            executor = ray_executor(Parts(settings, retrieval_url=settings.retrieval_url),
                                    self.job_options, settings.job_batch_size)
        self.runner = JobRunner(self.store, batch_translator(self.retriever,
                                                             QueuedEngine(self.queue, BATCH),
                                                             self.job_options,
                                                             settings.max_heavy_atoms),
                                batch_size=settings.job_batch_size,
                                retention_days=settings.job_retention_days,
                                executor=executor)
        self.tuner = TuneRunner(self.store, settings)
        self.followers = Followers(settings.max_result_followers)
        self._job_metrics: dict[str, JobMetrics] = {}

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread and the job runners, after removing what interrupted
        writes left in the data directory (a model conversion, a tuning checkpoint)."""
        sweep(self.settings.data_dir, MODEL_TEMPS + TUNING_TEMPS)
        sweep(self.settings.adapters_path(), ADAPTER_TEMP_PATTERNS)
        self.queue.start()
        self.defaults.table()  # a default that cannot be applied is logged now, not at first use
        self.runner.start()  # (also queues jobs left running by a stopped worker again)
        self.tuner.start()

    def stop(self) -> None:
        self.tuner.stop()
        self.runner.stop()
        self.queue.stop()
        self.store.close()
        self.retriever.close()

    def state(self) -> str:
        """"ready", or why not: "loading" or "failed" (the engine)."""
        return "ready" if self.queue.ready else ("failed" if self.queue.error else "loading")

    # --- translation ---------------------------------------------------------------------------

    def options(self, task: str, request: dict) -> Options:
        """A request's (or a job's stored) options, checked against this worker's limits and
        adapter registry."""
        return build_options(task, request, max_k=self.settings.max_k,
                             max_candidates=self.settings.max_candidates,
                             max_samples=self.settings.max_samples,
                             adapters=self.registry.get, default_adapter=self.defaults.for_task)

    def job_options(self, task: str, raw: dict) -> Options:
        """A job's options (as stored, or as submitted); errors name ``options.<field>``."""
        try:
            return self.options(task, JobOptions.model_validate(raw).model_dump())
        except IcmaError as exc:
            raise exc.at(f"options.{exc.field}" if exc.field else "options") from None

    def mol2cap(self, req: Mol2CapRequest) -> Mol2CapResponse:
        """A caption for a molecule, written by the LLM from retrieved similar examples."""
        t0 = time.perf_counter()
        opts = self.options("mol2cap", req.model_dump())
        out = self._one("mol2cap", req.smiles, opts)
        self.metrics.observe("mol2cap", opts.retrieval.method_for("mol2cap"), t0, 1)
        return Mol2CapResponse(caption=out.translation.answer,
                               **self._translated(out, opts, t0, req.return_prompt))

    def cap2mol(self, req: Cap2MolRequest) -> Cap2MolResponse:
        """A molecule for a caption, checked with RDKit; with ``num_candidates`` > 1, sampled
        again until one is valid."""
        t0 = time.perf_counter()
        opts = self.options("cap2mol", req.model_dump())
        out = self._one("cap2mol", req.caption, opts)
        t = out.translation
        self.metrics.observe("cap2mol", opts.retrieval.method_for("cap2mol"), t0, 1)
        return Cap2MolResponse(smiles=t.answer, canonical_smiles=t.canonical,
                               valid=bool(t.valid), candidates_tried=out.candidates_tried,
                               **self._translated(out, opts, t0, req.return_prompt))

    def _one(self, task: str, query: str, opts: Options) -> Outcome:
        self.queue.check_ready()
        out = run_batch(task, [query], opts, self.retriever, self.interactive,
                        self.settings.max_heavy_atoms)[0]
        if out.error is not None:
            raise out.error
        return out

    def _translated(self, out: Outcome, opts: Options, t0: float, return_prompt: bool) -> dict:
        """The response fields both directions share."""
        t = out.translation
        engine = self.queue.check_ready()
        timings = TranslationTimings(**{k: round(v, 3) for k, v in out.timings.items()},
                                     total_ms=round((time.perf_counter() - t0) * 1e3, 3))
        return dict(
            examples=[ExampleUsed(cid=e.cid or "", smiles=e.smiles, description=e.caption,
                                  score=float(e.score if e.score is not None else 0.0),
                                  rank=i + 1) for i, e in enumerate(t.examples)],
            n_examples_dropped=t.dropped, engine=engine.name, model=engine.model,
            adapter=opts.adapter.name if opts.adapter else None,
            prime_answer=opts.prime_answer, prompt_style=opts.prompt_style,
            finish_reason=t.finish_reason,
            usage=Usage(prompt_tokens=t.prompt_tokens, completion_tokens=t.completion_tokens,
                        draft_tokens=t.draft_tokens, accepted_tokens=t.accepted_tokens,
                        acceptance_rate=round(t.accepted_tokens / t.draft_tokens, 4)
                        if t.draft_tokens else None),
            timings=timings, prompt=out.prompt if return_prompt else None,
            consensus=t.consensus.summary() if t.consensus else None)

    # --- adapters ------------------------------------------------------------------------------

    def adapters(self) -> Adapters:
        """Adapters this worker can apply (folders of the registry directory, new ones served at
        once, and the shipped ones), and the default each task gets."""
        defaults = self.defaults.table()
        default_for = {name: task for task, name in defaults.items() if name}
        return Adapters(adapters=[_adapter_out(a, default_for.get(a.name))
                                  for a in self.registry.list()], defaults=defaults)

    # --- jobs ----------------------------------------------------------------------------------

    def create_job(self, req: JobCreate | TuneJobCreate) -> Job:
        """Queue a translation job or a tune job."""
        if isinstance(req, TuneJobCreate):
            return self._submit_tune(req.task, req.options.model_dump(exclude_unset=True))
        items = []
        for i, x in enumerate(req.items):
            item = Item(x) if isinstance(x, str) else Item(x.input, x.id, x.reference)
            try:
                items.append(check_item(req.task, item))
            except InputError as exc:
                raise exc.at(f"items[{i}]" if isinstance(x, str) else
                             f"items[{i}].{exc.field}") from None
        return self._submit(req.task, items, req.options)

    def upload_job(self, task: str, filename: str | None, data: bytes,
                   options_json: str) -> Job:
        """Queue a translation job from a file: JSON lines or a corpus TSV."""
        check_task(task)
        opts = _parse_form_options(options_json, JobOptions)
        fmt = "jsonl" if (filename or "").lower().endswith((".jsonl", ".ndjson", ".json")) \
            else "tsv"
        return self._submit(task, parse_items(task, _text(data, "file"), fmt, where="file"),
                            opts)

    def upload_tune_job(self, task: str, options_json: str,
                        files: dict[str, tuple[str | None, bytes]]) -> Job:
        """Queue a tune job with its corpora uploaded (``files``: field -> (file name, bytes),
        fields ``train``, ``contexts``, ``eval``). They are kept in a folder the server picks
        until the job ends; the job's options say ``"@upload"`` for them."""
        self._check_work_allowed()
        check_task(task)
        raw = _parse_form_options(options_json, None)
        if not files:
            raise InputError("upload at least one corpus file (train, contexts or eval)",
                             field="train")
        corpora = {}
        for field, (filename, data) in files.items():
            if field in raw:
                raise InputError(f"{field} is both uploaded and named in the options; give it "
                                 f"once", field=f"options.{field}")
            fmt = "jsonl" if (filename or "").lower().endswith((".jsonl", ".ndjson")) else "tsv"
            text = _text(data, field)
            try:
                corpus, _ = parse_corpus_text(text, fmt=fmt, name=field)
                usable_corpus(corpus, field, field)
            except IcmaError as exc:
                raise InputError(exc.message, field=field) from None
            corpora[field] = (fmt, text)
            raw[field] = UPLOADED
        job_id = uuid.uuid4().hex
        folder = uploads_dir(self.settings.data_dir, job_id)
        folder.mkdir(parents=True)
        try:
            for field, (fmt, text) in corpora.items():
                (folder / f"{field}.{fmt}").write_text(text, encoding="utf-8")
            return self._submit_tune(task, raw, job_id=job_id)
        except BaseException:
            remove_uploads(self.settings.data_dir, job_id)
            raise

    def _submit(self, task: str, items: list[Item], opts: JobOptions) -> Job:
        if len(items) > self.settings.max_job_items:
            raise InputError(f"{len(items)} items; a job takes at most "
                             f"{self.settings.max_job_items}", field="items")
        checked = self.job_options(task, opts.model_dump())  # refuse bad options now
        stored = opts.model_dump(exclude_defaults=True)
        # The default adapter is pinned now: a job resumed after the defaults changed (a new
        # setting, another shipped adapter) goes on with the model it started with.
        stored.setdefault("adapter", checked.adapter.name if checked.adapter else BASE)
        job = self.store.create("translate", task, stored, items,
                                max_active=self.settings.max_jobs)
        self.runner.wake()
        return job_out(job)

    def _check_work_allowed(self) -> None:
        require_key_for_work(self.settings.api_key, self.settings.allow_work_without_key,
                             "tune jobs")

    def _submit_tune(self, task: str, raw: dict, job_id: str | None = None) -> Job:
        self._check_work_allowed()
        s = self.settings
        try:
            cfg = parse_config({**raw, "task": task})  # cross-field checks, as the CLI's
            check_sources(cfg, Sources.for_job(s.data_dir, s.data_dir, s.models_path(),
                                               s.allow_model_downloads, job_id))
        except InputError as exc:
            raise exc.at(f"options.{exc.field}") from None
        if (self.registry.root / cfg.name).exists() or self.registry.is_shipped(cfg.name):
            raise JobConflict(f"adapter {cfg.name!r} exists already; choose another name",
                              field="options.name")
        for other in self.store.list("queued") + self.store.list("running"):
            if other.kind == "tune" and other.options.get("name") == cfg.name:
                raise JobConflict(f"job {other.id} is tuning {cfg.name!r} already",
                                  field="options.name")
        job = self.store.create("tune", task, raw, [], max_active=s.max_jobs, job_id=job_id)
        self.tuner.wake()
        return job_out(job)

    def list_jobs(self, state: str | None, limit: int) -> JobList:
        """Jobs, newest first."""
        return JobList(jobs=[job_out(j) for j in self.store.list(state, limit)])

    def get_job(self, job_id: str) -> Job:
        """State and progress counts of one job."""
        return job_out(self.store.get(job_id))

    def job_results(self, job_id: str, follow: bool) -> ResultStream:
        """A translation job's result lines (JSON, input order); checked before the first line,
        so that an unknown job is a 404 and not a broken stream. The stream holds one of
        ``max_result_followers`` places (429 when none is free) until it is closed."""
        if self.store.get(job_id).kind != "translate":
            raise JobConflict("a tune job has no result lines: GET /v1/jobs/{id} reports it "
                              "and its adapter is listed at GET /v1/adapters", field="job_id")
        release = self.followers.enter()
        try:
            return ResultStream(aiter_results(self.store, job_id, follow=follow), release)
        except BaseException:  # the first chunk could not be read (a damaged store)
            release()
            raise

    def cancel_job(self, job_id: str) -> Job:
        """Cancel a queued or running job (results so far are kept)."""
        return job_out(self.store.cancel(job_id))

    def job_metrics(self, job_id: str) -> JobMetrics:
        """MolT5's metrics over a finished translation job's inputs that carried a reference
        (``icma eval``'s numbers, FCD left out: ChemNet takes minutes). A finished job's lines
        do not change, so the scores are computed once."""
        job = self.store.get(job_id)
        if job.kind != "translate":
            raise JobConflict("a tune job has no result lines to score: its evaluation is in "
                              "GET /v1/jobs/{id} (tuning.metrics)", field="job_id")
        if job.state in ("queued", "running"):
            raise JobConflict(f"job {job_id} is {job.state}: its metrics are computed once it "
                              "ends", field="job_id")
        if job_id in self._job_metrics:
            return self._job_metrics[job_id]
        preds, refs = [], []
        start = 0
        while rows := self.store.results(job_id, start):
            for idx, item, line in rows:
                if item.reference and line is not None:
                    preds.append(line.get("prediction") or "")
                    refs.append(item.reference)
            start = rows[-1][0] + 1
        if not refs:
            raise JobConflict(f"no input of job {job_id} had a reference to score against "
                              "(give each input a 'reference', or upload a corpus TSV)",
                              field="reference")
        from icma.evaluation.metrics import evaluate  # nltk, rouge and SciBERT: only when asked

        scores = evaluate(job.task, preds, refs, data_dir=self.settings.data_dir, fcd=False)
        out = JobMetrics(job_id=job_id, task=job.task, scored=len(refs), total=job.total,
                         metrics={k: v for k, v in scores.items()
                                  if isinstance(v, (int, float)) or v is None})
        if len(self._job_metrics) >= 256:  # a small cache: drop the oldest
            self._job_metrics.pop(next(iter(self._job_metrics)))
        self._job_metrics[job_id] = out
        return out

    # --- drawings ------------------------------------------------------------------------------

    def depict(self, req: DepictRequest) -> Depiction:
        """The molecule as SVG, with the atoms it shares with ``reference`` highlighted."""
        return depict(req.smiles, reference=req.reference, width=req.width, height=req.height,
                      max_heavy_atoms=self.settings.max_heavy_atoms,
                      max_drawn_atoms=self.settings.depict_max_heavy_atoms,
                      mcs_timeout_s=self.settings.depict_mcs_timeout_s)


def _text(data: bytes, field: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text (byte {exc.start})", field=field) from None


def _parse_form_options(options_json: str, schema):
    """The ``options`` form field of an upload, read as a JSON body is (``icma.core.jsontext``)
    and validated by ``schema`` with the same strictness (None: any object, checked later)."""
    try:
        raw = parse_json(options_json)
    except JsonTextError as exc:
        raise json_input_error(exc, "options") from None
    if schema is None:
        if not isinstance(raw, dict):
            raise InputError("a JSON object of tune options", field="options")
        return raw
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise validation_input_error(exc, "options") from None


def job_out(job) -> Job:
    return Job(id=job.id, kind=job.kind, task=job.task, state=job.state, total=job.total,
               done=job.done, failed=job.failed,
               progress=round(job.done / job.total, 4) if job.total else 1.0,
               created=job.created, started=job.started, finished=job.finished,
               message=job.message, options=job.options,
               results_url=f"{JOBS_PATH}/{job.id}/results" if job.kind == "translate"
               else None, tuning=job.progress if job.kind == "tune" else None)


def _adapter_out(a: AdapterInfo, default_for: str | None) -> AdapterOut:
    return AdapterOut(name=a.name, base_model=a.base_label, r=a.r, lora_alpha=a.lora_alpha,
                      target_modules=a.target_modules, task=a.task,
                      prime_answer=a.prime_answer, generation=a.served_generation or None,
                      evaluation=_evaluation(a.manifest),
                      shipped=a.shipped, default_for=default_for)


def _evaluation(manifest: dict) -> dict | None:
    ev = manifest.get("evaluation") or {}
    metrics = ev.get("metrics")
    if not metrics:
        return None
    return {"split": ev.get("split"), "n": ev.get("n"),
            **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
