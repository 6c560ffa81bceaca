"""Facts printed next to every measured number: the machine and the code measured."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[2]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX or AVX512-BF16). Without
    either, torch's bfloat16 matmul is a slow fallback: 0.1 GFLOP/s against float32's 7.1 on an
    AVX2-only AMD EPYC (benchmarks/results/matmul_amd-epyc.md), where a bfloat16 tuning run and
    a bfloat16 vLLM server crawled."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def machine() -> str:
    import numpy as np

    cpu = cpu_model() or platform.processor() or platform.machine()
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"numpy {np.__version__}, {time.strftime('%Y-%m-%d')}")


def git_commit(root: Path = SOURCE_ROOT) -> str:
    """The commit measured, with a mark when icma/ or services/ differ from it ("unknown"
    outside a git checkout, e.g. an installed wheel)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "icma", "services"], cwd=root,
                               text=True, capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + (" +uncommitted changes in icma/ or services/" if dirty else "")
