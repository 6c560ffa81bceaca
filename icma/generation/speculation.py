"""Prompt-lookup speculative decoding: greedy generation that verifies copied tokens in bulk.

An ICMA answer copies long spans of the retrieved examples that stand in its prompt (and an
answer that loops copies itself). So each step, every row of a batch drafts up to ``k`` tokens
by finding the latest earlier occurrence of its last ``n`` tokens (``n = max_ngram … 1``) in
its prompt and answer so far, and taking what followed them there. One forward pass scores the
row's last token and its drafts together; the row keeps the drafts up to the first one greedy
decoding would not have chosen, plus greedy's own choice at that position. Every kept token is
the model's argmax given the same prefix, so the answer is greedy decoding's; only rounding can
differ, because a pass over several positions sums in another order than a pass over one
(measured in ``benchmarks/results/speculation.md``). A step that accepts nothing still yields
one token, so it is never slower in steps than plain decoding, only in the extra positions each
pass computes: a win where the model copies, which is where an ICMA prompt puts it.

The rows of a batch accept different numbers of drafts. Rather than cropping the shared key and
value cache row by row, rejected drafts stay in the cache as holes: the attention mask hides
them, and each row's position ids count only what it kept. Finished rows leave the batch.

Sampling is not speculated here: verifying a draft against a sampled token is exact only in
distribution (speculative sampling), and it would change which answer a seed gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

#: ``adjust(context, generated, logits)``: the logits greedy decoding takes the argmax of, for
#: the next token after ``generated`` (the answer so far) given the prompt's ``context`` tokens.
Adjust = Callable[[list[int], list[int], "object"], "object"]


@dataclass
class Row:
    """One prompt's continuation."""

    tokens: list[int] = field(default_factory=list)  # generated, ending at EOS if it ended
    finished: bool = False  # ended by an EOS token or ``stopped`` (else the length limit)
    drafted: int = 0  # tokens proposed by prompt lookup
    accepted: int = 0  # of those, the ones greedy decoding confirmed and the answer kept


def draft(tokens: Sequence[int], k: int, max_ngram: int) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the last ``n`` tokens
    of ``tokens``, for the largest ``n <= max_ngram`` that occurs earlier (nothing if none)."""
    size = len(tokens)
    if k <= 0:
        return []
    for n in range(min(max_ngram, size - 1), 0, -1):
        tail = list(tokens[size - n:])
        first = tail[0]
        for start in range(size - n - 1, -1, -1):  # latest first: a loop repeats its last turn
            if tokens[start] == first and list(tokens[start:start + n]) == tail:
                return list(tokens[start + n:start + n + k])
    return []


def greedy_generate(net, input_ids, attention_mask, *, max_new_tokens: int,
                    eos_ids: Sequence[int], k: int, max_ngram: int = 3,
                    adjust: Adjust | None = None,
                    stopped: Callable[[list[int]], bool] | None = None,
                    pad_id: int = 0) -> list[Row]:
    """Greedy continuations of a left-padded batch with prompt-lookup drafts of up to ``k``
    tokens (``k = 0``: plain greedy decoding, one token per pass). ``adjust`` changes the
    logits before each argmax (repetition penalty, banned n-grams); ``stopped`` ends a row
    whose answer so far holds a stop text. ``net``: a causal LM taking ``position_ids`` and a
    transformers cache."""
    import torch
    from transformers import DynamicCache

    eos = set(eos_ids)
    size = input_ids.shape[0]
    context = [input_ids[r][attention_mask[r].bool()].tolist() for r in range(size)]
    rows = [Row() for _ in range(size)]
    mask = attention_mask.to(torch.long, copy=True)  # (grown and edited below)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kv = DynamicCache(config=net.config)
    cache = {_cache_argument(net): kv}
    with torch.inference_mode():
        logits = net(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                     use_cache=True, **cache).logits[:, -1:]
    live = list(range(size))  # batch position -> row
    drafts: list[list[int]] = [[] for _ in live]
    next_pos = positions[:, -1]  # becomes: the position of the token each row feeds next
    while True:
        preds = None if adjust is not None else logits.argmax(-1).tolist()
        kept = []
        for j, r in enumerate(live):
            row, d = rows[r], drafts[j]
            new = _confirm(logits[j], d, context[r], row.tokens, adjust) if preds is None \
                else _longest_match(preds[j], d)
            row.drafted += len(d)
            appended = _append(row, new, eos, max_new_tokens, stopped)
            row.accepted += min(appended, len(new) - 1)
            kept.append(len(new))
        # Hide the rejected drafts (after the prefill: its last column, which every row keeps).
        width = logits.shape[1]
        mask[:, -width:] = (torch.arange(width, device=mask.device)[None, :]
                            < torch.tensor(kept, device=mask.device)[:, None]).long()
        next_pos = next_pos + torch.tensor(kept, device=next_pos.device)
        stay = [j for j, r in enumerate(live) if not _done(rows[r], max_new_tokens)]
        if not stay:
            return rows
        if len(stay) < len(live):  # finished rows leave the batch
            index = torch.tensor(stay, device=mask.device)
            kv.batch_select_indices(index)
            mask, next_pos = mask[index], next_pos[index]
            live = [live[j] for j in stay]
        drafts = [draft(context[r] + rows[r].tokens,
                        min(k, max_new_tokens - len(rows[r].tokens) - 1), max_ngram)
                  for r in live]
        width = 1 + max(len(d) for d in drafts)
        chunk = torch.full((len(live), width), pad_id, dtype=input_ids.dtype)
        fed = torch.zeros((len(live), width), dtype=mask.dtype)
        for j, r in enumerate(live):
            chunk[j, 0] = rows[r].tokens[-1]
            chunk[j, 1:1 + len(drafts[j])] = torch.tensor(drafts[j], dtype=input_ids.dtype)
            fed[j, :1 + len(drafts[j])] = 1
        mask = torch.cat([mask, fed.to(mask.device)], dim=1)
        pos = next_pos[:, None] + torch.arange(width, device=next_pos.device)[None, :]
        with torch.inference_mode():
            logits = net(input_ids=chunk.to(input_ids.device), attention_mask=mask,
                         position_ids=pos, use_cache=True, **cache).logits


def _cache_argument(net) -> str:
    """The name a model's forward() takes its key/value cache by: transformers renamed
    ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40)."""
    import inspect

    base = net.get_base_model() if hasattr(net, "get_base_model") else net  # under peft
    return "cache" if "cache" in inspect.signature(base.forward).parameters \
        else "past_key_values"


def _longest_match(preds: list[int], drafts: list[int]) -> list[int]:
    """Greedy's tokens for one row: the drafts it agrees with, then its own next choice."""
    a = 0
    while a < len(drafts) and drafts[a] == preds[a]:
        a += 1
    return drafts[:a] + [preds[a]]


def _confirm(logits, drafts: list[int], context: list[int], generated: list[int],
             adjust: Adjust) -> list[int]:
    """``_longest_match`` with ``adjust`` applied at each position to the prefix up to it."""
    new: list[int] = []
    for i in range(len(drafts) + 1):
        token = int(adjust(context, generated + new, logits[i]).argmax())
        new.append(token)
        if i == len(drafts) or token != drafts[i]:
            break
    return new


def _append(row: Row, new: list[int], eos: set[int], max_new_tokens: int,
            stopped: Callable[[list[int]], bool] | None) -> int:
    """Append ``new`` to ``row`` up to an end; the number appended."""
    for i, token in enumerate(new):
        row.tokens.append(token)
        if token in eos or (stopped is not None and stopped(row.tokens)):
            row.finished = True
            return i + 1
        if len(row.tokens) >= max_new_tokens:
            return i + 1
    return len(new)


def _done(row: Row, max_new_tokens: int) -> bool:
    return row.finished or len(row.tokens) >= max_new_tokens
