"""LLM generation speed on this machine: float32 against bfloat16 weights, batch 8 and 16.

Protocol: the shipped SmolLM2-135M-Instruct (converted into the data directory), 2 torch
threads; each batch is the same ICMA mol2cap 2-shot prompt (two ChEBI-20 validation examples,
query CCO, answer marker primed) repeated; greedy decoding forced to exactly 64 new tokens
(min_new_tokens = max_new_tokens), so every configuration produces the same number of tokens.
Timed: one prefill pass, then generate(); tokens/s = batch * 64 / generate seconds. Median of 3
runs per configuration, configurations interleaved. Writes benchmarks/results/generation.md.

    .venv/bin/python benchmarks/bench_generation.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import SHARED, git_commit, machine, write  # noqa: E402

NEW_TOKENS = 64
REPEATS = 3


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icma.core.corpus import read_corpus
    from icma.generation.models import converted_default
    from icma.core.prompts import Example, build_prompt
    from icma.core.settings import get_settings

    torch.set_num_threads(2)
    path = converted_default(get_settings().data_dir)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    db, _ = read_corpus(SHARED / "data/chebi20/validation.txt")
    examples = [Example(r.smiles, r.description) for r in db.records[:2]]
    prompt = build_prompt("mol2cap", "CCO", examples, prime_answer=True).text
    models = {d: AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, d)).eval()
              for d in ("float32", "bfloat16")}
    results: dict[tuple[str, int], list[float]] = {}
    prefill: dict[tuple[str, int], list[float]] = {}
    n_prompt = 0
    for _ in range(REPEATS):
        for dtype, model in models.items():
            for bs in (8, 16):
                enc = tok([prompt] * bs, return_tensors="pt", padding=True)
                enc = {k: enc[k] for k in ("input_ids", "attention_mask")}
                n_prompt = enc["input_ids"].shape[1]
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    model(**enc)
                    prefill.setdefault((dtype, bs), []).append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    model.generate(**enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                   do_sample=False, pad_token_id=tok.pad_token_id)
                    results.setdefault((dtype, bs), []).append(time.perf_counter() - t0)
                print(dtype, bs, f"{bs * NEW_TOKENS / results[(dtype, bs)][-1]:.1f} tok/s",
                      flush=True)
    lines = ["# LLM generation speed: float32 against bfloat16 weights", "",
             f"Model: shipped SmolLM2-135M-Instruct; prompt: ICMA mol2cap 2-shot, {n_prompt} "
             f"tokens, repeated to fill the batch; greedy, exactly {NEW_TOKENS} new tokens; "
             f"2 torch threads; median of {REPEATS} interleaved runs.",
             f"Machine: {machine()}; torch {torch.__version__}; commit {git_commit()}.", "",
             "| weights | batch | prefill s | generate s | tokens/s |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for (dtype, bs), times in results.items():
        g = statistics.median(times)
        lines.append(f"| {dtype} | {bs} | {statistics.median(prefill[(dtype, bs)]):.2f} | "
                     f"{g:.2f} | {bs * NEW_TOKENS / g:.1f} |")
    for bs in (8, 16):
        ratio = statistics.median(results[("float32", bs)]) / \
            statistics.median(results[("bfloat16", bs)])
        lines.append(f"\nBatch {bs}: bfloat16 generates {ratio:.2f}x as fast as float32.")
    write("generation.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
