"""Everything about a translation but its input, and the one builder that makes it.

A request to the worker, a job's stored options, ``icma translate``'s flags, a tuning run's
evaluation and the quality benchmark all describe a translation in the request's shape (below)
and go through ``build_options``, so defaults and checks are the same whichever door a
translation came in by::

    {"n_shot": 2, "retrieval": {"method", "corpus", "exclude_cids", "exclude_same_structure" |
     "exclude_same_caption", "random_walk": {"skip_probability", "seed"}},
     "generation": {"decoding", "temperature", "top_p", "top_k", "num_beams",
                    "max_new_tokens", "repetition_penalty", "no_repeat_ngram_size",
                    "num_samples", "seed"},
     "adapter": "name" | "base", "prime_answer": null, "order": "reversed", "cutoff": 2048,
     "num_candidates": 1, "prompt_style": "icma" | "molregpt"}

Every key is optional; a missing or null one takes the task's default (``icma.core.tasks``);
a missing adapter is the task's default adapter (``icma.generation.adapters.DefaultAdapters``)
and ``"base"`` the untuned model. A registered adapter with a manifest brings the prompt it was
tuned on as the defaults of ``n_shot``, ``retrieval.method``, ``prime_answer`` and ``order``,
and, for a request that names no ``generation.decoding``, the decoding it ships with
(``AdapterInfo.served_generation``).
``prompt_style`` "molregpt" asks a chat model MolReGPT's way (``icma.core.molregpt``): its
defaults are MolReGPT's (10 examples, best first; mol2cap retrieval ``rdkit``, cap2mol ``bm25``)
and, MolReGPT being in-context learning without tuning, the base model unless the request
names an adapter. Values are not coerced: an empty corpus or adapter name is an error, not the default, and
``"2"`` is not an integer. Errors name the request's fields (``n_shot``, ``retrieval.method``);
the CLI renames them to its flags and jobs put them under ``options.``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from icma.core import molregpt
from icma.core.errors import InputError
from icma.core.names import check_name
from icma.core.rerank import Order
from icma.core.tasks import Task, check_method, spec
from icma.generation.adapters import BASE, AdapterInfo
from icma.generation.engines import BOUNDS, Adapter, GenerationParams

#: ICMA's token budget of prompt + answer.
DEFAULT_CUTOFF = 2048
#: Samples of consensus decoding when a request names none (fewer if a server allows fewer).
DEFAULT_NUM_SAMPLES = 8


@dataclass(frozen=True)
class RetrievalOptions:
    """What the retrieval service takes besides the queries (see its request schemas)."""

    method: str | None = None  # None: the task's default
    corpus: str | None = None
    exclude_cids: tuple[str, ...] = ()
    exclude_same: bool = False  # same structure (mol2cap) or same caption (cap2mol)
    random_walk: tuple[float, int] | None = None  # (skip probability, seed)

    def method_for(self, task: Task) -> str:
        return self.method or spec(task).default_method


@dataclass(frozen=True)
class Options:
    """A translation's settings. ``prime_answer``: end the prompt with the answer marker (on for
    untuned models, off for ICMA-tuned checkpoints, which write it themselves); ``cutoff``: the
    token budget of prompt + answer; ``num_candidates``: cap2mol samples until RDKit parses one,
    at most this many times (not with consensus decoding, which pools its samples instead)."""

    n_shot: int
    params: GenerationParams
    retrieval: RetrievalOptions = RetrievalOptions()
    adapter: Adapter | None = None
    prime_answer: bool = True
    order: Order = "reversed"
    cutoff: int = DEFAULT_CUTOFF
    num_candidates: int = 1
    prompt_style: str = "icma"  # or "molregpt": chat messages (icma.core.molregpt)


#: Finds an adapter by the name a request gives (the worker's registry; the CLI also takes
#: folders).
AdapterLookup = Callable[[str], AdapterInfo]
#: The adapter a request for a task gets when it names none (None: the base model).
DefaultAdapter = Callable[[str], "AdapterInfo | None"]


def build_options(task: str, request: Mapping = {}, *, max_k: int | None = None,
                  max_candidates: int | None = None, max_samples: int | None = None,
                  adapters: AdapterLookup | None = None, adapter: Adapter | None = None,
                  default_adapter: DefaultAdapter | None = None) -> Options:
    """``Options`` for ``task`` from a request-shaped mapping (see the module docstring).

    ``max_k``, ``max_candidates`` and ``max_samples`` are a server's limits (None: unbounded
    but for the engines' own bounds, for local callers). ``adapters`` resolves
    ``request["adapter"]`` by name, ``default_adapter`` gives the task's adapter when the
    request names none (``"base"``: none); ``adapter`` gives one directly (a tuning run
    evaluates the adapter it just wrote) and then priming defaults to off, as for any adapter
    without a manifest.
    """
    s = spec(task)
    style = _get(request, "prompt_style", "icma")
    if style not in molregpt.PROMPT_STYLES:
        raise InputError(f"must be one of {', '.join(molregpt.PROMPT_STYLES)}, got {style!r}",
                         field="prompt_style")
    chat = style == "molregpt"
    if chat and request.get("adapter") is None:
        default_adapter = None  # MolReGPT tunes nothing: the base model unless one is named
    info = _adapter_info(task, request, adapters, adapter, default_adapter)
    # An adapter is served with the prompt form it learned: its examples and their retrieval
    # unless the request says otherwise (a naive-SFT adapter saw none; a Morgan-tuned one saw
    # Morgan neighbours).
    tuned = info.tuned_prompt if info is not None else {}
    tuned_k = tuned.get("n_shot")
    default_k = molregpt.N_SHOT if chat else s.n_shot
    n_shot = _bounded(_get(request, "n_shot", tuned_k if isinstance(tuned_k, int)
                           and not isinstance(tuned_k, bool) else default_k), 0, max_k,
                      "n_shot")
    num_candidates = _bounded(_get(request, "num_candidates", 1), 1, max_candidates,
                              "num_candidates")
    generation = {k: v for k, v in (request.get("generation") or {}).items() if v is not None}
    if "decoding" not in generation and info is not None and info.served_generation:
        generation = _served(info, generation, max_samples)
    _check_num_samples(generation, max_samples)
    try:
        params = GenerationParams.for_task(task, **generation)
    except TypeError as exc:  # a key GenerationParams does not have
        raise InputError(str(exc), field="generation") from None
    except InputError as exc:
        raise exc.at(f"generation.{exc.field}") from None
    if num_candidates > 1 and params.decoding == "consensus":
        raise InputError("consensus decoding pools its samples and only valid molecules "
                         "compete: set generation.num_samples, not num_candidates",
                         field="num_candidates")
    if num_candidates > 1 and params.decoding != "sample":
        raise InputError("more than one candidate needs decoding 'sample' (greedy and beam "
                         "search give the same molecule every time)", field="num_candidates")
    r = request.get("retrieval") or {}
    walk = r.get("random_walk")
    corpus = r.get("corpus")
    if corpus is not None:  # (an empty name once meant the default corpus, silently)
        check_name(corpus, field="retrieval.corpus", what="corpus name")
    method = r.get("method")
    if method is None and tuned.get("retrieval") in s.methods:
        method = tuned["retrieval"]
    if method is None and chat:
        method = s.molregpt_method
    retrieval = RetrievalOptions(
        method=check_method(task, method), corpus=corpus,
        exclude_cids=tuple(r.get("exclude_cids") or ()),
        exclude_same=_flag(r.get(s.exclude_same), f"retrieval.{s.exclude_same}"),
        random_walk=None if walk is None else (walk["skip_probability"], walk.get("seed", 0)))
    prime, order = request.get("prime_answer"), request.get("order")
    if info is not None:
        adapter = info.as_adapter()
        # Serve it with the prompt form it learned.
        prime = info.prime_answer if prime is None else prime
        order = info.tuned_prompt.get("order") if order is None else order
    if prime is None:
        prime = adapter is None
    if order not in (None, "reversed", "ranked"):
        raise InputError(f"must be reversed or ranked, got {order!r}", field="order")
    if chat and order is None:
        order = "ranked"  # MolReGPT numbers its examples best first
    return Options(n_shot=n_shot, params=params, retrieval=retrieval, adapter=adapter,
                   prime_answer=prime, order=order or "reversed",
                   cutoff=_get(request, "cutoff", DEFAULT_CUTOFF),
                   num_candidates=num_candidates, prompt_style=style)


def _adapter_info(task: str, request: Mapping, adapters: AdapterLookup | None,
                  adapter: Adapter | None, default_adapter: DefaultAdapter | None):
    """The registered adapter the request gets: the one it names, else the task's default;
    none for ``"base"`` or when ``adapter`` is given directly."""
    name = request.get("adapter")
    if adapter is not None or name == BASE:
        return None
    if name is not None:
        if adapters is None:
            raise InputError("adapters are not served here", field="adapter")
        info = adapters(name)
        if info.task and info.task != task:
            raise InputError(f"adapter {info.name!r} was tuned for {info.task}, not {task}",
                             field="adapter")
        return info
    return default_adapter(task) if default_adapter is not None else None


def _served(info: AdapterInfo, generation: dict, max_samples: int | None) -> dict:
    """A request that names no decoding gets the one the adapter ships with (chosen on a dev
    slice: for a small tuned model greedy or consensus beat ICMA's sampling), under whatever
    else the request sets. Its sample count is held to this server's limit, so a request that
    never mentioned ``num_samples`` is not refused for it."""
    served = dict(info.served_generation)
    if "num_samples" in served and max_samples:
        served["num_samples"] = min(served["num_samples"], max_samples)
    return {**served, **generation}


def _check_num_samples(generation: dict, max_samples: int | None) -> None:
    """``num_samples`` belongs to consensus decoding: 2 .. ``max_samples`` there (default
    ``DEFAULT_NUM_SAMPLES``, filled into ``generation``), and an error anywhere else."""
    field = "generation.num_samples"
    high = max_samples or BOUNDS["num_samples"]["le"]
    if generation.get("decoding") != "consensus":
        if "num_samples" in generation:
            raise InputError("num_samples is for decoding 'consensus'", field=field)
        return
    generation["num_samples"] = _bounded(
        generation.get("num_samples", min(DEFAULT_NUM_SAMPLES, high)), 2, high, field)


def _bounded(value: int, low: int, high: int | None, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"must be an integer, got {value!r}", field=field)
    if value < low or (high is not None and value > high):
        rule = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InputError(f"must be {rule}, got {value}", field=field)
    return value


def _flag(value, field: str) -> bool:
    if value is not None and not isinstance(value, bool):
        raise InputError(f"must be true or false, got {value!r}", field=field)
    return bool(value)


def _get(request: Mapping, key: str, default):
    value = request.get(key)
    return default if value is None else value
