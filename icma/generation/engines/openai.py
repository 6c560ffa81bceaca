"""The ``openai`` engine: generation by any OpenAI-compatible server over HTTP.

OpenAI itself, a ``vllm serve`` deployment, TGI, llama.cpp's server, Ollama: most people who
have an LLM have it behind this API, not as a model folder. ICMA's prompts are text a model
continues, so they go to the completions API (``/completions``: the prompt as written, answer
priming included, the stop texts); a chat prompt style (MolReGPT's messages) goes to the chat
API (``/chat/completions``), whose template the server applies. An adapter is a model name
on the server (vLLM serves LoRA adapters under their names: ``--lora-modules name=folder``), so
a request's adapter picks the model it asks for. A registry adapter the server does not serve
yet is loaded into it by name from the adapter's folder (vLLM's ``POST /v1/load_lora_adapter``,
which a server allows with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true``; the folder's path must be
the same on the server, as with the registry volume both containers mount in
docker-compose.yml), then asked again.

Each prompt is one HTTP request (its ``num_samples`` answers are one request with ``n``),
at most ``ICMA_OPENAI_MAX_CONCURRENCY`` in flight. A connection error, a timeout, a 429 or a
5xx is retried ``ICMA_OPENAI_MAX_RETRIES`` times with exponential back-off (a server's
``Retry-After`` is honoured, up to ``MAX_WAIT_S``), then becomes a 503 naming the engine and
the server. A refused key (401/403) is a 503 too: it is the deployment's configuration, not
the client's request. A prompt the server finds too long for its context comes back as that
generation's ``error`` (the pipeline decides: MolReGPT drops an example and asks again);
another refused request is a 422 naming the field. The API key is sent as a bearer token and
never logged or shown.

What the API cannot express is refused up front with a 422: beam search, and
``no_repeat_ngram_size``. ``top_k`` and ``repetition_penalty`` are not OpenAI's parameters but
vLLM's, TGI's and llama.cpp's: they are sent unless ``ICMA_OPENAI_SAMPLING_EXTENSIONS=false``
(OpenAI rejects unknown parameters). Token counts come from the server's ``usage``; for
several samples in one request the server reports one total, shared out over the samples by
their lengths in characters.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from icma.core.errors import InputError, PromptTooLongError, UnavailableError
from icma.core.settings import Settings
from icma.core.tasks import spec
from icma.generation.engines.base import (Adapter, Generation, GenerationInput,
                                          GenerationParams, Generator, cut_at_stop)

log = logging.getLogger(__name__)

#: The longest wait between two tries, whatever a server's Retry-After asks.
MAX_WAIT_S = 30.0
#: Words of a 400 that mean the prompt is over the model's context (vLLM, OpenAI, TGI, llama.cpp).
#: vLLM shortens ``max_tokens`` to the room left after the prompt; a prompt that fills the
#: context exactly leaves 0 and is refused as "max_tokens must be at least 1, got 0" (icma
#: never asks for fewer than 1), which is the same problem.
_TOO_LONG = ("maximum context length", "context length", "context_length_exceeded",
             "too many tokens", "exceeds the", "is too long", "input validation error",
             "max_tokens must be at least 1, got 0")


class OpenAIGenerator(Generator):
    name = "openai"
    chat_api = True

    def __init__(self, model: str | None = None, *, settings: Settings,
                 adapter: str | Path | None = None):
        import httpx

        url = check_settings(settings)
        self.model = model or settings.openai_model or ""
        if adapter is not None:  # a name on the server, or a folder named like it
            self.adapter = Path(adapter).name
        self.url = url.rstrip("/")
        self.retries = settings.openai_max_retries
        self.extensions = settings.openai_sampling_extensions
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        self._client = httpx.Client(
            base_url=self.url, timeout=httpx.Timeout(settings.openai_timeout_s, connect=10.0),
            headers={"Authorization": f"Bearer {key}"} if key else {},
            limits=httpx.Limits(max_connections=settings.openai_max_concurrency))
        self._pool = ThreadPoolExecutor(settings.openai_max_concurrency,
                                        thread_name_prefix="icma-openai")
        self.tokenizer = None
        if settings.openai_tokenizer:  # a local folder: the prompt budget counts with it
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(settings.openai_tokenizer)
        self._lock = threading.Lock()  # a fast tokenizer is not for two threads at once
        self._served: set[str] = set()  # adapters known to be on the server

    def count_tokens(self, text: str) -> int | None:
        if self.tokenizer is None:
            return None
        with self._lock:
            return len(self.tokenizer(text)["input_ids"])

    def generate(self, inputs: Sequence[GenerationInput], params: GenerationParams,
                 adapter: Adapter | None = None) -> list[Generation]:
        params = params.for_engine()
        if params.decoding == "beam":
            raise InputError("the openai engine cannot search beams (the OpenAI API has no "
                             "beam search): use sample, greedy or consensus",
                             field="generation.decoding")
        if params.no_repeat_ngram_size:
            raise InputError("the openai engine cannot ban repeated n-grams (no such API "
                             "parameter): leave no_repeat_ngram_size at 0",
                             field="generation.no_repeat_ngram_size")
        model = adapter.name if adapter is not None else (self.adapter or self.model)
        if adapter is not None and adapter.name not in self._served:
            self._serve(adapter)
        futures = [self._pool.submit(self._one, x, params, model) for x in inputs]
        out: list[Generation] = []
        for f in futures:  # every request finishes before an error is raised
            f.exception()
        for f in futures:
            out += f.result()
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def _serve(self, adapter: Adapter) -> None:
        """Make sure the server serves ``adapter`` under its name: listed by ``/models``, or
        loaded from its folder (vLLM's runtime LoRA loading). An adapter it cannot get is the
        request's error, naming what to do."""
        import httpx

        try:
            listed = self._client.get("/models")
            names = {m.get("id") for m in listed.json().get("data", [])} \
                if listed.status_code == 200 else set()
        except (httpx.HTTPError, ValueError, AttributeError):
            names = set()  # the request itself will say what is wrong with the server
        if adapter.name not in names:
            try:
                r = self._client.post("/load_lora_adapter", json={
                    "lora_name": adapter.name, "lora_path": str(adapter.path)})
            except httpx.HTTPError:
                return
            if r.status_code >= 400:
                raise InputError(
                    f"engine openai: {self.url} does not serve adapter {adapter.name!r} and "
                    f"did not load it from {adapter.path} ({r.status_code} {_message(r)}); "
                    "serve it under that name (vLLM: --lora-modules NAME=FOLDER, or "
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true and the same folder path)",
                    field="adapter")
            log.info("engine openai: %s loaded adapter %s", self.url, adapter.name)
        self._served.add(adapter.name)

    # --- one prompt ----------------------------------------------------------------------------

    def _one(self, x: GenerationInput, params: GenerationParams, model: str) -> list[Generation]:
        n = params.num_samples
        body: dict = {"model": model, "max_tokens": params.max_new_tokens, "n": n,
                      "seed": params.seed % 2**63}
        stops = [s for s in params.stop if s][:4]  # OpenAI takes at most 4
        if stops:
            body["stop"] = stops
        if params.decoding == "greedy":
            body["temperature"] = 0.0
        else:
            body.update(temperature=params.temperature, top_p=params.top_p)
            if self.extensions and params.top_k:
                body["top_k"] = params.top_k
        if self.extensions and params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        chat = x.messages is not None
        if chat:
            path, body["messages"] = "/chat/completions", x.messages
        else:
            path, body["prompt"] = "/completions", x.prompt
        reply = self._post(path, body, x, model)
        if isinstance(reply, PromptTooLongError):
            return [Generation("", finish_reason="length", error=reply) for _ in range(n)]
        choices = sorted(reply.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise UnavailableError(f"engine openai: {self.url} answered {len(choices)} "
                                   f"choices for n={n}", field="engine")
        texts = [(c.get("message") or {}).get("content") or "" if chat else c.get("text") or ""
                 for c in choices]
        usage = reply.get("usage") or {}
        shares = _shares(int(usage.get("completion_tokens") or 0), [len(t) for t in texts])
        out = []
        for c, text, tokens in zip(choices, texts, shares):
            text, cut = cut_at_stop(text, params.stop)
            out.append(Generation(text, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                                  completion_tokens=tokens,
                                  finish_reason="length" if c.get("finish_reason") == "length"
                                  and not cut else "stop"))
        return out

    def _post(self, path: str, body: dict, x: GenerationInput, model: str):
        """The server's JSON answer; a too-long prompt as a ``PromptTooLongError`` returned;
        transient failures retried; the rest raised as errors that say what to do."""
        import httpx

        field = spec(x.task).query
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                r = self._client.post(path, json=body)
            except httpx.HTTPError as exc:  # refused, reset, timed out
                problem = f"cannot reach {self.url} ({type(exc).__name__})"
                if last:
                    raise UnavailableError(f"engine openai: {problem}", field="engine") from None
                self._wait(attempt, None, problem)
                continue
            if r.status_code == 429 or r.status_code >= 500:
                problem = f"{self.url} answered {r.status_code} {_message(r)}"
                if last:
                    raise UnavailableError(f"engine openai: {problem}", field="engine")
                self._wait(attempt, r.headers.get("retry-after"), problem)
                continue
            if r.status_code in (401, 403):
                raise UnavailableError(f"engine openai: {self.url} refused the API key "
                                       f"({r.status_code}): check ICMA_OPENAI_API_KEY",
                                       field="engine")
            if r.status_code == 404:
                which = "adapter" if model != self.model else "engine"
                raise (InputError if which == "adapter" else UnavailableError)(
                    f"engine openai: {self.url} serves no model {model!r} at {path} "
                    f"(404 {_message(r)})", field=which)
            if r.status_code >= 400:
                text = _message(r)
                if any(w in text.lower() for w in _TOO_LONG):
                    return PromptTooLongError(f"the server's model takes no prompt this long: "
                                              f"{text}", field=field)
                raise InputError(f"engine openai: the server refused the request "
                                 f"({r.status_code}): {text}", field="generation")
            try:
                return r.json()
            except ValueError:
                raise UnavailableError(f"engine openai: {self.url} answered {r.status_code} "
                                       "with no JSON", field="engine") from None
        raise AssertionError("unreachable")

    @staticmethod
    def _wait(attempt: int, retry_after: str | None, problem: str) -> None:
        try:
            wait = float(retry_after) if retry_after else 0.5 * 2 ** attempt
        except ValueError:  # an HTTP date: not worth parsing, back off as usual
            wait = 0.5 * 2 ** attempt
        wait = min(MAX_WAIT_S, wait) * (0.75 + random.random() / 2)
        log.warning("engine openai: %s; trying again in %.1f s", problem, wait)
        time.sleep(wait)


def check_settings(settings: Settings) -> str:
    """The server's URL, once the settings the engine needs are there (else a one-line error
    naming the variable)."""
    from urllib.parse import urlparse

    url = settings.openai_base_url
    if not url:
        raise InputError("the openai engine needs the server's URL: set ICMA_OPENAI_BASE_URL "
                         "(e.g. http://127.0.0.1:8002/v1)", field="ICMA_OPENAI_BASE_URL")
    if urlparse(url).scheme not in ("http", "https") or not urlparse(url).netloc:
        raise InputError(f"must be an http(s) URL, got {url!r}", field="ICMA_OPENAI_BASE_URL")
    if not settings.openai_model:
        raise InputError("the openai engine needs the model's name on the server: set "
                         "ICMA_OPENAI_MODEL", field="ICMA_OPENAI_MODEL")
    tok = settings.openai_tokenizer
    if tok is not None and not (Path(tok) / "tokenizer_config.json").is_file():
        raise InputError(f"{tok} is not a tokenizer folder (no tokenizer_config.json)",
                         field="ICMA_OPENAI_TOKENIZER")
    return url


def _message(r) -> str:
    """The error text of a server's answer (OpenAI's ``{"error": {"message"}}``, vLLM's and
    others' variants), one line, bounded."""
    try:
        data = r.json()
    except ValueError:
        return r.text.strip().splitlines()[0][:300] if r.text.strip() else ""
    err = data.get("error", data) if isinstance(data, dict) else data
    text = err.get("message") or err.get("detail") if isinstance(err, dict) else err
    return " ".join(str(text or "").split())[:300]


def _shares(total: int, lengths: list[int]) -> list[int]:
    """``total`` tokens shared out in proportion to ``lengths`` (largest remainders), so that
    the shares add up to it."""
    if len(lengths) == 1:
        return [total]
    weight = sum(lengths) or len(lengths)
    exact = [total * (ln or (0 if sum(lengths) else 1)) / weight for ln in lengths]
    shares = [int(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: shares[i] - exact[i])[:total - sum(shares)]:
        shares[i] += 1
    return shares
