"""MolReGPT's in-context learning beside ICMA's prompts, both through vLLM's OpenAI server.

Starts vLLM's OpenAI-compatible server (from .venv-vllm) with the shipped SmolLM2-135M-Instruct
on 127.0.0.1, then runs ``icma bench quality --engine openai --molregpt`` against it: the
nearest-neighbour rows, the untuned model with ICMA's prompt (2 graph / 4 BM25 examples,
completions API, within the 2,048-token budget counted by the model's tokenizer) and MolReGPT's (10 rdkit / BM25 examples, chat messages, JSON answers, chat
API; a prompt over the server's 2,048-token context goes again without its longest example),
on the first ``--limit`` test queries, greedy. The answers are kept as they come, in
``benchmarks/results/molregpt/answers/`` (committed: the raw outputs, like MolReGPT's released
ones); interrupted, even in another checkout, it resumes from them.

    .venv/bin/python benchmarks/bench_molregpt.py [--limit 300] [--dtype float32]

Writes benchmarks/results/molregpt/quality-chebi20-val-test.md, .json and .png.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, RESULTS  # noqa: E402

WORK = REPO / ".bench-molregpt"
MODEL = "smollm2"
ANSWERS = RESULTS / "molregpt" / "answers"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--dtype", help="the server's weights (default: bfloat16 where the CPU "
                                     "multiplies it in hardware, else float32)")
    ap.add_argument("--decodings", default="greedy")
    args = ap.parse_args()

    from icma.cli import main as cli_main
    from icma.core.settings import get_settings
    from icma.generation.models import converted_default
    from icma.server.spawn import spawn_vllm_openai, stop_services

    from icma.evaluation.machine import cpu_has_fast_bf16

    args.dtype = args.dtype or ("bfloat16" if cpu_has_fast_bf16() else "float32")
    WORK.mkdir(exist_ok=True)
    model = converted_default(get_settings().data_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    lora = []
    shipped = get_settings().shipped_adapters_dir
    if shipped is not None and any(shipped.glob("*/icma-adapter.json")):
        # a shipped default adapter gets its (ICMT) rows: the engine loads it into the server
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "true"
        lora = ["--enable-lora", "--max-lora-rank", "32"]
    server = spawn_vllm_openai(REPO / ".venv-vllm/bin/python", model, port=port,
                               served_name=MODEL, env=env, log=WORK / "server.log",
                               args=["--dtype", args.dtype, "--max-model-len", "2048",
                                     "--seed", "0", "--enforce-eager", *lora])
    # On two shared cores a request can wait minutes for the server; one that times out is
    # sent again while the server still works on the first copy, which only adds work.
    os.environ.setdefault("ICMA_OPENAI_TIMEOUT_S", "3600")
    # The served model's own tokenizer: ICMA's prompts keep to their 2,048-token budget by
    # dropping the lowest-ranked examples (without it a long 4-example cap2mol prompt was
    # refused and ended the run); MolReGPT's chat prompts keep its remedy.
    os.environ.setdefault("ICMA_OPENAI_TOKENIZER", str(model))
    get_settings.cache_clear()
    try:
        code = cli_main(["bench", "quality", "--protocol", "chebi20-val-test",
                         "--limit", str(args.limit), "--engine", "openai",
                         "--openai-base-url", f"http://127.0.0.1:{port}/v1",
                         "--openai-model", MODEL, "--molregpt", "--no-zero-shot",
                         # the report's weights: the server's (the engine cannot see them)
                         "--dtype", args.dtype,
                         "--decodings", args.decodings, "--answers", str(ANSWERS),
                         "--out", str(RESULTS / "molregpt")])
    finally:
        stop_services([server], timeout=60)
    sys.exit(code)


if __name__ == "__main__":
    main()
