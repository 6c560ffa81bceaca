"""Shared helpers for benchmarks: where the data is, machine facts, result files."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from icma.evaluation.machine import cpu_model, git_commit, machine  # noqa: F401  (re-exported)

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


def start_service(args: list[str], url: str, env: dict, timeout: float = 900,
                  poll: float = 0.5) -> subprocess.Popen:
    """``icma serve ARGS`` as the product starts it, returned once ``/readyz`` answers 200."""
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "icma", "serve", *args, "--log-level",
                             "warning"], env=env, cwd=REPO)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{args[0]} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(poll)
    proc.kill()
    raise SystemExit(f"{args[0]} not ready after {timeout:.0f} s")
