"""ICMT training examples: leak-free retrieved contexts, serving's prompt, the answer, EOS.

A training example is split where serving splits it: ``prompt`` is exactly the text the worker
gives the engine for the same query and examples (stripped, answer marker appended when
``prime_answer``), tokenised exactly as the engine tokenises it; ``completion`` is what the model
must write after it (the answer and EOS; without priming also the newline and marker that ICMA's
tuned models write themselves). ``prompt + completion`` is then ICMA's training text (prompt,
``Caption: {answer}``, EOS), only without the outer whitespace ICMA strips at inference when
priming is on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from icma.core.corpus import Record
from icma.core.errors import InputError
from icma.retrieval.examples import training_contexts
from icma.core.prompts import Example, Task, build_prompt, marker
from icma.core.rerank import RerankConfig
from icma.retrieval import ExclusionRule
from icma.retrieval.base import Index
from icma.tuning.batches import IGNORE



@dataclass
class TrainingExample:
    cid: str
    prompt: str  # what serving gives the engine
    completion: str  # what the model learns to write after it
    examples: list[Example]  # in the prompt, best first
    input_ids: list[int]
    labels: list[int]
    n_dropped: int = 0  # examples dropped to fit the cutoff

    @property
    def text(self) -> str:
        return self.prompt + self.completion


@dataclass
class TrainingSet:
    task: Task
    examples: list[TrainingExample]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (cid, why)

    def stats(self) -> dict:
        lengths = sorted(len(e.input_ids) for e in self.examples)
        answer = [sum(1 for x in e.labels if x != IGNORE) for e in self.examples]
        shots = [len(e.examples) for e in self.examples]
        return {"examples": len(self.examples), "skipped": len(self.skipped),
                "tokens": sum(lengths), "loss_tokens": sum(answer),
                "max_tokens": lengths[-1] if lengths else 0,
                "median_tokens": lengths[len(lengths) // 2] if lengths else 0,
                "mean_examples_in_prompt": sum(shots) / len(shots) if shots else 0.0,
                "examples_dropped": sum(e.n_dropped for e in self.examples)}


def answer_side(task: Task, record: Record) -> tuple[str, str]:
    """(query, answer) of a record for a task, as serving receives the query."""
    if task == "mol2cap":
        return record.canonical or record.smiles, record.description
    return record.description, record.smiles


class Tokens:
    """The tokenizer as the engines use it: prompts with the tokenizer's special tokens (what
    ``generate`` receives), completions without; ``eos='model'`` ends each with the EOS id."""

    def __init__(self, tokenizer, eos: str, model_eos_id: int | None = None):
        self.tokenizer = tokenizer
        self.eos_text = eos
        self.eos_id: int | None = None
        if eos == "model":  # the tokenizer's EOS, else the model config's (what generate stops at)
            self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None \
                else model_eos_id
            if self.eos_id is None:
                raise InputError("the tokenizer has no EOS token; give the EOS text instead "
                                 "(e.g. '</s>')", field="eos")
            self.eos_text = ""

    def prompt(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def completion(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids + [self.eos_id] if self.eos_id is not None else ids

    def count(self, text: str) -> int:
        return len(self.prompt(text))


def completion_for(task: Task, raw: str, prompt: str, answer: str, prime_answer: bool,
                   eos: str) -> str:
    """What follows serving's ``prompt`` in the training text. ``raw`` is the unstripped ICMA
    prompt: without priming, its stripped tail (ICMA's ``' \\n'``) and the marker come first."""
    if prime_answer:
        return f" {answer}{eos}"
    if not raw.startswith(prompt):
        raise AssertionError("a stripped prompt must be a prefix of the raw prompt")
    return f"{raw[len(prompt):]}{marker(task)} {answer}{eos}"


def build_example(task: Task, record: Record, examples: Sequence[Example], tokens: Tokens, *,
                  cutoff: int, prime_answer: bool, order: str = "reversed",
                  train_on_inputs: bool = False) -> TrainingExample:
    """One training example within ``cutoff`` tokens (lowest-ranked examples dropped first).
    Raises InputError when the query and answer alone do not fit."""
    query, answer = answer_side(task, record)
    if not answer.strip():
        raise InputError("empty answer", field="train")
    full = build_prompt(task, query, examples, order=order, prime_answer=prime_answer)
    reserve = len(tokens.completion(
        completion_for(task, full.raw, full.text, answer, prime_answer, tokens.eos_text)))
    if reserve >= cutoff:
        raise InputError(f"the answer alone takes {reserve} tokens, not below the cutoff "
                         f"{cutoff}", field="cutoff")
    p = build_prompt(task, query, examples, order=order, prime_answer=prime_answer,
                     count_tokens=tokens.count, cutoff=cutoff, reserve=reserve)
    completion = completion_for(task, p.raw, p.text, answer, prime_answer, tokens.eos_text)
    prompt_ids, completion_ids = tokens.prompt(p.text), tokens.completion(completion)
    if len(prompt_ids) + len(completion_ids) > cutoff:  # zero-shot fallback's longer tail
        raise InputError(f"needs {len(prompt_ids) + len(completion_ids)} tokens, more than "
                         f"the cutoff {cutoff}", field="cutoff")
    labels = (prompt_ids if train_on_inputs else [IGNORE] * len(prompt_ids)) + completion_ids
    labels[0] = IGNORE  # the first token has nothing before it to be predicted from
    return TrainingExample(record.cid, p.text, completion, p.examples,
                           prompt_ids + completion_ids, labels, len(p.dropped))


def build_training_set(task: Task, records: Sequence[Record], index: Index, tokens: Tokens, *,
                       n_shot: int, cutoff: int, prime_answer: bool, order: str = "reversed",
                       rerank: RerankConfig = RerankConfig(),
                       rule: ExclusionRule = ExclusionRule(),
                       train_on_inputs: bool = False) -> TrainingSet:
    """Examples for ``records`` with contexts from ``index`` (each record's own CID, and
    optionally its structure or caption, excluded). Records that cannot fit the cutoff even
    without examples, or lack an answer, are skipped and listed."""
    usable, out = [], TrainingSet(task, [])
    for r in records:
        if r.canonical is None and task == "mol2cap":
            out.skipped.append((r.cid, "SMILES does not parse"))
        else:
            usable.append(r)
    contexts = training_contexts(index, n_shot, rerank=rerank, rule=rule, records=usable)
    for record, examples in zip(usable, contexts):
        try:
            out.examples.append(build_example(task, record, examples, tokens, cutoff=cutoff,
                                              prime_answer=prime_answer, order=order,
                                              train_on_inputs=train_on_inputs))
        except InputError as exc:
            out.skipped.append((record.cid, str(exc)))
    return out
