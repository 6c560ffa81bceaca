"""Shared helpers for benchmarks: where the data is, machine facts, result files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from icma.machine import cpu_model, git_commit, machine  # noqa: F401  (re-exported)

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
