"""openapi.yaml at the repository root, generated from the service apps (a test checks drift)."""

from __future__ import annotations

from pathlib import Path

import yaml

from icma.settings import Settings


def openapi_document() -> dict:
    from services.retrieval.app import create_app

    # Built with default settings and never started: the document does not depend on data.
    doc = create_app(Settings(api_key=None)).openapi()
    doc["servers"] = [{"url": "http://127.0.0.1:8001", "description": "retrieval service"}]
    doc["components"].setdefault("securitySchemes", {})["bearer"] = {
        "type": "http", "scheme": "bearer",
        "description": "required on every endpoint but /healthz, /readyz and /metrics when the "
                       "service has ICMA_API_KEY set"}
    return doc


def render() -> str:
    return yaml.safe_dump(openapi_document(), sort_keys=False, allow_unicode=True, width=100)


def write_openapi(path: Path) -> None:
    Path(path).write_text(render(), encoding="utf-8")
