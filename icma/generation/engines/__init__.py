"""Engines behind one interface (``Generator``): transformers, vLLM, any OpenAI-compatible
server, nearest-neighbour."""

from __future__ import annotations

from pathlib import Path

from icma.generation.engines.base import (
    BOUNDS,
    DECODINGS,
    MIN_SAMPLING_TEMPERATURE,
    Adapter,
    Generation,
    GenerationInput,
    GenerationParams,
    Generator,
    banned_tokens,
    cut_at_stop,
)
from icma.core.errors import InputError
from icma.core.settings import Settings

ENGINES = ("transformers", "vllm", "openai", "nearest-neighbour")

__all__ = ["Adapter", "BOUNDS", "DECODINGS", "ENGINES", "Generation", "GenerationInput", "GenerationParams",
           "Generator", "MIN_SAMPLING_TEMPERATURE", "banned_tokens", "cut_at_stop", "load_engine"]


def load_engine(name: str, *, settings: Settings, model: str | Path | None = None,
                adapter: str | Path | None = None, **options) -> Generator:
    """An engine by name (a caller's default is usually ``settings.engine``); the transformers
    and vllm engines take what ``model`` and ``options`` leave out from ``settings``; the
    openai engine takes its server and model from ``settings`` (``ICMA_OPENAI_*``: ``model``
    names a model folder, which a server does not use) and no local options."""
    if name == "nearest-neighbour":
        if adapter is not None:
            raise InputError("the nearest-neighbour engine takes no adapter", field="adapter")
        from icma.generation.engines.nearest import NearestNeighbourGenerator

        return NearestNeighbourGenerator()
    if name == "transformers":
        from icma.generation.engines.hf import TransformersGenerator

        return TransformersGenerator(model, settings=settings, adapter=adapter, **options)
    if name == "openai":
        from icma.generation.engines.openai import OpenAIGenerator

        return OpenAIGenerator(settings=settings, adapter=adapter)
    if name == "vllm":
        try:
            from icma.generation.engines.vllm import VllmGenerator  # noqa: PLC0415
        except ImportError as exc:
            raise InputError(f"the vllm engine is not available here ({exc})",
                             field="engine") from None
        return VllmGenerator(model, settings=settings, adapter=adapter, **options)
    raise InputError(f"unknown engine {name!r}; use one of {', '.join(ENGINES)}", field="engine")
