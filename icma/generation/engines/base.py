"""One interface for every engine: prompts (with their examples) in, continuations out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from icma.core.errors import InputError
from icma.core.prompts import DEFAULT_EOS, Example, Task

Decoding = Literal["sample", "greedy", "beam"]
DECODINGS: tuple[str, ...] = ("sample", "greedy", "beam")


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings. The defaults are ICMA's inference: sampling at temperature 0.7,
    top_p 0.85, top_k 40, one beam, 256 new tokens, seed 42 (``for_task`` adds its repetition
    penalty of 0.8 for cap2mol)."""

    max_new_tokens: int = 256
    decoding: Decoding = "sample"
    temperature: float = 0.7
    top_p: float = 0.85
    top_k: int = 40
    num_beams: int = 4  # beam search only
    repetition_penalty: float = 1.0
    seed: int = 42
    #: Generation ends at the model's own EOS / end-of-turn token or at any of these texts.
    stop: tuple[str, ...] = (DEFAULT_EOS, "\n\n")

    @classmethod
    def for_task(cls, task: Task, **overrides) -> "GenerationParams":
        base = {"repetition_penalty": 0.8} if task == "cap2mol" else {}
        return cls(**{**base, **overrides}).checked()

    def checked(self) -> "GenerationParams":
        def bad(name, why):
            raise InputError(f"{name} {why}, got {getattr(self, name)!r}", field=name)

        if not 1 <= self.max_new_tokens <= 4096:
            bad("max_new_tokens", "must be between 1 and 4096")
        if self.decoding not in DECODINGS:
            bad("decoding", f"must be one of {', '.join(DECODINGS)}")
        if not 0 < self.temperature <= 10:
            bad("temperature", "must be above 0 and at most 10")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be above 0 and at most 1")
        if self.top_k < 0:
            bad("top_k", "must be >= 0 (0 = no top-k cut)")
        if not 1 <= self.num_beams <= 16:
            bad("num_beams", "must be between 1 and 16")
        if not 0 < self.repetition_penalty <= 10:
            bad("repetition_penalty", "must be above 0 and at most 10")
        return self


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter folder (peft ``save_pretrained`` layout) under the name clients use."""

    name: str
    path: Path


@dataclass
class GenerationInput:
    task: Task
    prompt: str  # what an LLM continues
    examples: list[Example] = field(default_factory=list)  # best first


@dataclass
class Generation:
    text: str  # the continuation, cut before the first stop text
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: Literal["stop", "length"] = "stop"


class Generator(ABC):
    """An engine. ``name`` is the engine kind, ``model`` what it runs (for responses and
    reports), ``adapter`` the LoRA adapter given at construction, if any.

    ``generate(..., adapter=...)`` applies an adapter to that call only (the worker serves
    many adapters over one base model); ``None`` means the construction-time adapter, if any,
    else the base model. Engines load an adapter on its first use and keep it."""

    name: str = ""
    model: str = ""
    adapter: str | None = None

    @abstractmethod
    def generate(self, inputs: Sequence[GenerationInput], params: GenerationParams,
                 adapter: Adapter | None = None) -> list[Generation]: ...

    def count_tokens(self, text: str) -> int | None:
        """Tokens of ``text`` as the model sees it, for the prompt budget (None: no budget)."""
        return None

    def close(self) -> None:
        """Free the model (engines holding a GPU override this)."""


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop text, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
