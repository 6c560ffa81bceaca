"""A translation end to end: retrieve examples -> prompt within the token budget -> engine ->
answer (+ an RDKit check for cap2mol).

The worker's endpoints, its batch jobs, ``icma translate``, tuning evaluation and the
benchmarks all come through here, so an answer does not depend on which door it came in by.
``run_batch`` retrieves with a ``Retriever`` (the service over HTTP, or local indexes) and
calls ``translate``; callers that hold their examples already (the quality benchmark) call
``translate`` directly. The engine is any ``Generator`` (in the worker, one that queues for the
engine thread). With consensus decoding the engine writes several answers per prompt and
``icma.generation.consensus`` chooses among them and the examples' answers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Sequence

from icma.core import chem
from icma.core.errors import IcmaError, InputError, InternalError, UnavailableError
from icma.core.prompts import Example, build_prompt, check_query, extract_answer
from icma.core.tasks import Task, check_task
from icma.generation.consensus import Choice, choose
from icma.generation.engines import Generation, GenerationInput, Generator
from icma.generation.options import Options, build_options
from icma.generation.retrievers import Retriever

log = logging.getLogger(__name__)


@dataclass
class Translation:
    task: Task
    query: str
    answer: str
    raw: str  # the engine's continuation
    examples: list[Example]  # used, best first
    n_requested: int
    dropped: int  # examples dropped to fit the budget
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    valid: bool | None = None  # cap2mol: RDKit parses the answer
    canonical: str | None = None  # cap2mol: its canonical SMILES when valid
    timings: dict[str, float] = field(default_factory=dict)
    prompt: str = ""  # what the engine received
    consensus: Choice | None = None  # decoding "consensus": the pool and its winner
    draft_tokens: int = 0  # proposed by prompt-lookup speculation
    accepted_tokens: int = 0  # of those, kept in the answer


@dataclass
class Outcome:
    """One input's result: a translation, or the error that stopped it."""

    translation: Translation | None = None
    error: IcmaError | None = None
    candidates_tried: int = 0
    prompt: str | None = None  # what the engine received
    timings: dict[str, float] = field(default_factory=dict)


def translate(task: str, queries: Sequence[str], examples: Sequence[Sequence[Example]],
              engine: Generator, options: Options | None = None) -> list[Translation]:
    """Translate each query with its examples (best first; empty lists for zero-shot).
    ``options``: default, the task's defaults (``build_options``)."""
    task = check_task(task)
    options = options or build_options(task)
    if len(queries) != len(examples):
        raise InputError(f"{len(queries)} queries but {len(examples)} example lists",
                         field="examples")
    params = options.params
    t0 = time.perf_counter()
    count = engine.count_tokens if engine.count_tokens("x") is not None else None  # budget?
    prompts = []
    for i, (q, ex) in enumerate(zip(queries, examples)):
        try:
            check_query(task, q)
        except InputError as exc:
            raise exc.at(f"{exc.field}[{i}]" if len(queries) > 1 else exc.field) from None
        prompts.append(build_prompt(task, q, ex, order=options.order,
                                    prime_answer=options.prime_answer, count_tokens=count,
                                    cutoff=options.cutoff, reserve=params.max_new_tokens))
    t1 = time.perf_counter()
    gens = engine.generate([GenerationInput(task, p.text, p.examples) for p in prompts], params,
                           adapter=options.adapter)
    t2 = time.perf_counter()
    out = []
    per_query = {"prompt_ms": (t1 - t0) * 1e3 / max(len(queries), 1),
                 "generate_ms": (t2 - t1) * 1e3 / max(len(queries), 1)}
    n = params.samples_per_prompt
    for i, (q, p) in enumerate(zip(queries, prompts)):
        samples = gens[i * n:(i + 1) * n]
        answers = [extract_answer(task, g.text, stop=params.stop) for g in samples]
        choice, g, answer = None, samples[0], answers[0]
        if params.decoding == "consensus":
            choice = choose(task, answers, p.examples)
            w = choice.winner
            answer = w.text
            # (an example's answer stands as the continuation: it was written whole)
            g = samples[w.sample] if w.source == "sample" else Generation(w.text)
        t = Translation(task, q, answer, g.text, p.examples, p.n_requested, len(p.dropped),
                        samples[0].prompt_tokens or (p.n_tokens or 0),
                        sum(s.completion_tokens for s in samples), g.finish_reason,
                        timings=dict(per_query), prompt=p.text, consensus=choice,
                        draft_tokens=sum(s.draft_tokens for s in samples),
                        accepted_tokens=sum(s.accepted_tokens for s in samples))
        if task == "cap2mol":
            t.canonical = chem.try_canonical(answer)[0] if answer else None
            t.valid = t.canonical is not None
        out.append(t)
    return out


def check_input(task: Task, query: str, max_heavy_atoms: int | None = None) -> str:
    """The checks one input must pass before retrieval (so that one bad item in a batch fails
    alone): not empty, not over-long, and for mol2cap a SMILES RDKit parses, of at most
    ``max_heavy_atoms`` heavy atoms (a service's ICMA_MAX_HEAVY_ATOMS: checked here, the
    retrieval service would refuse it after a round trip)."""
    check_query(task, query)
    if task == "mol2cap":
        chem.canonical_smiles(query, max_heavy_atoms=max_heavy_atoms)
    return query


def run_batch(task: str, queries: Sequence[str], options: Options, retriever: Retriever,
              engine: Generator, max_heavy_atoms: int | None = None) -> list[Outcome]:
    """Translate ``queries`` with the same options. Inputs that fail ``check_input`` get their
    error and the rest go on; a retrieval or engine failure (service down, unknown adapter)
    raises, because it concerns every input alike."""
    task = check_task(task)
    out = [Outcome() for _ in queries]
    ok = []
    for i, q in enumerate(queries):
        try:
            check_input(task, q, max_heavy_atoms)
            ok.append(i)
        except IcmaError as exc:
            out[i].error = exc
    if not ok:
        return out
    t0 = time.perf_counter()
    examples = retriever.examples(task, [queries[i] for i in ok], options.n_shot,
                                  options.retrieval)
    retrieval_ms = (time.perf_counter() - t0) * 1e3 / len(ok)
    params = options.params
    todo = list(ok)
    ex_of = dict(zip(ok, examples))
    for attempt in range(max(1, options.num_candidates)):
        if not todo:
            break
        # Each further candidate is a fresh sample: the same prompt under the next seed.
        p = params.next_seed(attempt)
        done = translate(task, [queries[i] for i in todo], [ex_of[i] for i in todo], engine,
                         replace(options, params=p))
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
                  engine: Generator, max_heavy_atoms: int | None = None) -> list[Outcome]:
    """``run_batch`` for batch jobs, where one bad input must not fail its batch mates. A batch
    refused as a whole (the retrieval service rejects one input that ``check_input`` let
    through) is halved until the bad inputs stand alone; a batch that fails with an unexpected
    exception (the engine's) is retried input by input, and an input that still fails alone
    gets an ``InternalError``, logged once per call with its traceback. Failures that concern
    every input (service down, engine not loaded) still raise."""
    bugs: list[Exception] = []  # inputs that failed alone
    together: list[Exception] = []  # batches that failed, whatever their inputs did alone
    out = _isolating(task, list(queries), options, retriever, engine, max_heavy_atoms, bugs,
                     together)
    if bugs:
        log.error("internal error translating %d of %d %s input(s); their results say so",
                  len(bugs), len(queries), task, exc_info=bugs[0])
    elif together:
        log.warning("a batch of %s inputs failed together but not one by one", task,
                    exc_info=together[0])
    return out


def _isolating(task: str, queries: list[str], options: Options, retriever: Retriever,
               engine: Generator, max_heavy_atoms: int | None, bugs: list[Exception],
               together: list[Exception]) -> list[Outcome]:
    try:
        return run_batch(task, queries, options, retriever, engine, max_heavy_atoms)
    except UnavailableError:
        raise
    except IcmaError as exc:
        if len(queries) == 1:
            return [Outcome(error=exc)]
        mid = len(queries) // 2
        return (_isolating(task, queries[:mid], options, retriever, engine, max_heavy_atoms,
                           bugs, together)
                + _isolating(task, queries[mid:], options, retriever, engine, max_heavy_atoms,
                             bugs, together))
    except Exception as exc:  # nobody foresaw it: find the inputs it belongs to
        if len(queries) == 1:
            bugs.append(exc)
            return [Outcome(error=InternalError("internal error (the worker's log has the "
                                                "details)"))]
        together.append(exc)
        return [o for q in queries
                for o in _isolating(task, [q], options, retriever, engine, max_heavy_atoms, bugs,
                                       together)]
