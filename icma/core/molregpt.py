"""MolReGPT's prompt style: in-context translation with a general chat LLM, no tuning.

MolReGPT (Li et al., the predecessor of ICMA; ``../shared/design/icma-method.md`` section 8)
asks a chat model with one system message and one user message. The system message gives the
model an expert's role and the task, shows the retrieved examples as numbered examples (best
first), each with the JSON answer expected of it, and asks for that JSON only; the user
message is the query. The reply is parsed for its first JSON object: ``{"caption": ...}`` for
mol2cap, ``{"molecule": ...}`` for cap2mol (MolReGPT also accepted ``smiles`` and
``predicted_smiles``). The wording below is icma's, in MolReGPT's form.

ICMA's own prompts (``icma.core.prompts``) are plain text a model continues; these are chat
messages. An engine with a tokenizer renders them with its model's chat template
(``Generator.chat_text``); the ``openai`` engine sends them to a server's chat API.
"""

from __future__ import annotations

import json
import re
from typing import Callable, Sequence

from icma.core.prompts import Example, Renderer
from icma.core.rerank import Order, prompt_order
from icma.core.tasks import Task, check_task

#: MolReGPT's number of examples (its best results used 10).
N_SHOT = 10
#: What a request may ask for: ICMA's text prompts, or MolReGPT's chat messages.
PROMPT_STYLES = ("icma", "molregpt")
#: The JSON key of the answer, per task, and the other keys MolReGPT accepted for it.
ANSWER_KEYS: dict[str, tuple[str, ...]] = {"mol2cap": ("caption",),
                                           "cap2mol": ("molecule", "smiles", "predicted_smiles")}

_ROLE = ("You are an expert chemist working on drug discovery. A molecule caption is a sentence "
         "that describes a molecule: its structure, its properties and how it is made or used.")
_TASK = {
    "mol2cap": ("You will be given the SMILES string of a molecule. Write the molecule's caption.",
                "the SMILES string of the molecule"),
    "cap2mol": ("You will be given the caption of a molecule. Write the molecule as a SMILES "
                "string.", "the caption of the molecule"),
}
_CLOSE = ("Answer with that JSON object and nothing else: no explanation, no other text.")


def messages(task: Task, query: str, examples: Sequence[Example]) -> list[dict[str, str]]:
    """The chat messages for ``query`` with ``examples``, numbered from 1 in the order given."""
    task = check_task(task)
    instruction, what = _TASK[task]
    key = ANSWER_KEYS[task][0]
    parts = [_ROLE, instruction, ""]
    if examples:
        parts.append("Here are solved examples of the task.")
        for i, ex in enumerate(examples, 1):
            given, answer = (ex.smiles, ex.caption) if task == "mol2cap" else (ex.caption,
                                                                                ex.smiles)
            parts += ["", f"Example {i}:", f"Input: {given}", "Output:",
                      json.dumps({key: answer}, ensure_ascii=False)]
        parts.append("")
    parts.append(f"The input is {what}. The output is a JSON object with one key, "
                 f'"{key}", as in {json.dumps({key: "..."})}. {_CLOSE}')
    return [{"role": "system", "content": "\n".join(parts)},
            {"role": "user", "content": f"Input: {query}"}]


def answer_primer(task: Task) -> str:
    """The start of the reply an engine that writes the reply's text itself can put in the
    model's mouth (answer priming, as for ICMA prompts): the JSON object up to its value."""
    return '{"' + ANSWER_KEYS[check_task(task)][0] + '": "'


_OBJECT = re.compile(r"\{")
_LENIENT = re.compile(r'"(caption|molecule|smiles|predicted_smiles)"\s*:\s*"((?:[^"\\\n]|\\.)*)')


def parse_answer(task: Task, reply: str) -> str | None:
    """The answer in a chat reply: the value of the task's key in the first JSON object that
    has one (None: no such object, the reply is malformed)."""
    keys = ANSWER_KEYS[check_task(task)]
    decoder = json.JSONDecoder()
    for m in _OBJECT.finditer(reply):
        try:
            obj, _ = decoder.raw_decode(reply, m.start())
        except ValueError:
            continue
        if isinstance(obj, dict):
            for k in keys:
                if isinstance(obj.get(k), str):
                    return obj[k].strip()
    return None


def salvage_answer(task: Task, reply: str) -> str:
    """What a malformed reply still says: the text of the task's key up to where the string
    ends or the reply stops (a reply cut by the token limit has no closing quote); else ""."""
    keys = ANSWER_KEYS[check_task(task)]
    for m in _LENIENT.finditer(reply):
        if m.group(1) in keys:
            try:
                return json.loads(f'"{m.group(2)}"').strip()
            except ValueError:
                return m.group(2).strip()
    return ""


def longest(examples: Sequence[Example]) -> int:
    """The index of the longest example (molecule and caption characters): the one MolReGPT
    dropped when a server refused the prompt as too long."""
    return max(range(len(examples)), key=lambda i: len(examples[i].smiles)
               + len(examples[i].caption))


def renderer(task: Task, query: str, chat_text: Callable[[list[dict]], str | None],
             prime_answer: bool, order: Order = "ranked") -> Renderer:
    """``build_prompt``'s renderer for this style: the messages for the examples kept (numbered
    in ``order``: MolReGPT's is best first), and
    their text as ``chat_text`` writes it (the engine's chat template), ending with
    ``answer_primer`` if ``prime_answer``; text "" where the engine has no template of its own
    (a chat API takes the messages)."""

    def render(used: list[Example]):
        msgs = messages(task, query, prompt_order(used, order))
        text = chat_text(msgs)
        if text is None:
            return "", "", msgs
        return (text + answer_primer(task) if prime_answer else text), text, msgs

    return render
