"""The nearest-neighbour engine: the best retrieved example's answer, no model at all.

It is the baseline every model must beat, and a way to serve with no LLM. Asked for several
samples of a prompt, it gives that answer each time (it has nothing else to say).
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
            best = item.examples[0] if item.examples else None  # zero-shot: nothing to copy
            text = "" if best is None else best.caption if item.task == "mol2cap" \
                else best.smiles
            out.extend(Generation(text) for _ in range(params.samples_per_prompt))
        return out
