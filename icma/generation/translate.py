"""Translation, both directions: examples -> prompt within budget -> engine -> answer.

Retrieval is the caller's: a service asks the retrieval service over HTTP, a benchmark or the
CLI searches a local index (``icma.retrieval.examples``). What is shared is everything after it, so a
served answer and a benchmarked one come from the same code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from icma.core import chem
from icma.generation.engines import Adapter, GenerationInput, GenerationParams, Generator
from icma.core.errors import InputError
from icma.core.prompts import Example, Task, build_prompt, check_query, check_task, extract_answer
from icma.core.rerank import Order


@dataclass
class PromptOptions:
    """How prompts are written. ``prime_answer``: append the answer marker (on for untuned
    models, off for ICMA-tuned checkpoints, which write it themselves); ``cutoff``: the token
    budget of prompt + answer (ICMA: 2048)."""

    prime_answer: bool = True
    order: Order = "reversed"
    cutoff: int = 2048


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


def translate(task: str, queries: Sequence[str], examples: Sequence[Sequence[Example]],
              engine: Generator, *, params: GenerationParams | None = None,
              prompt: PromptOptions = PromptOptions(),
              adapter: Adapter | None = None) -> list[Translation]:
    """Translate each query with its examples (best first; empty lists for zero-shot)."""
    task = check_task(task)
    if len(queries) != len(examples):
        raise InputError(f"{len(queries)} queries but {len(examples)} example lists",
                         field="examples")
    params = (params or GenerationParams.for_task(task)).checked()
    t0 = time.perf_counter()
    count = engine.count_tokens if engine.count_tokens("x") is not None else None  # budget?
    prompts = []
    for i, (q, ex) in enumerate(zip(queries, examples)):
        try:
            check_query(task, q)
        except InputError as exc:
            raise InputError(str(exc), field=f"{exc.field}[{i}]" if len(queries) > 1
                             else exc.field) from None
        prompts.append(build_prompt(task, q, ex, order=prompt.order,
                                    prime_answer=prompt.prime_answer, count_tokens=count,
                                    cutoff=prompt.cutoff, reserve=params.max_new_tokens))
    t1 = time.perf_counter()
    gens = engine.generate([GenerationInput(task, p.text, p.examples) for p in prompts], params,
                           adapter=adapter)
    t2 = time.perf_counter()
    out = []
    per_query = {"prompt_ms": (t1 - t0) * 1e3 / max(len(queries), 1),
                 "generate_ms": (t2 - t1) * 1e3 / max(len(queries), 1)}
    for q, p, g in zip(queries, prompts, gens):
        answer = extract_answer(task, g.text, stop=params.stop)
        t = Translation(task, q, answer, g.text, p.examples, p.n_requested, len(p.dropped),
                        g.prompt_tokens or (p.n_tokens or 0), g.completion_tokens,
                        g.finish_reason, timings=dict(per_query), prompt=p.text)
        if task == "cap2mol":
            t.canonical = chem.try_canonical(answer)[0] if answer else None
            t.valid = t.canonical is not None
        out.append(t)
    return out
