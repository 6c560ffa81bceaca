"""Random examples: the floor every retrieval method must beat.

Each query gets its own random ranking, seeded by the index seed and the query text, so the same
query always gets the same examples (reproducible prompts) while different queries differ.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np

from icma.core.corpus import Corpus
from icma.core.errors import InputError
from icma.retrieval.base import Index, ranked


class RandomIndex(Index):
    kind: ClassVar = "random"
    modality: ClassVar = "molecule"  # any text works as a query; molecule by default

    @classmethod
    def build(cls, corpus: Corpus, seed: int = 0, modality: str = "molecule",
              **params) -> "RandomIndex":
        if params:
            raise InputError(f"unknown parameter(s) {sorted(params)} for a random index",
                             field="params")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed!r}", field="seed")
        if modality not in ("molecule", "caption"):
            raise InputError(f"modality must be molecule or caption, got {modality!r}",
                             field="modality")
        index = cls(corpus, {"seed": seed, "modality": modality})
        index.modality = modality  # type: ignore[misc]
        return index

    def _topk(self, queries: Sequence[str], k: int):
        scores = np.empty((len(queries), len(self.corpus)))
        for i, q in enumerate(queries):
            digest = hashlib.sha256(q.encode("utf-8")).digest()
            rng = np.random.default_rng([self.params["seed"], *np.frombuffer(digest[:8], np.uint32)])
            scores[i] = rng.random(len(self.corpus))
        return ranked(scores, k)

    def _save_data(self, directory: Path) -> None:
        pass  # the seed in the manifest is all there is

    @classmethod
    def _load_data(cls, directory: Path, corpus: Corpus, manifest: dict) -> "RandomIndex":
        return cls.build(corpus, **manifest["params"])
