"""Post-retrieval re-ranking: which retrieved candidates become examples, and in what order.

Every selector takes candidates best first and returns the chosen ones best first; the prompt
order (ICMA's sequence reversal: best example last, next to the query) is applied at the end by
``prompt_order``. Keeping the two steps apart lets the token budget drop the lowest-ranked
examples before the order is flipped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, Sequence, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from icma.core.errors import InputError

T = TypeVar("T")
Order = Literal["reversed", "ranked"]


# One schema for the retrieval service's requests, the worker's and ``icma tune``'s configs.
class RandomWalk(BaseModel):
    """Skip each ranked candidate with this probability (walking the top max(10, k))."""

    model_config = ConfigDict(extra="forbid", strict=True)  # no "0.2" for 0.2
    skip_probability: float = Field(ge=0.0, lt=1.0, description="chance to skip a candidate")
    seed: int = Field(default=0, ge=0, le=2**63 - 1)


def top(candidates: Sequence[T], n: int) -> list[T]:
    """The n best candidates (ICMA's default selection)."""
    _check_n(n)
    return list(candidates[:n])


def random_walk(candidates: Sequence[T], n: int, skip_prob: float, seed: int = 0,
                key: str = "") -> list[T]:
    """Walk down the ranking, skipping each candidate with probability ``skip_prob``.

    The rule (the paper publishes none): visit candidates best first; each is skipped with
    probability ``skip_prob``, else taken, until n are taken. If the walk runs out of candidates,
    the best skipped ones fill the remaining places. The result keeps rank order. With
    skip_prob 0 it equals ``top``. The generator is seeded with ``seed`` and ``key`` (pass the
    query, e.g. its CID or text), so the same seed and key always give the same examples, while
    different queries do not share one skip pattern.
    """
    _check_n(n)
    if not isinstance(skip_prob, (int, float)) or not 0.0 <= skip_prob < 1.0:
        raise InputError(f"skip probability must be in [0, 1), got {skip_prob!r}",
                         field="skip_prob")
    rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(key.encode()).digest()[:8],
                                                      "little")])
    taken: list[int] = []
    skipped: list[int] = []
    for i in range(len(candidates)):
        if len(taken) == n:
            break
        (skipped if rng.random() < skip_prob else taken).append(i)
    if len(taken) < n:
        taken += skipped[: n - len(taken)]
    return [candidates[i] for i in sorted(taken)]


def bucket(candidates: Sequence[T], n: int, start: int = 0) -> list[T]:
    """ICMA's bucket sampling: ranks start + j * floor((pool - start) / n), j = 0..n-1.

    ``pool`` is the number of candidates given (ICMA used 10).
    """
    _check_n(n)
    pool = len(candidates)
    if not 0 <= start < pool:
        raise InputError(f"bucket start must be in [0, {pool}), got {start}", field="start")
    step = (pool - start) // n
    if step == 0:
        raise InputError(f"cannot take {n} buckets from {pool - start} candidates after rank "
                         f"{start}", field="n_shot")
    return [candidates[start + j * step] for j in range(n)]


def prompt_order(examples: Sequence[T], order: Order = "reversed") -> list[T]:
    """ICMA's sequence reversal: best-first examples written so the best stands last."""
    if order == "reversed":
        return list(reversed(examples))
    if order == "ranked":
        return list(examples)
    raise InputError(f"order must be 'reversed' or 'ranked', got {order!r}", field="order")


@dataclass(frozen=True)
class RerankConfig:
    """How examples are chosen from the candidates; ``pool`` candidates are retrieved first."""

    method: Literal["top", "random_walk", "bucket"] = "top"
    skip_prob: float = 0.0
    seed: int = 0
    bucket_start: int = 0
    pool: int = 10

    def select(self, candidates: Sequence[T], n: int, key: str = "") -> list[T]:
        if self.method == "top":
            return top(candidates, n)
        if self.method == "random_walk":
            return random_walk(candidates, n, self.skip_prob, self.seed, key)
        if self.method == "bucket":
            return bucket(candidates, n, self.bucket_start)
        raise InputError(f"unknown re-ranking method {self.method!r}; use top, random_walk or "
                         "bucket", field="rerank")

    def pool_size(self, n: int) -> int:
        """How many candidates to retrieve for n examples."""
        return n if self.method == "top" else max(self.pool, n)


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"number of examples must be a non-negative integer, got {n!r}",
                         field="n_shot")
