"""HTTP plumbing shared by the services: one error shape, API keys, body limits, metrics.

Every 4xx has the body ``{"error": {"code": ..., "message": ..., "field": ...}}``; a 5xx says only
"internal error" (details go to the log, never to the client).
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import time
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from icma.core.errors import ForbiddenError, IcmaError, InputError, UnavailableError
from icma.core.jsontext import JsonTextError, field_path, parse_json

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    """/healthz and /readyz of both services (one schema, so openapi.yaml can say both)."""

    status: str
    worker: int = Field(description="process id of the worker that answered (`icma serve "
                                    "--workers N` runs several behind one port)")


#: Error responses to document on every endpoint that takes input.
ERROR_RESPONSES = {
    status: {"model": ErrorBody, "description": text}
    for status, text in [(400, "request body is not acceptable JSON (not UTF-8, malformed, or "
                                "nested deeper than 32 levels)"),
                         (401, "missing or wrong API key"), (404, "unknown corpus"),
                         (409, "a name conflict, or a corpus whose index build failed"),
                         (413, "request body too large"), (422, "invalid input")]
}


class ApiError(StarletteHTTPException):
    """An HTTP error raised by the plumbing (a body over its limit, bad JSON). An
    HTTPException, because FastAPI passes those on when one is raised while it reads the body
    (BodyLimit raises inside ``receive``) and turns any other exception there into a 400."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict | None = None):
        super().__init__(status, message, headers)
        self.status, self.code, self.message, self.field = status, code, message, field


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message, field=field))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|[A-Z]\w*|"
                       r"function-\w+\[.*\])$")


def _loc_to_field(loc) -> str:
    # Union members add their type to the location ('smiles', 'str'): keep only field names.
    return field_path(p for p in loc if p not in ("body", "query", "path")
                      and not (isinstance(p, str) and _TYPE_TAG.match(p))) or "body"


def describe_validation(errors: list[dict]) -> tuple[str, str]:
    """(field, message) for pydantic's errors: the first error's field, and every message about
    that field (a union gives one per member)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = _loc_to_field(first.get("loc", ()))
    same = list(dict.fromkeys(e["msg"] for e in errors
                              if _loc_to_field(e.get("loc", ())) == field))
    others = sum(_loc_to_field(e.get("loc", ())) != field for e in errors)
    more = f" (and {others} more problem(s))" if others else ""
    return field, " or ".join(same) + more


def validation_input_error(exc, prefix: str) -> InputError:
    """A pydantic ValidationError about a value that came in as ``prefix`` (a JSON form field)
    as an InputError naming ``prefix.<field>``."""
    field, message = describe_validation(exc.errors())
    return InputError(message, field=prefix if field == "body" else f"{prefix}.{field}")


def json_input_error(exc: JsonTextError, prefix: str) -> InputError:
    """A JSON text given as ``prefix`` (a form field) that ``parse_json`` refused."""
    return InputError(exc.reason, field=f"{prefix}.{exc.field}" if exc.field else prefix)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.exception_handler(IcmaError)
    async def _icma(request: Request, exc: IcmaError):
        # Every library error carries its status and code (icma.core.errors).
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return error_response(exc.status, exc.code, exc.message, exc.field, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if errors and errors[0].get("type") == "json_invalid":
            first = errors[0]
            return error_response(400, "bad_json", f"request body is not valid JSON: "
                                  f"{first.get('ctx', {}).get('error', first['msg'])}", "body")
        field, message = describe_validation(errors)
        return error_response(422, "invalid_input", message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"),
                              str(exc.detail), None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _outer(request: Request, exc: Exception):
        # Only what escapes the outer middlewares comes here (InternalErrors takes the rest);
        # Starlette re-raises it after this answer and uvicorn logs it.
        return error_response(500, "internal", "internal error", None)

    app.add_middleware(InternalErrors)


class InternalErrors:
    """Pure ASGI middleware: an exception no handler took is a bug. Log it once, with its
    traceback, and answer 500 "internal error". Starlette's own last handler re-raises after
    answering, so that uvicorn logged every 500 a second time ("Exception in ASGI
    application"); nothing escapes from here. Installed innermost, so the request counter
    sees the 500."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_noting_start(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_noting_start)
        except Exception:
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            if not started:  # (otherwise the client sees the response cut short)
                await error_response(500, "internal", "internal error")(scope, receive, send)


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return True  # FastAPI reads such a body as JSON too, unless it insists on the header
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind.startswith("application/") and (kind.endswith("/json") or kind.endswith("+json"))


class _CheckedJsonRequest(Request):
    async def json(self):
        if not hasattr(self, "_checked_json"):
            try:
                self._checked_json = parse_json(await self.body())
            except JsonTextError as exc:
                if exc.syntax:  # ("not valid JSON: ...", "nested deeper than 32 levels")
                    raise ApiError(400, "bad_json", f"request body is {exc.reason}",
                                   "body") from None
                raise ApiError(422, "invalid_input", exc.reason, exc.field or "body") from None
        return self._checked_json


class JsonBodyRoute(APIRoute):
    """The route class of both services' routers: a JSON request body is parsed once, by
    ``icma.core.jsontext`` (proper Unicode, a depth limit, finite numbers), before FastAPI
    validates it, so every field of every endpoint is covered, future ones included. A text
    that is not acceptable JSON is a 400 ``bad_json``; a bad value in it a 422 naming its field
    (``items[2].input``)."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def checked(request: Request):
            content_type = request.headers.get("content-type")
            if _is_json(content_type):
                request = _CheckedJsonRequest(request.scope, request.receive)
                if await request.body():  # (FastAPI reports an empty body missing itself)
                    await request.json()  # raises here, where the app's handlers answer
            return await handler(request)

        return checked


def api_key_dependency(get_key: Callable[[], str | None]):
    """A FastAPI dependency that checks ``Authorization: Bearer <key>`` when a key is set."""

    async def check(request: Request) -> None:  # async: a sync one costs a thread-pool hop
        key = get_key()
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "unauthorized", "missing 'Authorization: Bearer <API key>' header",
                           "authorization", {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "unauthorized", "wrong API key", "authorization",
                           {"WWW-Authenticate": "Bearer"})

    return check


def require_key_for_work(api_key, allow_without_key: bool, what: str) -> None:
    """Refuse (403) work that a client starts on the server (tune jobs, corpus uploads) when no
    API key protects the service, unless the operator opened it on purpose."""
    if api_key is None and not allow_without_key:
        raise ForbiddenError(f"{what} need an API key: set ICMA_API_KEY on the server (clients "
                             f"then send 'Authorization: Bearer <key>'), or "
                             f"ICMA_ALLOW_WORK_WITHOUT_KEY=true to allow them without one",
                             field="authorization")


#: Methods that change something: a cross-site page may send them without a preflight.
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin_key(scheme: str, host: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of ``scheme://host[:port]``, None when it does not parse."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(f"{scheme}://{host}")
        port = parts.port or _DEFAULT_PORTS.get(scheme.lower())
    except ValueError:
        return None
    if not parts.hostname or port is None:
        return None
    return scheme.lower(), parts.hostname.lower(), port


def _origin_of(origin: str) -> tuple[str, str, int] | None:
    scheme, sep, rest = origin.partition("://")
    return _origin_key(scheme, rest) if sep and "/" not in rest else None


class CrossOrigin:
    """Pure ASGI middleware: the services' CORS policy and their cross-site request defence.

    Browsers send ``Origin`` with cross-site requests. Origins in ``allowed``
    (``ICMA_CORS_ORIGINS``) get CORS headers, preflights included; no other origin does, so a
    page elsewhere cannot read a response. A form POST needs no preflight, though, and still
    reaches the server: a state-changing request whose ``Origin`` is neither allowed nor the
    service's own (same scheme, host and port as the request's ``Host``) is refused with 403
    before the app sees it. Requests without ``Origin`` (curl, other services) pass."""

    def __init__(self, app, allowed: list[str]):
        self.app = app
        self.allowed = {key for key in map(_origin_of, allowed) if key is not None}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        raw = headers.get(b"origin")
        if raw is None:
            return await self.app(scope, receive, send)
        origin = raw.decode("latin-1")
        key = _origin_of(origin)
        allowed = key is not None and key in self.allowed
        if scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
            if not allowed:
                return await error_response(
                    403, "forbidden", "this origin may not call the service from a browser "
                    "(ICMA_CORS_ORIGINS lists those that may)", "origin")(scope, receive, send)
            return await Response(status_code=204, headers={
                **self._cors(origin), "Access-Control-Allow-Methods": "GET, POST, DELETE",
                "Access-Control-Allow-Headers": "authorization, content-type",
                "Access-Control-Max-Age": "600"})(scope, receive, send)
        if not allowed and scope["method"] in UNSAFE_METHODS and (
                key is None or key != self._own(scope, headers)):
            return await error_response(
                403, "forbidden", "cross-site request refused: the Origin is neither this "
                "service nor one of ICMA_CORS_ORIGINS", "origin")(scope, receive, send)
        if not allowed:
            return await self.app(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      *((k.lower().encode(), v.encode())
                                        for k, v in self._cors(origin).items())]
            await send(message)

        return await self.app(scope, receive, send_with_cors)

    @staticmethod
    def _cors(origin: str) -> dict[str, str]:
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                "Access-Control-Expose-Headers": "Location, Retry-After, X-Heavy-Atoms, "
                                                 "X-Shared-Atoms, X-MCS-Complete"}

    @staticmethod
    def _own(scope, headers) -> tuple[str, str, int] | None:
        host = headers.get(b"host")
        return _origin_key(scope.get("scheme", "http"), host.decode("latin-1")) if host else None


class BodyLimit:
    """Pure ASGI middleware: refuse bodies over a limit (413) before the app reads them.

    ``limits`` maps a path prefix to its own limit (uploads take more than JSON queries)."""

    def __init__(self, app, default: int, limits: dict[str, int] | None = None):
        self.app, self.default, self.limits = app, default, limits or {}

    def _limit(self, path: str) -> int:
        for prefix, n in self.limits.items():
            if path.startswith(prefix):
                return n
        return self.default

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self._limit(scope["path"])
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            resp = error_response(413, "too_large", f"request body over {limit} bytes", "body")
            return await resp(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise ApiError(413, "too_large", f"request body over {limit} bytes", "body")
            return message

        return await self.app(scope, counted, send)


class CountRequests:
    """Pure ASGI middleware: count HTTP requests by route template and response status."""

    def __init__(self, app, counter: Counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # an exception escaping the app becomes ServerErrorMiddleware's 500

        async def send_noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            route = scope.get("route")  # set by the router on this same scope
            self.counter.labels(getattr(route, "path", "unmatched"), str(status)).inc()


class Metrics:
    """Prometheus metrics of one app, in its own registry (several apps may share a process)."""

    def __init__(self, prefix: str):
        self.registry = CollectorRegistry()
        self.requests = Counter(f"{prefix}_http_requests_total", "HTTP requests",
                                ["path", "status"], registry=self.registry)
        self.queries = Counter(f"{prefix}_queries_total", "Queries answered",
                               ["endpoint", "method"], registry=self.registry)
        self.latency = Histogram(
            f"{prefix}_request_seconds", "Request latency by endpoint and retrieval method",
            ["endpoint", "method"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))

    def install(self, app: FastAPI) -> None:
        """Count requests by route and status with a pure ASGI middleware: Starlette's
        BaseHTTPMiddleware (``@app.middleware("http")``) runs every request in an extra task
        behind memory streams, which cost more CPU than a BM25 query."""
        app.add_middleware(CountRequests, counter=self.requests)

    def observe(self, endpoint: str, method: str, started: float, n_queries: int) -> None:
        self.latency.labels(endpoint, method).observe(time.perf_counter() - started)
        self.queries.labels(endpoint, method).inc(n_queries)

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def install_health(app: FastAPI, metrics: Metrics, state: Callable[[], str]) -> None:
    """/healthz, /readyz and /metrics, the same on both services (openapi.yaml describes them
    once for both). ``state`` is "ready", or why not ("loading", "failed")."""

    # The probes are async: answered on the event loop itself, they need no thread-pool turn,
    # so that a probe waits for one GIL turn, not several, while a large request holds the GIL
    # in RDKit calls (the pool's threads take turns with it; a probe took up to 1.25 s there).
    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz():
        """Alive (the process answers)."""
        return Health(status="ok", worker=os.getpid())

    @app.get("/readyz", response_model=Health, tags=["health"],
             responses={503: {"model": Health, "description": "still loading, or failed"}})
    async def readyz():
        """Ready to answer: the retrieval service's default corpus indexes are loaded, the
        worker's engine is loaded."""
        now = state()
        if now == "ready":
            return Health(status="ready", worker=os.getpid())
        # Loading passes (Retry-After says so); "failed" does not.
        return JSONResponse(Health(status=now, worker=os.getpid()).model_dump(), status_code=503,
                            headers={"Retry-After": str(UnavailableError.retry_after)}
                            if now == "loading" else None)

    @app.get("/metrics", tags=["health"], response_class=JSONResponse,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"}})
    def prometheus():
        """Prometheus metrics: request counts and latency histograms per endpoint (and the
        worker's engine queue and jobs)."""
        return metrics.response()
