"""openapi.yaml at the repository root: both services in one document (a test checks drift).

Each path carries the server it lives on (OpenAPI's path-level ``servers``): the retrieval
service's on :8001, the worker's on :8000. /healthz, /readyz and /metrics are the same code on
both (``icma.server.http.install_health``), so they are described once with both servers; generating
the document fails if the two apps ever disagree on a shared path or schema name.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml

from icma import __version__
from icma.core.settings import Settings

RETRIEVAL = {"url": "http://127.0.0.1:8001", "description": "retrieval service"}
AppFactory = Callable[[Settings], Any]  # create_app of a service

WORKER = {"url": "http://127.0.0.1:8000", "description": "translation worker"}


def openapi_document(retrieval_app: AppFactory, worker_app: AppFactory) -> dict:
    """One document from the two apps' factories (passed in: the library does not import the
    apps; ``icma openapi`` and the drift test hand them over)."""
    # Built with default settings and never started: the document does not depend on data
    # (the worker's job store is opened in a throw-away folder).
    with tempfile.TemporaryDirectory() as tmp:
        docs = [(retrieval_app(Settings(api_key=None)).openapi(), RETRIEVAL),
                (worker_app(Settings(api_key=None, data_dir=Path(tmp))).openapi(), WORKER)]
    doc: dict = {
        "openapi": docs[0][0]["openapi"],
        "info": {"title": "icma", "version": __version__,
                 "description": "ICMA molecule <-> caption translation. The retrieval service "
                                "(port 8001) finds similar molecule-caption examples; the "
                                "translation worker (port 8000) writes prompts with them and "
                                "runs the LLM, batch jobs and adapters. Each path names its "
                                "server."},
        "servers": [RETRIEVAL, WORKER],
        "paths": {},
        "components": {"schemas": {}},
    }
    for app_doc, server in docs:
        for path, item in app_doc["paths"].items():
            if path in doc["paths"]:
                shared = {k: v for k, v in doc["paths"][path].items() if k != "servers"}
                if shared != item:
                    raise RuntimeError(f"{path} differs between the two services")
                doc["paths"][path]["servers"].append(server)
            else:
                doc["paths"][path] = {"servers": [server], **item}
        for name, schema in app_doc.get("components", {}).get("schemas", {}).items():
            known = doc["components"]["schemas"].setdefault(name, schema)
            if known != schema:
                raise RuntimeError(f"schema {name} differs between the two services; rename one")
    doc["components"]["securitySchemes"] = {"bearer": {
        "type": "http", "scheme": "bearer",
        "description": "required on every endpoint but /healthz, /readyz and /metrics when the "
                       "service has ICMA_API_KEY set"}}
    return doc


def render(retrieval_app: AppFactory, worker_app: AppFactory) -> str:
    return yaml.safe_dump(openapi_document(retrieval_app, worker_app), sort_keys=False,
                          allow_unicode=True, width=100)
