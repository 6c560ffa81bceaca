"""A translation request end to end: retrieve examples -> prompt -> engine -> answer.

The worker's endpoints, its batch jobs and ``icma translate`` all run ``run_batch``, so an
answer does not depend on which door it came in by. Retrieval is a ``Retriever`` (the service
over HTTP, or local indexes); the engine is any ``Generator`` (in the worker, one that queues
for the engine thread).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from icma.core import chem
from icma.generation.engines import Adapter, GenerationParams, Generator
from icma.core.errors import IcmaError
from icma.core.prompts import Task, check_query, check_task
from icma.generation.retrievers import RetrievalOptions, Retriever
from icma.generation.translate import PromptOptions, Translation, translate

#: ICMA's released settings: 2 examples for mol2cap, 4 for cap2mol.
DEFAULT_SHOTS = {"mol2cap": 2, "cap2mol": 4}


@dataclass(frozen=True)
class Options:
    """Everything about a translation but its input."""

    n_shot: int
    retrieval: RetrievalOptions = RetrievalOptions()
    params: GenerationParams | None = None  # None: ICMA's sampling for the task
    adapter: Adapter | None = None
    prime_answer: bool | None = None  # None: on without an adapter, off with one
    cutoff: int = 2048
    num_candidates: int = 1  # cap2mol: sample until one is valid, at most this many

    def prompt_options(self) -> PromptOptions:
        prime = self.adapter is None if self.prime_answer is None else self.prime_answer
        return PromptOptions(prime_answer=prime, cutoff=self.cutoff)


@dataclass
class Outcome:
    """One input's result: a translation, or the error that stopped it."""

    translation: Translation | None = None
    error: IcmaError | None = None
    candidates_tried: int = 0
    prompt: str | None = None  # what the engine received
    timings: dict[str, float] = field(default_factory=dict)


def check_input(task: Task, query: str) -> str:
    """The checks one input must pass before retrieval (so that one bad item in a batch fails
    alone): not empty, not over-long, and for mol2cap a SMILES RDKit parses."""
    check_query(task, query)
    if task == "mol2cap":
        chem.canonical_smiles(query)
    return query


def run_batch(task: str, queries: Sequence[str], options: Options, retriever: Retriever,
              engine: Generator) -> list[Outcome]:
    """Translate ``queries`` with the same options. Inputs that fail ``check_input`` get their
    error and the rest go on; a retrieval or engine failure (service down, unknown adapter)
    raises, because it concerns every input alike."""
    task = check_task(task)
    out = [Outcome() for _ in queries]
    ok = []
    for i, q in enumerate(queries):
        try:
            check_input(task, q)
            ok.append(i)
        except IcmaError as exc:
            out[i].error = exc
    if not ok:
        return out
    t0 = time.perf_counter()
    examples = retriever.examples(task, [queries[i] for i in ok], options.n_shot,
                                  options.retrieval)
    retrieval_ms = (time.perf_counter() - t0) * 1e3 / len(ok)
    params = options.params or GenerationParams.for_task(task)
    todo = list(ok)
    ex_of = dict(zip(ok, examples))
    for attempt in range(max(1, options.num_candidates)):
        if not todo:
            break
        # Each further candidate is a fresh sample: the same prompt under the next seed.
        p = params if attempt == 0 else replace(params, seed=params.seed + attempt)
        done = translate(task, [queries[i] for i in todo], [ex_of[i] for i in todo], engine,
                         params=p, prompt=options.prompt_options(), adapter=options.adapter)
        still = []
        for i, t in zip(todo, done):
            o, prev = out[i], out[i].timings
            o.candidates_tried = attempt + 1
            o.translation, o.prompt = t, t.prompt  # the latest try: earlier ones were invalid
            o.timings = {"retrieval_ms": retrieval_ms,
                         "prompt_ms": t.timings["prompt_ms"] + prev.get("prompt_ms", 0.0),
                         "generation_ms": t.timings["generate_ms"] + prev.get("generation_ms",
                                                                              0.0)}
            if task == "cap2mol" and not t.valid:
                still.append(i)
        todo = still
    return out


def run_isolating(task: str, queries: Sequence[str], options: Options, retriever: Retriever,
                  engine: Generator) -> list[Outcome]:
    """``run_batch``, but when the batch is refused as a whole (the retrieval service rejects
    one input that ``check_input`` let through), halve it until the bad inputs stand alone.
    Failures that concern every input (service down, engine not loaded) still raise."""
    from icma.generation.retrievers import RetrievalUnavailable
    from icma.generation.scheduler import EngineNotReady

    try:
        return run_batch(task, queries, options, retriever, engine)
    except (RetrievalUnavailable, EngineNotReady):
        raise
    except IcmaError as exc:
        if len(queries) == 1:
            return [Outcome(error=exc)]
        mid = len(queries) // 2
        return (run_isolating(task, queries[:mid], options, retriever, engine)
                + run_isolating(task, queries[mid:], options, retriever, engine))


def batch_translator(retriever: Retriever, engine: Generator,
                     options_for: Callable[[str, dict], Options]):
    """The job runner's batch function (``icma.jobs.store.BatchFn``): a job's stored options ->
    ``Options`` by ``options_for``, then ``run_isolating``; a dependency that is down makes the
    runner wait and retry (``TransientError``) instead of failing items."""
    from icma.jobs.store import TransientError, result_line
    from icma.generation.retrievers import RetrievalUnavailable
    from icma.generation.scheduler import EngineNotReady

    def run(task: str, items, raw: dict) -> list[dict]:
        try:
            outs = run_isolating(task, [it.input for _, it in items], options_for(task, raw),
                                 retriever, engine)
        except (RetrievalUnavailable, EngineNotReady) as exc:
            raise TransientError(str(exc)) from None
        except IcmaError as exc:  # e.g. an adapter removed after the job was queued
            outs = [Outcome(error=exc) for _ in items]
        return [result_line(task, idx, it, o) for (idx, it), o in zip(items, outs)]

    return run
