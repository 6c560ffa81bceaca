"""Property-based API fuzzing with schemathesis against openapi.yaml: no server errors.

A real server (uvicorn on 127.0.0.1) answers; schemathesis generates valid and invalid requests
from the committed document. The server's own Prometheus counters count what it answered, so the
test can assert both the volume (>= 1,000 requests) and that none was a 5xx.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx

from icma.core.settings import Settings
from icma.services.retrieval.app import create_app
from tests.conftest import SERVICE_KINDS
from tests.service_helpers import LiveServer
from tests.test_retrieval_service import settings
from icma.workers.translator.app import create_app as worker_app

REPO = Path(__file__).resolve().parents[1]


def fuzz(server: LiveServer, prefix: str, tags: str, tmp_path: Path, min_requests: int) -> None:
    """Run schemathesis on the operations tagged ``tags`` against ``server``; assert no 5xx
    by the server's own request counters (metric ``{prefix}_http_requests_total``)."""
    st = Path(sys.executable).with_name("st")
    done = subprocess.run(
        [str(st), "run", str(REPO / "openapi.yaml"), "--url", server.url,
         "--include-tag-regex", tags,
         "--checks", "not_a_server_error", "--max-examples", "100", "--seed", "1",
         "--max-time", "150", "--request-timeout", "30", "--workers", "1",
         "-H", "Authorization: Bearer fuzz", "--phases", "examples,coverage,fuzzing",
         "--no-color"],
        capture_output=True, text=True, timeout=420, cwd=tmp_path)
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    counts = [(m.group(1), m.group(2), float(m.group(3))) for m in re.finditer(
        prefix + r'_http_requests_total\{path="([^"]*)",status="(\d+)"\} (\S+)', metrics)]
    total = sum(n for _, _, n in counts)
    # /readyz answers 503 by design while loading (our own polling before the run)
    server_errors = sum(n for path, status, n in counts
                        if status.startswith("5") and path != "/readyz")
    print(f"schemathesis: {total:.0f} requests answered; by path and status: {counts}")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert server_errors == 0, counts
    assert total >= min_requests, f"only {total:.0f} requests were generated: {counts}"


def test_schemathesis_finds_no_server_errors_in_retrieval(svc_dir, tmp_path):
    app = create_app(settings(svc_dir, api_key="fuzz", max_corpora=4))
    with LiveServer(app) as server:
        server.wait_ready()
        fuzz(server, "icma_retrieval", "health|corpora|retrieval", tmp_path, 1000)


def test_schemathesis_finds_no_server_errors_in_the_worker(svc_dir, tmp_path):
    """The worker with the nearest-neighbour engine (every path but the model is real)."""
    with LiveServer(create_app(Settings(data_dir=svc_dir, retrieval_kinds=SERVICE_KINDS))) as r:
        r.wait_ready()
        app = worker_app(Settings(data_dir=tmp_path, retrieval_url=r.url, api_key="fuzz",
                                  engine="nearest-neighbour", jobs_db=tmp_path / "jobs.db",
                                  adapters_dir=tmp_path / "adapters", max_jobs=8))
        with LiveServer(app) as server:
            server.wait_ready()
            fuzz(server, "icma_worker", "health|translate|adapters|jobs", tmp_path, 500)
