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

from icma.core import chem, molregpt
from icma.core.errors import IcmaError, InputError, InternalError, UnavailableError
from icma.core.molregpt import salvage_answer
from icma.core.prompts import Example, Prompt, build_prompt, check_query, extract_answer
from icma.core.tasks import Task, check_task, spec
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
    examples: list[Example] | None = None  # retrieved, best first (before the budget's cut)


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
            prompts.append(_prompt(task, q, ex, engine, options, count))
        except InputError as exc:
            raise exc.at(f"{exc.field}[{i}]" if len(queries) > 1 else exc.field) from None
    t1 = time.perf_counter()
    n = params.samples_per_prompt
    gens = _generate(task, queries, prompts, engine, options, count)
    answers = [[_answer(task, p, g, options) for g in gens[i * n:(i + 1) * n]]
               for i, p in enumerate(prompts)]
    if options.prompt_style == "molregpt":
        _retry_malformed(task, prompts, gens, answers, engine, options)
    t2 = time.perf_counter()
    out = []
    per_query = {"prompt_ms": (t1 - t0) * 1e3 / max(len(queries), 1),
                 "generate_ms": (t2 - t1) * 1e3 / max(len(queries), 1)}
    for i, (q, p) in enumerate(zip(queries, prompts)):
        samples = gens[i * n:(i + 1) * n]
        # A reply with no answer left in it (a malformed MolReGPT reply) is an empty answer.
        texts = [a if a is not None else salvage_answer(task, _reply(task, p, g))
                 for a, g in zip(answers[i], samples)]
        choice, g, answer = None, samples[0], texts[0]
        if params.decoding == "consensus":
            choice = choose(task, texts, p.examples)
            w = choice.winner
            answer = w.text
            # (an example's answer stands as the continuation: it was written whole)
            g = samples[w.sample] if w.source == "sample" else Generation(w.text)
        t = Translation(task, q, answer, g.text, p.examples, p.n_requested, len(p.dropped),
                        samples[0].prompt_tokens or (p.n_tokens or 0),
                        sum(s.completion_tokens for s in samples), g.finish_reason,
                        timings=dict(per_query), prompt=p.text or _shown(p.messages),
                        consensus=choice,
                        draft_tokens=sum(s.draft_tokens for s in samples),
                        accepted_tokens=sum(s.accepted_tokens for s in samples))
        if task == "cap2mol":
            t.canonical = chem.try_canonical(answer)[0] if answer else None
            t.valid = t.canonical is not None
        out.append(t)
    return out


def _prompt(task: Task, query: str, examples: Sequence[Example], engine: Generator,
            options: Options, count) -> Prompt:
    """The prompt in the options' style, within the token budget where ``count`` counts."""
    renderer = None
    if options.prompt_style == "molregpt":
        renderer = molregpt.renderer(task, query, engine.chat_text,
                                     _primed(options, engine), options.order)
    prompt = build_prompt(task, query, examples, order=options.order,
                          prime_answer=options.prime_answer, count_tokens=count,
                          cutoff=options.cutoff, reserve=options.params.max_new_tokens,
                          renderer=renderer)
    if renderer is not None and not prompt.text:
        prompt.n_tokens = None  # a chat API's template counts them: no budget here
    return prompt


def _generate(task: Task, queries: Sequence[str], prompts: list[Prompt], engine: Generator,
              options: Options, count) -> list[Generation]:
    """The engine's generations for ``prompts`` (``samples_per_prompt`` each). A prompt the
    server refused as too long (``Generation.error``) gets MolReGPT's remedy in its style:
    its longest example dropped and asked again, until it fits or has no examples left; in
    ICMA's style, whose budget is the engine's own, the refusal is the request's error."""
    n = options.params.samples_per_prompt

    def inputs(idx):
        return [GenerationInput(task, prompts[i].text, prompts[i].examples,
                                messages=prompts[i].messages) for i in idx]

    gens = engine.generate(inputs(range(len(prompts))), options.params, adapter=options.adapter)
    refused = [i for i in range(len(prompts)) if gens[i * n].error is not None]
    while refused:
        for i in refused:
            p, error = prompts[i], gens[i * n].error
            if options.prompt_style != "molregpt" or not p.examples:
                field = spec(task).query + (f"[{i}]" if len(prompts) > 1 else "")
                raise error.at(field)
            kept = list(p.examples)
            gone = kept.pop(molregpt.longest(kept))
            prompts[i] = _prompt(task, queries[i], kept, engine, options, count)
            prompts[i].n_requested, prompts[i].dropped = p.n_requested, [*p.dropped, gone]
        again = engine.generate(inputs(refused), options.params, adapter=options.adapter)
        for j, i in enumerate(refused):
            gens[i * n:(i + 1) * n] = again[j * n:(j + 1) * n]
        refused = [i for i in refused if gens[i * n].error is not None]
    return gens


def _primed(options: Options, engine: Generator) -> bool:
    """Whether a MolReGPT prompt ends with the start of the reply's JSON object: asked for,
    and the engine continues the text (a chat API writes the assistant's turn itself)."""
    return options.prime_answer and not engine.chat_api


def _reply(task: Task, prompt: Prompt, g: Generation) -> str:
    """A MolReGPT reply whole: the primed start of the JSON object (written into a text
    prompt) and the continuation."""
    primed = prompt.text.endswith(molregpt.answer_primer(task))
    return (molregpt.answer_primer(task) if primed else "") + g.text


def _answer(task: Task, prompt: Prompt, g: Generation, options: Options) -> str | None:
    """The answer in a generation (None: a MolReGPT reply with no well-formed answer)."""
    if options.prompt_style == "molregpt":
        return molregpt.parse_answer(task, _reply(task, prompt, g))
    return extract_answer(task, g.text, stop=options.params.stop)


def _retry_malformed(task: Task, prompts: list[Prompt], gens: list[Generation],
                     answers: list[list[str | None]], engine: Generator,
                     options: Options) -> None:
    """MolReGPT asked again when a reply was not the JSON it asked for: once, under the next
    seed, for sampled single answers (greedy decoding and beams would write the same reply
    again; consensus has its other samples). In place."""
    params = options.params
    if params.decoding != "sample":
        return
    bad = [i for i, a in enumerate(answers) if a[0] is None]
    if not bad:
        return
    again = engine.generate([GenerationInput(task, prompts[i].text, prompts[i].examples,
                                             messages=prompts[i].messages) for i in bad],
                            params.next_seed(1), adapter=options.adapter)
    for i, g in zip(bad, again):
        if g.error is None:
            g.completion_tokens += gens[i].completion_tokens  # both replies were written
            gens[i], answers[i] = g, [_answer(task, prompts[i], g, options)]


def _shown(messages: list[dict[str, str]] | None) -> str:
    """Chat messages as a response's ``prompt`` shows them."""
    return "".join(f"<{m['role']}>\n{m['content']}\n" for m in messages or [])


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
              engine: Generator | None, max_heavy_atoms: int | None = None) -> list[Outcome]:
    """Translate ``queries`` with the same options. Inputs that fail ``check_input`` get their
    error and the rest go on; a retrieval or engine failure (service down, unknown adapter)
    raises, because it concerns every input alike. ``engine`` None: retrieval only, each
    outcome holding its ``examples`` (the first stage of ``icma.jobs.ray_executor``)."""
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
    for i, ex in zip(ok, examples):
        out[i].examples, out[i].timings = list(ex), {"retrieval_ms": retrieval_ms}
    if engine is None:
        return out
    params = options.params
    todo = list(ok)
    for attempt in range(max(1, options.num_candidates)):
        if not todo:
            break
        # Each further candidate is a fresh sample: the same prompt under the next seed.
        p = params.next_seed(attempt)
        done = translate(task, [queries[i] for i in todo], [out[i].examples for i in todo],
                         engine, replace(options, params=p))
        still = []
        for i, t in zip(todo, done):
            o, prev = out[i], out[i].timings
            o.candidates_tried = attempt + 1
            o.translation, o.prompt = t, t.prompt  # the latest try: earlier ones were invalid
            o.timings = {"retrieval_ms": prev["retrieval_ms"],
                         "prompt_ms": t.timings["prompt_ms"] + prev.get("prompt_ms", 0.0),
                         "generation_ms": t.timings["generate_ms"] + prev.get("generation_ms",
                                                                              0.0)}
            if task == "cap2mol" and not t.valid:
                still.append(i)
        todo = still
    return out


def run_isolating(task: str, queries: Sequence[str], options: Options, retriever: Retriever,
                  engine: Generator | None, max_heavy_atoms: int | None = None) -> list[Outcome]:
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
               engine: Generator | None, max_heavy_atoms: int | None, bugs: list[Exception],
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
