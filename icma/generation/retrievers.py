"""Examples for prompts, from the retrieval service over HTTP or from local indexes.

Both retrievers take the same ``RetrievalOptions`` and return examples best first, so the worker
(HTTP) and ``icma translate`` (local, or HTTP with ``--retrieval-url``) build the same prompts.

The HTTP client retries what a retry can fix (connection refused, timeouts, 502/503/504, and
any answer with a ``Retry-After`` header, such as the 503 of a corpus whose indexes are still
building) a bounded number of times with back-off, then raises ``RetrievalUnavailable`` (the
worker answers 503 with Retry-After, and a job waits and tries again). The service's own 4xx answers (a bad SMILES, an unknown corpus) are the caller's mistakes:
they come back as ``RetrievalRefused`` with the service's status, message and field.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

import httpx

from icma.core.errors import IcmaError, UnavailableError
from icma.core.prompts import Example
from icma.core.settings import Settings
from icma.core.tasks import Task, spec
from icma.generation.options import RetrievalOptions

class RetrievalUnavailable(UnavailableError):
    """The retrieval service cannot be reached or keeps failing (a 503 for the worker's callers)."""


class RetrievalRefused(IcmaError):
    """The retrieval service refused the request as invalid (its 4xx, passed on)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message, field=field)
        self.status, self.code = status, code


class Retriever(Protocol):
    def examples(self, task: Task, queries: Sequence[str], k: int,
                 options: RetrievalOptions) -> list[list[Example]]: ...

    def close(self) -> None:
        """Release what the retriever holds (HttpRetriever: its connection pool); most hold
        nothing that needs it."""
        # A body that is not just a docstring or ``...``: type checkers take such a protocol
        # member as abstract, and the retrievers that subclass this one are to inherit it.
        return None


@dataclass
class HttpRetriever(Retriever):
    """The retrieval service's client. One pooled ``httpx.Client``: thread-safe, so request
    handlers and the job runner share it."""

    base_url: str
    api_key: str | None = None
    timeout: float = 10.0
    retries: int = 2
    backoff: float = 0.2  # seconds before the first retry, doubled after each
    _client: httpx.Client = field(init=False, repr=False)

    def __post_init__(self) -> None:
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._client = httpx.Client(base_url=self.base_url.rstrip("/"), headers=headers,
                                    timeout=httpx.Timeout(self.timeout, connect=min(self.timeout,
                                                                                   3.0)))

    @classmethod
    def from_settings(cls, settings: Settings, base_url: str | None = None) -> "HttpRetriever":
        key = settings.retrieval_api_key or settings.api_key
        return cls(base_url or settings.retrieval_url, key.get_secret_value() if key else None,
                   settings.retrieval_timeout, settings.retrieval_retries)

    def examples(self, task: Task, queries: Sequence[str], k: int,
                 options: RetrievalOptions) -> list[list[Example]]:
        if k == 0:
            return [[] for _ in queries]
        path = "/v1/retrieve/molecules" if task == "mol2cap" else "/v1/retrieve/captions"
        body: dict = {spec(task).query: list(queries), "k": k,
                      "method": options.method_for(task), "order": "ranked",
                      "exclude_cids": list(options.exclude_cids)}
        if options.corpus:
            body["corpus"] = options.corpus
        if options.exclude_same:
            body[spec(task).exclude_same] = True
        if options.random_walk is not None:
            body["random_walk"] = {"skip_probability": options.random_walk[0],
                                   "seed": options.random_walk[1]}
        try:
            data = self._post(path, body)
        except RetrievalRefused as exc:
            # One query is the caller's one field: ``smiles``, not the service's ``smiles[0]``.
            if len(queries) == 1 and exc.field == f"{spec(task).query}[0]":
                raise RetrievalRefused(exc.status, exc.code, exc.message,
                                       spec(task).query) from None
            raise
        return [[Example(smiles=e["smiles"], caption=e["description"], cid=e["cid"],
                         score=e["score"]) for e in r["examples"]] for r in data["results"]]

    def ready(self) -> tuple[bool, str]:
        """Whether the service answers /readyz with 200 (one try, short timeout)."""
        try:
            r = self._client.get("/readyz", timeout=2.0)
        except httpx.HTTPError as exc:
            return False, f"unreachable ({type(exc).__name__})"
        return r.status_code == 200, f"HTTP {r.status_code}"

    def _post(self, path: str, body: dict) -> dict:
        delay, last = self.backoff, ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(delay)
                delay *= 2
            try:
                r = self._client.post(path, json=body)
            except httpx.TimeoutException:
                last = f"no answer within {self.timeout:g} s"
                continue
            except httpx.HTTPError as exc:
                last = f"cannot connect ({type(exc).__name__}: {exc})"
                continue
            if r.status_code in (502, 503, 504) or "retry-after" in r.headers:
                last = f"it answered {r.status_code}: {_message(r)}"
                continue
            if r.status_code == 401:
                raise RetrievalUnavailable(
                    "the retrieval service refused the worker's API key (set "
                    "ICMA_RETRIEVAL_API_KEY to its ICMA_API_KEY)", field="retrieval")
            if 400 <= r.status_code < 500:
                err = _error(r)
                raise RetrievalRefused(r.status_code, err.get("code", "invalid_input"),
                                       err.get("message", r.text[:200]), _field(err))
            if r.status_code != 200:
                raise RetrievalUnavailable(f"the retrieval service at {self.base_url} failed "
                                           f"(HTTP {r.status_code})", field="retrieval")
            return r.json()
        raise RetrievalUnavailable(f"the retrieval service at {self.base_url} is unavailable "
                                   f"after {self.retries + 1} tries: {last}", field="retrieval")

    def close(self) -> None:
        self._client.close()


def _error(r: httpx.Response) -> dict:
    try:
        return r.json().get("error") or {}
    except ValueError:
        return {}


def _message(r: httpx.Response) -> str:
    return _error(r).get("message") or r.text[:200]


def _field(err: dict) -> str | None:
    # The service names its own fields (smiles[3], caption, corpus, k); the worker's requests
    # call k "n_shot" and hold the rest under "retrieval".
    f = err.get("field")
    if f is None:
        return None
    if f == "k":
        return "n_shot"
    if f.split("[")[0] in ("smiles", "caption", "body"):
        return f
    return f"retrieval.{f}"


class LocalRetriever(Retriever):
    """Indexes in this process (``icma translate`` without a service): the same corpora the
    retrieval service holds, built or loaded from the settings' data directory's cache."""

    def __init__(self, settings: Settings, kinds: Sequence[str]):
        from icma.retrieval.store import CorpusStore

        self.store = CorpusStore(settings.data_dir, list(kinds), settings=settings)
        self.store.start(background=False)

    def examples(self, task: Task, queries: Sequence[str], k: int,
                 options: RetrievalOptions) -> list[list[Example]]:
        if k == 0:
            return [[] for _ in queries]
        index = self.store.searcher(options.corpus, options.method_for(task))
        return search_examples(index, task, queries, k, options)


class IndexRetriever(Retriever):
    """Indexes already in memory, by kind (``icma tune`` evaluates over the index it built its
    training contexts from). ``options.corpus`` must be unset or name the indexes' corpus."""

    def __init__(self, indexes: dict):
        self.indexes = dict(indexes)

    def examples(self, task: Task, queries: Sequence[str], k: int,
                 options: RetrievalOptions) -> list[list[Example]]:
        from icma.core.errors import InputError

        kind = options.method_for(task)
        if kind not in self.indexes:
            raise InputError(f"no {kind} index here (have {', '.join(self.indexes)})",
                             field="retrieval.method")
        index = self.indexes[kind]
        if options.corpus not in (None, index.corpus.name):
            raise InputError(f"only corpus {index.corpus.name!r} is searched here",
                             field="retrieval.corpus")
        if k == 0:
            return [[] for _ in queries]
        return search_examples(index, task, queries, k, options)


class GivenExamples(Retriever):
    """Examples retrieved earlier, handed out by query (the second stage of a Ray pipeline,
    whose first stage retrieved them on other actors). A query given twice gets its first
    list: what a deterministic retrieval would give it again."""

    def __init__(self, pairs: Iterable[tuple[str, Sequence[Example]]]):
        self._by_query: dict[str, list[Example]] = {}
        for query, examples in pairs:
            self._by_query.setdefault(query, list(examples))

    def examples(self, task: Task, queries: Sequence[str], k: int,
                 options: RetrievalOptions) -> list[list[Example]]:
        return [self._by_query[q][:k] for q in queries]


def search_examples(index, task: Task, queries: Sequence[str], k: int,
                    options: RetrievalOptions) -> list[list[Example]]:
    """What the retrieval service does for a request, in this process: canonical SMILES (or the
    caption) as the query and random-walk key, the options' exclusions and re-ranking."""
    from icma.core import chem
    from icma.retrieval.examples import retrieve_examples
    from icma.core.rerank import RerankConfig
    from icma.retrieval import Exclusion

    cids = frozenset(options.exclude_cids)
    if task == "mol2cap":
        keys = [chem.canonical_smiles(q) for q in queries]
        excl = [Exclusion(cids=cids, canonical_smiles=c if options.exclude_same else None)
                for c in keys]
    else:
        keys = list(queries)
        excl = [Exclusion(cids=cids, caption=q if options.exclude_same else None)
                for q in queries]
    rerank = (RerankConfig() if options.random_walk is None else
              RerankConfig(method="random_walk", skip_prob=options.random_walk[0],
                           seed=options.random_walk[1]))
    return retrieve_examples(index, keys, k, rerank=rerank, exclusions=excl, keys=keys)
