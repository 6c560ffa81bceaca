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


def alternated(rep: int, variants: tuple) -> tuple:
    """The order variants run in repeat ``rep``: reversed every other repeat, so that drift in
    the machine's load falls on all alike."""
    return variants if rep % 2 == 0 else variants[::-1]


def run_facts(load_before: float) -> dict:
    """What a timing result states about its run (``facts_line`` writes it)."""
    import os

    import torch

    return {"commit": git_commit(), "machine": machine(), "load_before": load_before,
            "load_after": os.getloadavg()[0], "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def facts_line(p: dict) -> str:
    return (f"Machine: {p['machine']}; torch {p['torch']}, {p['threads']} threads; commit "
            f"{p['commit']}; load average {p['load_before']:.2f} before, {p['load_after']:.2f} "
            "after.")


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
