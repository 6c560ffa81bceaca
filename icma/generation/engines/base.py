"""One interface for every engine: prompts (with their examples) in, continuations out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Sequence

from icma.core.errors import IcmaError, InputError
from icma.core.prompts import DEFAULT_EOS, Example
from icma.core.tasks import Task, spec

Decoding = Literal["sample", "greedy", "beam", "consensus"]
#: ``consensus`` samples ``num_samples`` answers per prompt and returns the most central of
#: them and the examples' answers (``icma.generation.consensus``); to an engine it is sampling.
DECODINGS: tuple[str, ...] = ("sample", "greedy", "beam", "consensus")


#: The range of each decoding setting, defined once: ``GenerationParams.checked`` enforces it
#: and the worker's request schema declares it (pydantic's gt/ge/le).
BOUNDS: dict[str, dict[str, float]] = {
    "max_new_tokens": {"ge": 1, "le": 4096},
    "temperature": {"gt": 0, "le": 10},
    "top_p": {"gt": 0, "le": 1},
    "top_k": {"ge": 0, "le": 2**31 - 1},  # 0: no top-k cut; vLLM keeps top_k in 32 bits
    "num_beams": {"ge": 1, "le": 16},
    # Positive logits are divided by the penalty: a tiny one overflows them to inf (1e-300 is
    # 0 in float32), and sampling from inf fails the whole batch.
    "repetition_penalty": {"ge": 0.01, "le": 10},
    "no_repeat_ngram_size": {"ge": 0, "le": 64},  # 0: off
    # Continuations per prompt; a server caps consensus further (ICMA_MAX_SAMPLES).
    "num_samples": {"ge": 1, "le": 64},
    "seed": {"ge": 0, "le": 2**63 - 1},
}
_WORDS = {"gt": "above", "ge": "at least", "le": "at most"}
_INTEGERS = ("max_new_tokens", "top_k", "num_beams", "no_repeat_ngram_size", "num_samples",
             "seed")

#: Sampling colder than this decodes greedily (the most likely token each step). Sampling at
#: such a temperature is greedy decoding in all but rounding, and far colder ones (1e-40 with
#: the transformers engine) overflow the logits to inf and fail the batch; vLLM clamps anything
#: below 0.01 up to 0.01, with a warning per request.
MIN_SAMPLING_TEMPERATURE = 0.01


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings. The defaults are ICMA's inference: sampling at temperature 0.7,
    top_p 0.85, top_k 40, one beam, 256 new tokens, seed 42 (``for_task`` adds the task's
    repetition penalty: 0.8 for cap2mol)."""

    max_new_tokens: int = 256
    decoding: Decoding = "sample"
    temperature: float = 0.7
    top_p: float = 0.85
    top_k: int = 40
    num_beams: int = 4  # beam search only
    repetition_penalty: float = 1.0
    #: No n-gram of this many tokens occurs twice in the answer (0: off). Only the generated
    #: tokens count, unlike transformers' option of the same name, which also bans every n-gram
    #: of the prompt: an ICMA prompt's examples hold the phrases a good answer reuses.
    no_repeat_ngram_size: int = 0
    #: Continuations per prompt: sampling only (``consensus``: the pool's samples).
    num_samples: int = 1
    seed: int = 42
    #: Generation ends at the model's own EOS / end-of-turn token or at any of these texts.
    stop: tuple[str, ...] = (DEFAULT_EOS, "\n\n")

    @classmethod
    def for_task(cls, task: Task, **overrides) -> "GenerationParams":
        base = {"repetition_penalty": spec(task).repetition_penalty}
        return cls(**{**base, **overrides}).checked()

    def checked(self) -> "GenerationParams":
        if self.decoding not in DECODINGS:
            raise InputError(f"decoding must be one of {', '.join(DECODINGS)}, got "
                             f"{self.decoding!r}", field="decoding")
        for name, bound in BOUNDS.items():
            value = getattr(self, name)
            kinds = int if name in _INTEGERS else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds):
                what = "an integer" if name in _INTEGERS else "a number"
                raise InputError(f"{name} must be {what}, got {value!r}", field=name)
            if not all(_holds(op, value, limit) for op, limit in bound.items()):
                rule = " and ".join(f"{_WORDS[op]} {limit}" for op, limit in bound.items())
                raise InputError(f"{name} must be {rule}, got {value!r}", field=name)
        if self.decoding == "consensus" and self.num_samples < 2:
            raise InputError(f"consensus needs at least 2 samples, got {self.num_samples}",
                             field="num_samples")
        if self.decoding in ("greedy", "beam") and self.num_samples != 1:
            raise InputError(f"{self.decoding} decoding writes one answer per prompt; "
                             f"num_samples is for sampling", field="num_samples")
        return self

    def for_engine(self) -> "GenerationParams":
        """What an engine runs: the settings checked, consensus as the sampling it needs, and
        sampling colder than ``MIN_SAMPLING_TEMPERATURE`` turned into greedy decoding (one
        answer per prompt: every sample would be the same)."""
        params = self.checked()
        if params.decoding == "consensus":
            params = replace(params, decoding="sample")
        if params.decoding == "sample" and params.temperature < MIN_SAMPLING_TEMPERATURE:
            return replace(params, decoding="greedy", num_samples=1)
        return params

    @property
    def samples_per_prompt(self) -> int:
        """Generations an engine returns per prompt for these settings."""
        return self.for_engine().num_samples

    def next_seed(self, n: int) -> "GenerationParams":
        """The same settings ``n`` seeds on (another sample of the same prompt), wrapping
        within the seed's range."""
        return replace(self, seed=(self.seed + n) % (BOUNDS["seed"]["le"] + 1))


def _holds(op: str, value, limit) -> bool:
    return value > limit if op == "gt" else value >= limit if op == "ge" else value <= limit


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter folder (peft ``save_pretrained`` layout) under the name clients use."""

    name: str
    path: Path


@dataclass
class GenerationInput:
    task: Task
    prompt: str  # what an LLM continues ("" where only a chat API takes ``messages``)
    examples: list[Example] = field(default_factory=list)  # best first
    #: A chat prompt style's messages (MolReGPT's): the ``openai`` engine sends them to the
    #: server's chat API; engines with a tokenizer continue ``prompt``, their chat template's
    #: rendering of them.
    messages: list[dict[str, str]] | None = None


@dataclass
class Generation:
    text: str  # the continuation, cut before the first stop text
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: Literal["stop", "length"] = "stop"
    draft_tokens: int = 0  # proposed by prompt-lookup speculation
    accepted_tokens: int = 0  # of those, kept in the answer
    #: The server refused this prompt (``openai`` engine: too long for its context) and the
    #: rest of the call went on; the pipeline decides (MolReGPT drops an example and retries).
    error: IcmaError | None = None


class Generator(ABC):
    """An engine. ``name`` is the engine kind, ``model`` what it runs (for responses and
    reports), ``adapter`` the LoRA adapter given at construction, if any.

    ``generate(..., adapter=...)`` applies an adapter to that call only (the worker serves
    many adapters over one base model); ``None`` means the construction-time adapter, if any,
    else the base model. Engines load an adapter on its first use and keep it."""

    name: str = ""
    model: str = ""
    adapter: str | None = None
    #: Chat prompts go to a chat API (the openai engine), which writes the assistant's turn
    #: itself: no answer priming; ``chat_text`` then serves only to count tokens.
    chat_api: bool = False

    @abstractmethod
    def generate(self, inputs: Sequence[GenerationInput], params: GenerationParams,
                 adapter: Adapter | None = None) -> list[Generation]:
        """``params.samples_per_prompt`` generations per input, input by input (input 0's
        samples first)."""

    def count_tokens(self, text: str) -> int | None:
        """Tokens of ``text`` as the model sees it, for the prompt budget (None: no budget)."""
        return None

    def chat_text(self, messages: list[dict[str, str]]) -> str | None:
        """``messages`` as the text the model continues, written by its tokenizer's chat
        template with the assistant's turn opened (None: no tokenizer here; a chat API renders
        them). A tokenizer without a template cannot take a chat prompt style."""
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is None:
            return None
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(f"the model {self.model or ''} has no chat template, which prompt "
                             "style 'molregpt' needs: use 'icma'", field="prompt_style")
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)

    def close(self) -> None:
        """Free the model (engines holding a GPU override this)."""


def banned_tokens(generated: Sequence[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram of ``generated`` (the answer's tokens so far): the
    tokens that followed each earlier occurrence of its last ``n - 1`` tokens. Both engines ban
    them, so ``no_repeat_ngram_size`` means the same in each."""
    if n < 1 or len(generated) < n - 1:
        return []
    if n == 1:
        return sorted(set(generated))
    tail = tuple(generated[len(generated) - n + 1:])
    return sorted({generated[i + n - 1] for i in range(len(generated) - n + 1)
                   if tuple(generated[i:i + n - 1]) == tail})


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop text, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
