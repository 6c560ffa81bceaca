"""The nearest-neighbour engine: the best retrieved example's answer, no model at all.

It is the baseline every model must beat, and a way to serve with no LLM.
"""

from __future__ import annotations

from typing import Sequence

from icma.generation.engines.base import Adapter, Generation, GenerationInput, GenerationParams, Generator
from icma.core.errors import InputError


class NearestNeighbourGenerator(Generator):
    name = "nearest-neighbour"
    model = "retrieval top-1"

    def generate(self, inputs: Sequence[GenerationInput], params: GenerationParams,
                 adapter: Adapter | None = None) -> list[Generation]:
        if adapter is not None:
            raise InputError("the nearest-neighbour engine takes no adapter", field="adapter")
        out = []
        for item in inputs:
            if not item.examples:  # zero-shot: there is nothing to copy
                out.append(Generation(""))
                continue
            best = item.examples[0]
            out.append(Generation(best.caption if item.task == "mol2cap" else best.smiles))
        return out
