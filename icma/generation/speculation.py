"""Prompt-lookup speculative decoding: generation that verifies copied tokens in bulk.

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
them, and each row's position ids count only what it kept. Finished rows leave the batch and
waiting prompts take their places at once (continuous batching); a prompt's prefill runs alone,
over its own tokens, and its cache is left-padded to the batch's columns as it joins.

Sampling is speculated too, and stays exact in distribution (speculative sampling with a
drafter that proposes one token for certain): a draft token ``t`` is kept with probability
``p(t)``, the model's sampling probability at that position; at the first rejection the token
is drawn from ``p`` without ``t`` (renormalised), and when every draft is kept, from the next
position's ``p``. Every token is then distributed as sampling from ``p`` given its prefix
(Leviathan et al. 2023, Chen et al. 2023: the residual ``max(p - q, 0)`` with ``q`` one-hot on
the draft). What changes is which answer a seed gives: each row draws from its own generator,
seeded per sample, so the answer does not depend on the batch it decodes in, but it is not the
answer transformers' ``generate()`` draws for that seed.
"""

from __future__ import annotations

import functools
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
    accepted: int = 0  # of those, the ones verification confirmed and the answer kept
    generator: object = None  # sampling: this row's torch.Generator


@dataclass(frozen=True)
class Sampling:
    """The distribution sampled decoding draws each token from, as transformers' generate()
    warps it: the logits (after ``adjust``) divided by ``temperature``, cut to the ``top_k``
    most likely tokens (0: no cut), then to the fewest most likely tokens whose probabilities
    reach ``top_p`` (1: no cut)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def probabilities(self, logits):
        """Sampling probabilities (vocabulary,), float32, of one position's ``logits``."""
        import torch

        scores = logits.float() / self.temperature
        if 0 < self.top_k < scores.shape[-1]:
            values, index = torch.topk(scores, self.top_k)  # sorted, most likely first
        else:
            values, index = torch.sort(scores, descending=True)
        probs = torch.softmax(values, -1)
        if self.top_p < 1.0:  # keep a token while the mass before it is short of top_p
            probs = torch.where(torch.cumsum(probs, -1) - probs < self.top_p, probs, 0.0)
            probs = probs / probs.sum()
        return torch.zeros_like(scores).scatter_(-1, index, probs)


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


def speculate(net, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
              eos_ids: Sequence[int], k: int, max_ngram: int = 3, batch_size: int = 8,
              adjust: Adjust | None = None, sampling: Sampling | None = None,
              seeds: Sequence[int] | None = None,
              stopped: Callable[[list[int]], bool] | None = None,
              pad_id: int = 0, device: str = "cpu") -> list[Row]:
    """Continuations of ``prompts`` (token ids), greedy or (``sampling``) sampled, with
    prompt-lookup drafts of up to ``k`` tokens (``k = 0``: one token per pass), at most
    ``batch_size`` rows decoding together: a row that ends makes room for the next prompt at
    once (continuous batching), so a batch never idles on its last long answer while prompts
    wait. ``adjust`` changes the logits before each choice (repetition penalty, banned
    n-grams); ``seeds``: one per prompt, for its row's generator when sampling (default 0);
    ``stopped`` ends a row whose answer so far holds a stop text. Identical prompts (several
    samples of one) share one prefill. ``net``: a causal LM taking ``position_ids`` and a
    transformers cache."""
    import torch

    eos = set(eos_ids)
    rows = [Row() for _ in prompts]
    if sampling is not None:
        for r, row in enumerate(rows):
            row.generator = torch.Generator().manual_seed(seeds[r] if seeds else 0)
    pending = list(range(len(prompts)))[::-1]  # popped from the end: first prompt first
    cache_name, keep_name = _forward_arguments(net)
    batch = _Batch()

    def choose(r: int, logits, drafts: list[int]) -> list[int]:
        """Row ``r``'s new tokens: the drafts verification keeps, then one of the model's."""
        if sampling is not None:
            return _verify_sampled(logits, drafts, prompts[r], rows[r].tokens, adjust,
                                   sampling, rows[r].generator)
        if adjust is not None:
            return _confirm(logits, drafts, prompts[r], rows[r].tokens, adjust)
        return _longest_match(logits.argmax(-1).tolist(), drafts)

    while True:
        # Admit prompts into free places; each brings its first token from its prefill.
        while pending and len(batch.live) < batch_size:
            admitted = [pending.pop() for _ in range(min(len(pending),
                                                         batch_size - len(batch.live)))]
            caches, logits = _prefill(net, [prompts[r] for r in admitted], cache_name,
                                      keep_name, device)
            joining = []
            for r, cache, lg in zip(admitted, caches, logits):
                _append(rows[r], choose(r, lg, []), eos, max_new_tokens, stopped)
                if not _done(rows[r], max_new_tokens):
                    joining.append((r, cache))
            batch.join(joining)
        if not batch.live:
            return rows
        drafts = [draft(list(prompts[r]) + rows[r].tokens,
                        min(k, max_new_tokens - len(rows[r].tokens) - 1), max_ngram)
                  for r in batch.live]
        logits = batch.step(net, [rows[r].tokens[-1] for r in batch.live], drafts,
                            cache_name, pad_id)
        kept = []
        for j, r in enumerate(batch.live):
            row, d = rows[r], drafts[j]
            new = choose(r, logits[j, :len(d) + 1], d)
            row.drafted += len(d)
            appended = _append(row, new, eos, max_new_tokens, stopped)
            row.accepted += min(appended, len(new) - 1)
            kept.append(len(new))
        batch.keep(kept, [not _done(rows[r], max_new_tokens) for r in batch.live])


class _Batch:
    """The rows decoding together: one key/value cache whose columns all rows share. A row
    that joins is left-padded to the others' width (or they to its); rejected drafts stay in
    place as holes. The attention mask hides both, and each row's position ids count only
    the tokens it kept, so a row attends to exactly its own prompt and answer."""

    def __init__(self):
        self.live: list[int] = []  # batch position -> row (prompt index)
        self.kv = None  # transformers DynamicCache, once a row has joined
        self.mask = None  # (rows, columns) long: which cached columns each row attends to
        self.next_pos = None  # (rows,): the position of the token each row feeds next
        self.width = 0  # columns fed by the last step

    def join(self, joining: list[tuple[int, object]]) -> None:
        """Add rows given as (row, its prompt's own cache)."""
        import torch

        if not joining:
            return
        lengths = [cache.get_seq_length() for _, cache in joining]
        width = max([*lengths, self.mask.shape[1] if self.mask is not None else 0])
        masks = [torch.arange(width)[None] >= width - n for n in lengths]
        if self.kv is None:
            self.kv, first = joining[0][1], 1  # reuse the first row's cache object
            _grow_in_place(self.kv)
            self._pad(self.kv, width)
            self.mask = masks[0].long()
            self.next_pos = torch.tensor([lengths[0]])
        else:
            first = 0
            self._pad(self.kv, width)
            self.mask = torch.nn.functional.pad(self.mask, (width - self.mask.shape[1], 0))
        others = [cache for _, cache in joining[first:]]
        for cache in others:
            self._pad(cache, width)
        if others:  # one copy of the cache per layer, however many rows join
            for i, mine in enumerate(self.kv.layers):
                mine.keys = torch.cat([mine.keys, *(c.layers[i].keys for c in others)])
                mine.values = torch.cat([mine.values, *(c.layers[i].values for c in others)])
            self.mask = torch.cat([self.mask, *(m.long() for m in masks[first:])])
            self.next_pos = torch.cat([self.next_pos, torch.tensor(lengths[first:])])
        self.live += [r for r, _ in joining]
        self.width = 0  # the joined rows' first tokens are fed by the next step

    @staticmethod
    def _pad(cache, width: int) -> None:
        """Left-pad a cache's columns (zeros, masked) to ``width``."""
        import torch

        for layer in cache.layers:
            short = width - layer.keys.shape[2]
            if short:
                layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, short, 0))
                layer.values = torch.nn.functional.pad(layer.values, (0, 0, short, 0))

    def step(self, net, last: list[int], drafts: list[list[int]], cache_name: str, pad_id: int):
        """One forward pass over each row's last token and its drafts: logits (rows, width)."""
        import torch

        device = self.kv.layers[0].keys.device
        width = 1 + max(len(d) for d in drafts)
        chunk = torch.full((len(last), width), pad_id, dtype=torch.long)
        fed = torch.zeros((len(last), width), dtype=torch.long)
        for j, (token, d) in enumerate(zip(last, drafts)):
            chunk[j, 0] = token
            chunk[j, 1:1 + len(d)] = torch.tensor(d, dtype=torch.long)
            fed[j, :1 + len(d)] = 1
        self.mask = torch.cat([self.mask, fed], dim=1)
        pos = self.next_pos[:, None] + torch.arange(width)[None, :]
        self.width = width
        with torch.inference_mode():
            return net(input_ids=chunk.to(device), attention_mask=self.mask.to(device),
                       position_ids=pos.to(device), use_cache=True,
                       **{cache_name: self.kv}).logits

    def keep(self, kept: list[int], staying: list[bool]) -> None:
        """Each row kept its first ``kept`` fed tokens: hide the rest; rows not ``staying``
        leave. Columns no remaining row attends to are dropped once they are a quarter of the
        cache, so a long-running batch does not attend over ever more holes."""
        import torch

        w = self.width
        self.mask[:, -w:] = (torch.arange(w)[None, :] < torch.tensor(kept)[:, None]).long()
        self.next_pos = self.next_pos + torch.tensor(kept)
        if not all(staying):
            index = torch.tensor([j for j, s in enumerate(staying) if s], dtype=torch.long)
            self.live = [r for r, s in zip(self.live, staying) if s]
            if not self.live:
                self.kv = self.mask = self.next_pos = None
                return
            self.kv.batch_select_indices(index.to(self.kv.layers[0].keys.device))
            self.mask, self.next_pos = self.mask[index], self.next_pos[index]
        used = self.mask.any(0)
        if (~used).sum() * 4 > used.numel():
            columns = used.nonzero().squeeze(1)
            on = columns.to(self.kv.layers[0].keys.device)
            for layer in self.kv.layers:
                layer.keys, layer.values = layer.keys[:, :, on], layer.values[:, :, on]
            self.mask = self.mask[:, columns]


#: Spare columns a grown cache layer gets beyond what the step needs (plus a quarter more).
SPARE_COLUMNS = 128


@functools.cache
def _growing_layer():
    """A transformers ``DynamicLayer`` whose keys and values grow into spare columns: a step
    writes its few new columns in place, where ``DynamicLayer`` concatenates, copying every
    layer's whole cache on every step (measured in ``benchmarks/results/cache_growth.md``:
    1.11x in a bfloat16 batch, within the noise elsewhere). ``keys`` and
    ``values`` are views of the used columns; assigning them (rows joining, rows or columns
    dropped) adopts the new tensor as the buffer. Built on first use: transformers is imported
    lazily."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        keys = property(lambda self: _used(self._kb, self._nk),
                        lambda self, t: self._adopt("k", t))
        values = property(lambda self: _used(self._vb, self._nv),
                          lambda self, t: self._adopt("v", t))

        def _adopt(self, which: str, t) -> None:
            setattr(self, f"_{which}b", t)
            setattr(self, f"_n{which}", t.shape[-2] if t is not None and t.dim() == 4 else 0)

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self._kb, self._nk = _write(self._kb, self._nk, key_states)
            self._vb, self._nv = _write(self._vb, self._nv, value_states)
            return self.keys, self.values

    return GrowingLayer


def _used(buffer, n: int):
    return buffer if buffer is None or buffer.dim() != 4 else buffer[:, :, :n]


def _write(buffer, n: int, new):
    """``new``'s columns written after the first ``n`` of ``buffer`` (grown if full)."""
    import torch

    w = new.shape[-2]
    if buffer is None or buffer.dim() != 4 or n + w > buffer.shape[-2]:
        capacity = n + w + SPARE_COLUMNS + (n + w) // 4
        grown = torch.empty((*new.shape[:2], capacity, new.shape[-1]), dtype=new.dtype,
                            device=new.device)
        if n:
            grown[:, :, :n] = buffer[:, :, :n]
        buffer = grown
    buffer[:, :, n:n + w] = new
    return buffer, n + w


def _grow_in_place(cache) -> None:
    """Make a cache's plain dynamic layers grow in place (other layer kinds stay)."""
    from transformers.cache_utils import DynamicLayer

    growing = _growing_layer()
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            new = growing()
            new.keys, new.values = layer.keys, layer.values
            new.is_initialized, new.device = layer.is_initialized, layer.keys.device
            cache.layers[i] = new


def _prefill(net, prompts: list[Sequence[int]], cache_name: str, keep_name: str | None,
             device: str):
    """Each prompt's own key/value cache and next-token logits (1, vocabulary), from one
    forward pass per prompt: in a padded batch the padding would be computed like any token
    (half the prefill of a batch of ICMA prompts, whose lengths vary twofold), and a prompt
    alone takes the causal attention kernel with no mask, so its answer does not depend on
    the batch it joins."""
    import torch
    from transformers import DynamicCache

    # Only the last position's logits: the vocabulary projection of every prompt position
    # would cost a fifth of the prefill's arithmetic.
    keep = {keep_name: 1} if keep_name else {}
    caches, logits = [], []
    seen: dict[tuple[int, ...], int] = {}  # prompt -> the index of its first prefill
    with torch.inference_mode():
        for tokens in prompts:
            first = seen.setdefault(tuple(tokens), len(caches))
            if first < len(caches):  # another sample of a prompt prefilled here: a copy
                caches.append(_copied(caches[first], net.config))
                logits.append(logits[first])
                continue
            ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
            caches.append(DynamicCache(config=net.config))
            out = net(input_ids=ids, use_cache=True, **{cache_name: caches[-1]}, **keep)
            logits.append(out.logits[0, -1:])
    return caches, logits


def _copied(cache, config):
    """A new cache holding copies of ``cache``'s keys and values (a batch writes into a
    cache in place: rows must not share one)."""
    from transformers import DynamicCache

    copy = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        copy.update(layer.keys.clone(), layer.values.clone(), i)
    return copy


def _forward_arguments(net) -> tuple[str, str | None]:
    """The names a model's forward() takes its key/value cache by (transformers renamed
    ``past_key_values`` to ``cache``; the old name warns, and goes in 5.40) and the number of
    last positions to compute logits for (None: the model computes them all)."""
    import inspect

    base = net.get_base_model() if hasattr(net, "get_base_model") else net  # under peft
    names = inspect.signature(base.forward).parameters
    return ("cache" if "cache" in names else "past_key_values",
            "logits_to_keep" if "logits_to_keep" in names else None)


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


def _verify_sampled(logits, drafts: list[int], context: list[int], generated: list[int],
                    adjust: Adjust | None, sampling: Sampling, generator) -> list[int]:
    """Speculative sampling for one row (the module's docstring): each draft kept with its
    sampling probability; the first rejected one replaced by a draw from the probabilities
    without it; all kept, one more token drawn from the next position's."""
    import torch

    logits = logits.float().cpu()  # the generator lives on the CPU
    new: list[int] = []
    for i in range(len(drafts) + 1):
        lg = logits[i] if adjust is None else adjust(context, generated + new, logits[i])
        probs = sampling.probabilities(lg)
        if i < len(drafts):
            t = drafts[i]
            if float(torch.rand((), generator=generator)) < float(probs[t]):
                new.append(t)
                continue
            probs[t] = 0.0  # p(t) < 1 here, so some mass remains
        new.append(int(torch.multinomial(probs, 1, generator=generator)))
        return new
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
