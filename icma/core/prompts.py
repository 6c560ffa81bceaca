"""ICMA prompts, byte for byte, assembled within a token budget, and answer extraction.

The released ICMA checkpoints were tuned on exactly these strings: a changed space or newline
costs quality, so the templates are constants pinned by tests. Examples are given best first and
written in ``order`` (default: reversed, the best example last, right before the query).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from icma.core.chem import MAX_SMILES_CHARS
from icma.core.errors import InputError, PromptTooLongError
from icma.core.rerank import Order, prompt_order
from icma.core.tasks import Task, check_task, spec

PROMPT_FORMAT_VERSION = "icma-1"
DEFAULT_EOS = "</s>"
MAX_QUERY_CHARS = 8192
#: The longest text of each kind (the tasks' ``query`` and ``answer`` names) the services take.
MAX_CHARS = {"smiles": MAX_SMILES_CHARS, "caption": MAX_QUERY_CHARS}

# Per task: (example block, final line with examples, zero-shot line); the answer marker is
# the task's (icma.core.tasks). {q} is the query side (SMILES for mol2cap, caption for
# cap2mol), {a} the answer side.
TEMPLATES: dict[str, tuple[str, str, str]] = {
    "mol2cap": (
        "Generate a caption for the molecule: {q}\nCaption: {a}\n\n",
        "Based on the above examples, analyse the similarities and differences between the "
        "examples and finally generate a caption for the molecule: {q}. \n",
        "Generate a caption for the molecule: {q}\n",
    ),
    "cap2mol": (
        "Generate a molecule for the caption: {q}\nMolecule: {a}\n\n",
        "Based on the above examples, analyse the similarities and differences between the "
        "examples and finally generate a molecule for the caption: {q}\n",
        "Generate a molecule for the caption: {q}\n",
    ),
}

#: Counts the tokens of a text; None means no budget is applied.
TokenCounter = Callable[[str], int]


@dataclass(frozen=True)
class Example:
    """One molecule-caption pair placed in a prompt (metadata rides along for responses)."""

    smiles: str
    caption: str
    cid: str | None = None
    score: float | None = None


@dataclass
class Prompt:
    text: str  # what the engine receives (stripped; primed with the marker if asked)
    raw: str  # the unstripped ICMA prompt, as used in training text
    examples: list[Example]  # used, best first
    n_requested: int
    n_tokens: int | None = None
    dropped: list[Example] = field(default_factory=list)  # lowest-ranked, dropped for budget
    messages: list[dict[str, str]] | None = None  # chat prompt styles: what a chat API gets


#: A prompt style's rendering of the examples kept so far: (text for the engine, raw text,
#: chat messages or None). ``text`` is "" where only a chat API takes the messages.
Renderer = Callable[[list[Example]], tuple[str, str, "list[dict[str, str]] | None"]]


def check_query(task: Task, query: str) -> str:
    name = spec(task).query
    if not isinstance(query, str) or not query.strip():
        raise InputError(f"empty {name}", field=name)
    if len(query) > MAX_QUERY_CHARS:
        raise InputError(f"{name} longer than {MAX_QUERY_CHARS} characters", field=name)
    return query


def marker(task: Task) -> str:
    return spec(task).marker


def render(task: Task, query: str, examples: Sequence[Example], order: Order = "reversed") -> str:
    """The unstripped ICMA prompt for a query and its examples (given best first)."""
    block, final, zero_shot = TEMPLATES[check_task(task)]
    check_query(task, query)
    if not examples:
        return zero_shot.format(q=query)
    parts = []
    for ex in prompt_order(examples, order):
        q, a = (ex.smiles, ex.caption) if task == "mol2cap" else (ex.caption, ex.smiles)
        parts.append(block.format(q=q, a=a))
    parts.append(final.format(q=query))
    return "".join(parts)


def inference_text(task: Task, raw: str, prime_answer: bool) -> str:
    """Strip outer whitespace (as ICMA did); append the answer marker for untuned models."""
    text = raw.strip()
    return f"{text}\n{marker(task)}" if prime_answer else text


def build_prompt(
    task: Task,
    query: str,
    examples: Sequence[Example],
    *,
    order: Order = "reversed",
    prime_answer: bool = False,
    count_tokens: TokenCounter | None = None,
    cutoff: int = 2048,
    reserve: int = 256,
    renderer: Renderer | None = None,
) -> Prompt:
    """Assemble the inference prompt, fitting ``cutoff`` tokens with ``reserve`` left for the answer.

    ICMA truncated the token sequence on the right, which could cut the query. Here the
    lowest-ranked examples are dropped first until the prompt fits; the query is never cut, and
    a query that does not fit alone is an error. ``renderer``: another prompt style's (default
    ICMA's, ordered by ``order`` and primed by ``prime_answer``).
    """
    check_task(task)
    if count_tokens is not None and reserve >= cutoff:
        raise InputError(f"answer reserve {reserve} must be below the cutoff {cutoff}",
                         field="max_new_tokens")
    used = list(examples)
    dropped: list[Example] = []
    while True:
        if renderer is None:
            raw = render(task, query, used, order)
            text, messages = inference_text(task, raw, prime_answer), None
        else:
            text, raw, messages = renderer(used)
        if count_tokens is None:
            return Prompt(text, raw, used, len(examples), None, dropped, messages)
        n = count_tokens(text)
        if n + reserve <= cutoff:
            return Prompt(text, raw, used, len(examples), n, dropped, messages)
        if not used:
            raise PromptTooLongError(
                f"the query alone takes {n} tokens; with {reserve} reserved for the answer it "
                f"exceeds the cutoff of {cutoff}", field=spec(task).query)
        dropped.insert(0, used.pop())


def training_text(task: Task, query: str, answer: str, examples: Sequence[Example], *,
                  order: Order = "reversed", eos: str = DEFAULT_EOS) -> str:
    """ICMT training text: the unstripped prompt + marker + answer + EOS."""
    return f"{render(task, query, examples, order)}{marker(task)} {answer}{eos}"


def extract_answer(task: Task, generated: str, stop: Sequence[str] = (DEFAULT_EOS,)) -> str:
    """The answer in a model's continuation of the prompt.

    Cut at the first stop string (``</s>``, the model's own EOS/end-of-turn), then take the text
    after the last answer marker, up to a blank line. A SMILES cannot span lines, so for cap2mol
    the answer also ends at the first line break.
    """
    text = generated
    for s in stop:
        if s:
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
    m = marker(task)
    # Only a marker at the start of a line counts, so "Caption:" inside a caption is kept.
    pos = max(text.rfind("\n" + m), 0 if text.lstrip().startswith(m) else -1)
    if pos >= 0:
        text = text[text.find(m, pos) + len(m):]
    text = text.strip()
    text = text.split("\n\n", 1)[0]
    if task == "cap2mol":
        text = text.split("\n", 1)[0].strip()
    return text.strip()


def hf_token_counter(tokenizer) -> TokenCounter:
    """A TokenCounter for a transformers tokenizer (special tokens included, as generate sees)."""
    return lambda text: len(tokenizer(text)["input_ids"])
