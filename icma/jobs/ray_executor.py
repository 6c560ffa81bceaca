"""Translate jobs on a Ray cluster (``icma translate --executor ray``, ``ICMA_JOB_EXECUTOR=ray``).

The job store stays the record of what is done, exactly as with the local runner: the driver
(the ``icma translate`` process, or the worker) reads the job's pending items, streams them
through a Ray Data pipeline and records each block of results as it comes back, in one
transaction. A driver killed mid-run loses only the blocks in flight; run again, it sends only
what has no result yet. The pipeline:

    items -> Retrieve (actors: check each input, retrieve its examples; indexes loaded once)
          -> Generate (actors: the prompt within the budget, the engine, the answer and its
             RDKit check; the model loaded once; GPUs where ICMA_RAY_GPUS_PER_ACTOR asks)
          -> the driver records the result lines in the store.

Both stages run ``icma.generation.pipeline.run_isolating``: the first with no engine (retrieval
only), the second with the examples the first found (``GivenExamples``). So prompts, answers
and per-item errors are the local path's, by construction, and the tests check it. Ray retries
a block whose actor died (its default for Ray Data actors); the store keeps the first result of
an input, so a block done twice still gives one line per input.

Every actor builds its retriever and engine from the same ``Settings``: on a cluster, the data
directory (indexes, adapters) must be at the same path on every node, or retrieval must go to a
retrieval service (``retrieval_url``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from dataclasses import dataclass
from typing import Callable

from icma.core.errors import IcmaError, UnavailableError
from icma.core.ray_cluster import connect, first_line
from icma.core.prompts import Example
from icma.core.settings import Settings
from icma.evaluation.predictions import error_json, result_line
from icma.generation.options import Options
from icma.jobs.store import Item, Job, JobStore

log = logging.getLogger(__name__)

#: What a job's raw options become (the worker's adapter registry, the CLI's flags).
OptionsFor = Callable[[str, dict], Options]


@dataclass(frozen=True)
class Parts:
    """What the actors build their retriever and engine from (pickled to the cluster)."""

    settings: Settings
    engine: str | None = None  # default: settings.engine
    model: str | None = None  # default: settings.llm_model
    retrieval_url: str | None = None  # None: local indexes in settings.data_dir

    def retriever(self, task: str, options: Options):
        from icma.generation.retrievers import HttpRetriever, LocalRetriever

        if self.retrieval_url:
            return HttpRetriever.from_settings(self.settings, base_url=self.retrieval_url)
        return LocalRetriever(self.settings, [options.retrieval.method_for(task)])

    def engine_(self):
        from icma.generation.engines import load_engine

        return load_engine(self.engine or self.settings.engine, settings=self.settings,
                           model=self.model)


# --- the two stages (Ray Data callable classes: one instance per actor) ------------------------

class Retrieve:
    """Stage 1: each input checked and its examples retrieved; an input that fails gets its
    result line here (with its error) and passes the second stage untouched."""

    def __init__(self, task: str, options: Options, parts: Parts):
        from icma.generation.pipeline import run_isolating

        self.task, self.options, self.parts = task, options, parts
        self.retriever = parts.retriever(task, options)
        self._run = run_isolating

    def __call__(self, batch: dict) -> dict:
        items = [_item(x) for x in batch["item"]]
        outs = self._run(self.task, [it.input for it in items], self.options, self.retriever,
                         None, self.parts.settings.max_heavy_atoms)
        examples, lines = [], []
        for idx, it, o in zip(batch["idx"], items, outs):
            if o.error is None:
                examples.append(json.dumps([dataclasses.asdict(e) for e in o.examples]))
                lines.append("")
            else:
                examples.append("")
                lines.append(_line(self.task, int(idx), it, o))
        return {"idx": batch["idx"], "item": batch["item"], "examples": examples,
                "line": lines}


class Generate:
    """Stage 2: prompts, generation, answers and their checks, with stage 1's examples."""

    def __init__(self, task: str, options: Options, parts: Parts):
        from icma.generation.pipeline import run_isolating

        self.task, self.options, self.parts = task, options, parts
        self.engine = parts.engine_()
        self._run = run_isolating

    def __call__(self, batch: dict) -> dict:
        from icma.generation.retrievers import GivenExamples

        todo = [i for i, line in enumerate(batch["line"]) if not line]
        lines = list(batch["line"])
        if todo:
            items = {i: _item(batch["item"][i]) for i in todo}
            given = GivenExamples((items[i].input, [Example(**e) for e in
                                                    json.loads(batch["examples"][i])])
                                  for i in todo)
            outs = self._run(self.task, [items[i].input for i in todo], self.options, given,
                             self.engine, self.parts.settings.max_heavy_atoms)
            for i, o in zip(todo, outs):
                lines[i] = _line(self.task, int(batch["idx"][i]), items[i], o)
        return {"idx": batch["idx"], "line": lines}


def _item(raw: str) -> Item:
    return Item(*json.loads(raw))


def _line(task: str, idx: int, it: Item, outcome) -> str:
    return json.dumps(result_line(task, idx, it.input, id=it.id, reference=it.reference,
                                  outcome=outcome), ensure_ascii=False)


# --- the driver ----------------------------------------------------------------------------------

def run_job_on_ray(store: JobStore, job: Job, options: Options, parts: Parts, *,
                   batch_size: int, stop: threading.Event | None = None,
                   on_progress: Callable[[Job], None] | None = None) -> Job:
    """Translate ``job``'s pending items on Ray, recording results as blocks come back. Returns
    the job as it stands when the pipeline ends, is cancelled (state no longer running) or
    ``stop`` is set. Ray failing as a whole (the cluster gone) is an ``UnavailableError``: the
    runner waits and calls again, and what was recorded stays done."""
    import ray
    import ray.data

    settings = parts.settings
    connect(settings.ray_address)
    pending = store.pending(job.id, job.total)
    if not pending:
        return store.get(job.id)
    where = f"the Ray cluster at {settings.ray_address}" if settings.ray_address else "Ray"
    store.set_message(job.id, f"on {where}: {len(pending)} items sent")
    ds = ray.data.from_items([{"idx": idx, "item": json.dumps([it.input, it.id, it.reference],
                                                             ensure_ascii=False)}
                              for idx, it in pending])
    args = dict(fn_constructor_args=(job.task, options, parts), batch_size=batch_size,
                batch_format="numpy")
    pool = ray.data.ActorPoolStrategy
    ds = ds.map_batches(Retrieve, compute=pool(size=settings.ray_retrieval_actors),
                        num_cpus=1, **args)
    gpus = settings.ray_gpus_per_actor
    ds = ds.map_batches(Generate, compute=pool(size=settings.ray_generation_actors),
                        num_cpus=0 if gpus else 1, num_gpus=gpus or None, **args)
    try:
        for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
            store.record(job.id, [(int(i), json.loads(line))
                                  for i, line in zip(block["idx"], block["line"])])
            current = store.get(job.id)
            if on_progress:
                on_progress(current)
            if current.state != "running" or (stop is not None and stop.is_set()):
                break  # cancelled or shutting down: what came back is kept
    except Exception as exc:
        raise _reason(exc) from None
    if not store.pending(job.id, 1):
        store.set_message(job.id, f"ran on {where}")
    return store.get(job.id)


def _reason(exc: Exception) -> Exception:
    """What to raise for a failed pipeline: an actor's own ``IcmaError`` (a model that does
    not load is the run's error, not a reason to wait), else Ray's failure as unavailability."""
    import ray.exceptions

    seen = exc
    while seen is not None:  # Ray Data wraps the actor's error, which wraps ours
        if isinstance(getattr(seen, "cause", None), IcmaError):
            return seen.cause
        if isinstance(seen, IcmaError) and not isinstance(seen, ray.exceptions.RayError):
            return seen
        seen = seen.__cause__
    if isinstance(exc, (ray.exceptions.RayError, IcmaError)):
        return UnavailableError(f"the Ray pipeline failed: {first_line(exc)}",
                                field="executor")
    return exc


def ray_executor(parts: Parts, options_for: OptionsFor, batch_size: int):
    """A ``JobRunner`` executor: each translate job runs as one Ray pipeline. A job whose
    options no longer build (an adapter removed since) fails its items, as locally."""

    def execute(store: JobStore, job: Job, stop: threading.Event,
                on_progress: Callable[[Job], None] | None) -> Job:
        try:
            options = options_for(job.task, job.options)
        except UnavailableError:
            raise
        except IcmaError as exc:
            while batch := store.pending(job.id, batch_size):
                store.record(job.id, [(idx, result_line(job.task, idx, it.input, id=it.id,
                                                        reference=it.reference,
                                                        error=error_json(exc)))
                                      for idx, it in batch])
            return store.get(job.id)
        return run_job_on_ray(store, job, options, parts, batch_size=batch_size, stop=stop,
                              on_progress=on_progress)

    return execute
