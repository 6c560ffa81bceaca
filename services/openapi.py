"""openapi.yaml at the repository root: both services in one document (a test checks drift).

Each path carries the server it lives on (OpenAPI's path-level ``servers``): the retrieval
service's on :8001, the worker's on :8000. /healthz, /readyz and /metrics are the same code on
both (``icma.web.install_health``), so they are described once with both servers; generating
the document fails if the two apps ever disagree on a shared path or schema name.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from icma import __version__
from icma.settings import Settings

RETRIEVAL = {"url": "http://127.0.0.1:8001", "description": "retrieval service"}
WORKER = {"url": "http://127.0.0.1:8000", "description": "translation worker"}


def openapi_document() -> dict:
    from services.retrieval.app import create_app as retrieval_app
    from workers.translator.app import create_app as worker_app

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


def render() -> str:
    return yaml.safe_dump(openapi_document(), sort_keys=False, allow_unicode=True, width=100)


def write_openapi(path: Path) -> None:
    Path(path).write_text(render(), encoding="utf-8")
