"""Shared helpers for benchmarks: where the data is, machine facts, result files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from icma.evaluation.machine import cpu_model, git_commit, machine  # noqa: F401  (re-exported)
from icma.server.spawn import spawn_service, stop_services  # noqa: F401  (re-exported)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESULTS = REPO / "benchmarks" / "results"


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values), q))


def write(name: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(text)
    print(f"wrote {path}")
    return path


def start_service(args: list[str], url: str, env: dict, timeout: float = 900) -> subprocess.Popen:
    """``icma serve ARGS`` of this checkout, returned once ``/readyz`` answers 200 (stop it with
    ``stop_services``)."""
    return spawn_service([*args, "--log-level", "warning"], url, env=env, cwd=REPO,
                         timeout=timeout)
