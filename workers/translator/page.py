"""The web page for people: ``/`` and its two assets, served by the worker.

Plain HTML, CSS and JavaScript in ``static/``, with no build step: what is in the repository is
what the browser gets. The page talks to the worker only through the public API (the same
calls as ``curl``), so it is outside ``openapi.yaml`` and needs no route of its own beyond its
files. It carries a small configuration (the tasks' retrieval methods and defaults, the
decodings, whether a key is needed) so that the choices it offers come from the code that
checks them, not from a copy in JavaScript.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response

from icma import __version__
from icma.core.errors import NotFoundError
from icma.core.settings import Settings
from icma.core.tasks import TASK_SPECS
from icma.generation.engines import BOUNDS, DECODINGS
from icma.generation.options import DEFAULT_NUM_SAMPLES

STATIC = Path(__file__).with_name("static")
ASSETS = {"page.js": "text/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8"}
#: The page runs only its own script, calls only its own origin and cannot be framed. Styles
#: allow inline attributes: RDKit's SVG drawings colour every atom label with one.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; connect-src 'self'; "
                               "img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
                               "object-src 'none'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def page_config(settings: Settings) -> dict:
    """What the page's settings offer, from the code that validates requests."""
    return {
        "version": __version__,
        "key_required": settings.api_key is not None,
        "tasks": {name: {"methods": list(s.methods), "default_method": s.default_method,
                         "n_shot": s.n_shot, "query": s.query, "answer": s.answer}
                  for name, s in TASK_SPECS.items()},
        "decodings": list(DECODINGS),
        "num_samples": {"default": DEFAULT_NUM_SAMPLES, "max": BOUNDS["num_samples"]["le"]},
    }


def render_index(settings: Settings) -> str:
    # ``<`` escaped so that no text in the configuration can close the script element.
    config = json.dumps(page_config(settings)).replace("<", "\\u003c")
    return (STATIC / "index.html").read_text(encoding="utf-8").replace("{{CONFIG}}", config)


def install_page(app: FastAPI, settings: Settings) -> None:
    """``GET /`` (the page) and ``GET /page/{name}`` (its script and style sheet). No API key:
    the page asks for it and sends it with each API call."""
    index = render_index(settings)
    assets = {name: (STATIC / name).read_bytes() for name in ASSETS}

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(index, headers={**HEADERS, "Cache-Control": "no-cache"})

    @app.get("/page/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in assets:
            raise NotFoundError(f"no page file {name!r}", field="name")
        return Response(assets[name], media_type=ASSETS[name],
                        headers={**HEADERS, "Cache-Control": "no-cache"})
