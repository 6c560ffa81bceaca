"""The two tasks, each defined once: what a query and an answer are, how many examples ICMA
gives, which retrieval methods serve it, the answer marker and its decoding defaults.

Everything that differs between mol2cap and cap2mol reads it from here (prompts, retrieval
requests, request schemas, tuning configs, the CLI), so the defaults cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from icma.core.errors import InputError

Task = Literal["mol2cap", "cap2mol"]


@dataclass(frozen=True)
class TaskSpec:
    name: Task
    query: str  # the query's field name in requests and errors
    answer: str  # the answer's field name
    n_shot: int  # ICMA's released number of examples
    methods: tuple[str, ...]  # retrieval methods for its queries (the retrieval service's names)
    marker: str  # the line that introduces the answer in ICMA's prompts
    exclude_same: str  # the retrieval field that drops examples equal to the query
    repetition_penalty: float  # ICMA's inference setting
    molregpt_method: str  # MolReGPT's retrieval (its "morgan" is RDKit's path fingerprint)

    @property
    def default_method(self) -> str:
        return self.methods[0]


TASK_SPECS: dict[str, TaskSpec] = {
    "mol2cap": TaskSpec("mol2cap", query="smiles", answer="caption", n_shot=2,
                        methods=("graph", "morgan", "rdkit", "random"), marker="Caption:",
                        exclude_same="exclude_same_structure", repetition_penalty=1.0,
                        molregpt_method="rdkit"),
    "cap2mol": TaskSpec("cap2mol", query="caption", answer="smiles", n_shot=4,
                        methods=("bm25", "sentence", "random"), marker="Molecule:",
                        exclude_same="exclude_same_caption", repetition_penalty=0.8,
                        molregpt_method="bm25"),
}
TASKS: tuple[Task, ...] = tuple(TASK_SPECS)  # type: ignore[assignment]
#: Every retrieval method, once (for schemas that take either task's).
ALL_METHODS: tuple[str, ...] = tuple(dict.fromkeys(m for s in TASK_SPECS.values()
                                                   for m in s.methods))


def per_task(attr: str) -> str:
    """A default as help texts say it: ``per_task("n_shot")`` -> "2 (mol2cap), 4 (cap2mol)"."""
    return ", ".join(f"{getattr(s, attr)} ({t})" for t, s in TASK_SPECS.items())


def check_task(task: str, field: str = "task") -> Task:
    if task not in TASK_SPECS:
        raise InputError(f"unknown task {task!r}; use {' or '.join(TASKS)}", field=field)
    return task  # type: ignore[return-value]


def spec(task: str) -> TaskSpec:
    return TASK_SPECS[check_task(task)]


def check_method(task: str, method: str | None, field: str = "retrieval.method") -> str:
    """The method to use (the task's default for None); one of the other task's is an error."""
    s = spec(task)
    if method is None:
        return s.default_method
    if method not in s.methods:
        raise InputError(f"{method!r} does not retrieve for {task}; use one of "
                         f"{', '.join(s.methods)}", field=field)
    return method
