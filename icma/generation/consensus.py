"""Consensus decoding (minimum Bayes risk): the candidate answer most similar, on average, to
all the others.

The pool is the model's sampled answers for one prompt followed by the answers of the examples
in that prompt, best first (their captions for mol2cap, their SMILES for cap2mol). A candidate's
score is its mean similarity to every other candidate of the pool; the highest score wins.

- Captions: ``caption_similarity``, the mean n-gram F1 for n = 1..4 (below).
- Molecules: only candidates RDKit parses compete (an invalid SMILES never wins), compared by
  Morgan Tanimoto (radius 2, 2048 bits: ``icma.core.chem.morgan_fp``).
- Empty answers never compete.
- Ties (scores equal to 12 decimals, so that the order of a sum cannot decide) go to the
  earlier candidate in pool order: samples before examples, earlier samples first, better
  ranked examples first. The model's own answer is what was asked for; an example's answer
  wins only by being more central.
- A pool of one candidate: it wins, with no score. No candidate at all (every sample invalid or
  empty, and no usable example): the first sample is the answer, as plain sampling would give.

Why the examples' answers join the pool: the retrieved answers are real captions (or molecules)
of similar molecules, so they anchor the vote when a small model's samples scatter, and a
sample that agrees with them and with the other samples is the one a reader would trust. Rank
carries information a plain vote ignores (``../shared/design/icma-method.md`` section 9: the
consensus of the top-k retrieved captions alone scores below the top-1 caption), which is why
the model's samples, not the examples, decide when they agree among themselves.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Literal, Sequence, TypeVar

from rdkit import DataStructs

from icma.core import chem
from icma.core.errors import InputError
from icma.core.prompts import Example
from icma.core.tasks import Task

#: n-gram orders of the caption similarity (BLEU-4's).
MAX_ORDER = 4
_TOKEN = re.compile(r"[a-z0-9]+|[^a-z0-9\s]")
_DECIMALS = 12

T = TypeVar("T")


@dataclass(frozen=True)
class Candidate:
    """One answer in the pool and where it came from: ``sample`` (0-based, in seed order) or
    the example ``cid`` (with its ``rank``, 1 = best)."""

    text: str
    source: Literal["sample", "example"]
    sample: int | None = None
    cid: str | None = None
    rank: int | None = None


@dataclass(frozen=True)
class Choice:
    """The winner, its score (mean similarity to the rest of the pool; None for a pool of
    one or none), how many candidates competed and how many answers were sampled, and those
    answers (seed order, empty ones too): result files keep them, so that another rule of
    choosing can be measured on the same samples without sampling again."""

    winner: Candidate
    score: float | None
    pool: int
    samples: int
    answers: tuple[str, ...] = ()

    def summary(self) -> dict:
        """What a response or result line says about it."""
        w = self.winner
        return {"samples": self.samples, "pool": self.pool, "source": w.source,
                "sample": w.sample, "cid": w.cid, "rank": w.rank, "score": self.score}


def caption_tokens(text: str) -> list[str]:
    """Lower-cased runs of letters and digits, and each other non-space character alone:
    "(R)-2-hydroxy" -> ( r ) - 2 - hydroxy. Chemical names keep their locants and hyphens as
    tokens, so "2-hydroxy" and "3-hydroxy" differ, and no vocabulary file is needed."""
    return _TOKEN.findall(text.lower())


def ngram_f1(a: Sequence[str], b: Sequence[str], max_order: int = MAX_ORDER) -> float:
    """The mean over n = 1..``max_order`` of the F1 of clipped n-gram matches between two token
    lists. Symmetric, unlike BLEU (whose brevity penalty and precision look at one side), so a
    candidate's mean similarity does not depend on which side it stands; and an arithmetic
    mean, unlike BLEU's geometric one, so two short captions that share no 4-gram still score
    by their words. Orders where neither side has an n-gram are left out; two empty lists are
    identical (1.0)."""
    scores = []
    for n in range(1, max_order + 1):
        ga, gb = _ngrams(a, n), _ngrams(b, n)
        if not ga and not gb:
            continue
        if not ga or not gb:
            scores.append(0.0)
            continue
        match = sum((ga & gb).values())
        total_a, total_b = sum(ga.values()), sum(gb.values())
        scores.append(2 * match / (total_a + total_b))  # F1 of precision and recall
    return sum(scores) / len(scores) if scores else 1.0


def caption_similarity(a: str, b: str) -> float:
    return ngram_f1(caption_tokens(a), caption_tokens(b))


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def most_central(items: Sequence[T], similarity: Callable[[T, T], float]
                 ) -> tuple[int, float | None]:
    """The index of the item with the highest mean similarity to the others, and that mean
    (rounded to 12 decimals; ties go to the earliest item). One item: (0, None)."""
    if not items:
        raise ValueError("no candidates")
    if len(items) == 1:
        return 0, None
    totals = [0.0] * len(items)
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            s = similarity(items[i], items[j])
            totals[i] += s
            totals[j] += s
    means = [round(t / (len(items) - 1), _DECIMALS) for t in totals]
    best = max(range(len(items)), key=lambda i: (means[i], -i))
    return best, means[best]


def pool(task: Task, samples: Sequence[str], examples: Sequence[Example]) -> list[Candidate]:
    """The candidates, in pool order: non-empty samples, then the examples' answers."""
    out = [Candidate(s, "sample", sample=i) for i, s in enumerate(samples) if s.strip()]
    for rank, e in enumerate(examples, 1):
        text = e.caption if task == "mol2cap" else e.smiles
        if text.strip():
            out.append(Candidate(text, "example", cid=e.cid, rank=rank))
    return out


def choose(task: Task, samples: Sequence[str], examples: Sequence[Example]) -> Choice:
    """Consensus over ``samples`` (the model's answers) and ``examples`` (the prompt's, best
    first): see the module docstring."""
    candidates = pool(task, samples, examples)
    if task == "mol2cap":
        keys: list = [caption_tokens(c.text) for c in candidates]
        similarity: Callable = ngram_f1
    else:
        fps = [_fingerprint(c.text) for c in candidates]
        candidates = [c for c, fp in zip(candidates, fps) if fp is not None]
        keys = [fp for fp in fps if fp is not None]
        similarity = DataStructs.TanimotoSimilarity
    if not candidates:
        first = Candidate(samples[0] if samples else "", "sample", sample=0)
        return Choice(first, None, 0, len(samples), tuple(samples))
    best, score = most_central(keys, similarity)
    return Choice(candidates[best], score, len(candidates), len(samples), tuple(samples))


def _fingerprint(smiles: str):
    """The Morgan fingerprint of a SMILES the pipeline would call valid, else None."""
    try:
        return chem.morgan_fp(chem.parse_smiles(smiles))
    except InputError:
        return None
