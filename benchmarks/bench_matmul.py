"""This CPU's matrix-multiply peak in bfloat16 and float32, and whether it has bf16 hardware.

bfloat16 halves memory and, on CPUs with AMX or AVX512-BF16, runs matrix products about 4x
faster than float32; on CPUs without either (AVX2 only), torch falls back to a slow path. The
recipe benchmarks and ``icma tune --precision bfloat16`` assume the first kind: this says
which kind a machine is, before hours go into a run.

    .venv/bin/python benchmarks/bench_matmul.py [--n 1024] [--repeats 3]

Writes benchmarks/results/matmul_<cpu>.md (one file per kind of machine measured).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import facts_line, run_facts, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1024, help="square matrices of this size")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from icma.evaluation.machine import cpu_has_fast_bf16, cpu_model

    facts = run_facts(os.getloadavg()[0])
    rows = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = (torch.randn(args.n, args.n).to(dtype) for _ in range(2))
        torch.matmul(a, b)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - t0)
        rows[name] = 2 * args.n ** 3 / statistics.median(times) / 1e9
        print(f"{name}: {rows[name]:.1f} GFLOP/s", flush=True)
    cpu = cpu_model() or "unknown"
    lines = [f"# Matrix-multiply peak: {cpu}", "",
             f"Produced by `benchmarks/bench_matmul.py`. {facts_line(facts)} torch.matmul of two "
             f"{args.n} x {args.n} matrices, median of {args.repeats}.", "",
             f"bfloat16 hardware (AMX or AVX512-BF16): **{'yes' if cpu_has_fast_bf16() else 'no'}**"
             , "", "| dtype | GFLOP/s |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in rows.items()]
    lines += ["", f"bfloat16 / float32: **{rows['bfloat16'] / rows['float32']:.2f}x**."]
    slug = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-") or "unknown"
    write(f"matmul_{slug}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
