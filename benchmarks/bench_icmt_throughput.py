"""ICMT training throughput on this CPU: tokens/s and model-FLOPs utilisation (MFU) of the
training loop, the loop as it was against each speed-up and all of them together.

Protocol: the ChEBI-20 validation split is both the training set and the context corpus (each
pair's own CID excluded), exactly as ``icma tune`` builds it (``build_training_set``: graph
retrieval, 2 examples per prompt, cutoff 512, answer priming, loss on the answer only), so the
lengths and the padding are real. Each run is ``icma.tuning.loop.train`` for ``STEPS``
optimiser steps of 8 prompts (no accumulation) with bfloat16 autocast and LoRA r 32 / alpha 64 /
dropout 0.1 on every Linear but the head (SmolLM2-135M-Instruct), from a freshly loaded model.
The configurations run alternated (their order rotates each round), ``REPEATS`` rounds, each
round with its own seed (the same seed for every configuration of the round); the table gives
the median. tokens/s counts non-padding tokens.

Peak: the best of ``PEAK_REPEATS`` ``torch.matmul`` of two ``PEAK_N`` x ``PEAK_N`` matrices in
each precision, measured in the same run (torch's threads: ``THREADS``).

Model FLOPs of a step (T: an example's real tokens, A: its answer tokens, the only positions the
head runs on; N: the parameters of the frozen Linear layers, R: of the LoRA matrices; d the
hidden size, V the vocabulary, L the layers):

    linear  4 N T     forward 2NT + input gradients 2NT (frozen: no weight gradients)
    LoRA    6 R T     forward, input and weight gradients
    attn    6 L d T^2 causal (half of the T x T scores): QK^T and AV forward 2 L d T^2,
                      backward twice that
    head    4 V d A   forward + input gradients (frozen, tied to the embedding)

MFU = model FLOPs / step time / bf16 peak. Padding, the dropout masks, norms, casts and the
optimiser are work outside the count: they lower MFU.

    .venv/bin/python benchmarks/bench_icmt_throughput.py [--steps 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_icmt import CORPUS, data_dir  # noqa: E402  (the converted model, index)
from benchmarks.common import RESULTS, git_commit, machine, write  # noqa: E402

STEPS = 6
REPEATS = 3
THREADS = 2
PEAK_N = 2048
PEAK_REPEATS = 8
TUNE = {"task": "mol2cap", "name": "throughput", "n_shot": 2, "cutoff": 512,
        "batch_size": 8, "grad_accum": 1, "warmup_steps": 0, "save_steps": 100000,
        "precision": "bfloat16", "learning_rate": 2e-4}

#: name -> (what it is, the loop's speed-ups on). ``nodrop`` is not a speed-up of the same
#: computation but a recipe change (LoRA dropout 0; ICMA's is 0.1), measured beside them because
#: the mask is still a large share of a step; whether it costs quality is the recipe
#: benchmark's question (``bench_icmt_recipe.py``, arm ``nodrop``).
CONFIGS = {
    "before": ("the loop before issue 14: float32 frozen weights autocast in every pass, "
               "torch's dropout, plain shuffled batches, the padding mask", set()),
    "bf16 frozen weights": ("frozen Linear weights and the head stored in bfloat16 once",
                            {"frozen"}),
    "fast dropout": ("LoRA dropout masks from 15-bit integers, one draw each", {"dropout"}),
    "length grouping": ("micro-batches grouped by length", {"group"}),
    "causal attention": ("no attention mask under right padding: SDPA's causal kernel",
                         {"causal"}),
    "three (stop 21)": ("bf16 frozen weights, fast dropout, length grouping",
                        {"frozen", "dropout", "group"}),
    "all (default)": ("the three, causal attention, and the dropout masks drawn 4 per 64-bit "
                      "word: `icma tune`'s default now",
                      {"frozen", "dropout", "group", "causal", "lanes"}),
    "all without LoRA dropout": ("the default with lora_dropout 0 (a recipe change, not the same "
                             "computation)", {"frozen", "dropout", "group", "causal", "lanes",
                                              "nodrop"}),
}


def peak_gflops() -> dict:
    import torch

    out = {}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        a = torch.randn(PEAK_N, PEAK_N).to(dtype)
        b = torch.randn(PEAK_N, PEAK_N).to(dtype)
        torch.matmul(a, b)
        times = []
        for _ in range(PEAK_REPEATS):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - t0)
        flops = 2 * PEAK_N ** 3
        out[name] = {"best": flops / min(times) / 1e9,
                     "median": flops / statistics.median(times) / 1e9}
        print(f"peak {name}: {out[name]['best']:.0f} GFLOP/s", flush=True)
    return out


def training_set(d: Path, tokenizer):
    from icma.core.settings import Settings
    from icma.retrieval import ExclusionRule
    from icma.retrieval.cache import cached_index
    from icma.tuning.data import Tokens, build_training_set
    from icma.retrieval.store import open_corpus

    corpus = open_corpus(CORPUS, d, "train")
    index = cached_index("graph", corpus, d, settings=Settings(data_dir=d,
                                                               torch_threads=THREADS))
    return build_training_set("mol2cap", corpus.records, index, Tokens(tokenizer, "</s>"),
                              n_shot=TUNE["n_shot"], cutoff=TUNE["cutoff"], prime_answer=True,
                              rule=ExclusionRule(self_cid=True))


def shape(net) -> dict:
    """The counts of the FLOPs formula (see the module's docstring)."""
    import torch

    base = net.get_base_model()
    head = base.get_output_embeddings()
    frozen = lora = 0
    for name, p in net.named_parameters():
        if "lora_" in name:
            lora += p.numel()
    for module in base.modules():
        if isinstance(module, torch.nn.Linear) and module is not head \
                and not module.weight.requires_grad:
            frozen += module.weight.numel()
    c = base.config
    return {"frozen_linear": frozen, "lora": lora, "layers": c.num_hidden_layers,
            "hidden": c.hidden_size, "vocab": c.vocab_size,
            "attn_width": c.num_attention_heads * (getattr(c, "head_dim", None)
                                                  or c.hidden_size // c.num_attention_heads)}


def step_flops(s: dict, batches: list[list]) -> float:
    from icma.tuning.data import IGNORE

    total = 0.0
    for batch in batches:
        for e in batch:
            t = len(e.input_ids)
            a = sum(1 for x in e.labels[1:] if x != IGNORE)
            total += (4 * s["frozen_linear"] * t + 6 * s["lora"] * t
                      + 6 * s["layers"] * s["attn_width"] * t * t
                      + 4 * s["vocab"] * s["hidden"] * a)
    return total


def as_before(net, speedups: set) -> None:
    """Undo the speed-ups not in ``speedups`` on a model ``load_model`` prepared."""
    import torch

    from icma.tuning.model import store_frozen_in

    if "frozen" not in speedups:
        store_frozen_in(net, "float32")
    if "dropout" not in speedups:
        for module in net.modules():
            drops = getattr(module, "lora_dropout", None)
            if isinstance(drops, torch.nn.ModuleDict):
                for key, drop in drops.items():
                    if drop.p > 0:
                        drops[key] = torch.nn.Dropout(drop.p)


def masked_loss_sum(net, enc: dict, head_split):
    """The loop's loss as it was before causal attention: the padding mask passed, so SDPA
    takes its masked kernel."""
    import torch.nn.functional as F

    from icma.tuning.loop import IGNORE

    labels = enc["labels"][:, 1:]
    keep = labels != IGNORE
    decoder, head = head_split
    hidden = decoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                     position_ids=enc["position_ids"]).last_hidden_state[:, :-1]
    return F.cross_entropy(head(hidden[keep]).float(), labels[keep], reduction="sum")


def one_draw_per_element(x):
    """The dropout mask's integers as they were drawn before the 64-bit lanes."""
    import torch

    return torch.empty(x.shape, dtype=torch.int16, device=x.device).random_(0, 32768)


def one_run(d: Path, model_path: str, data, pad_id: int, name: str, speedups: set,
            seed: int) -> dict:
    import torch

    from icma.tuning import loop, model
    from icma.tuning.config import parse_config
    from icma.tuning.model import load_model

    cfg = parse_config({**TUNE, "max_steps": STEPS, "seed": seed,
                        "group_by_length": "group" in speedups,
                        **({"lora_dropout": 0.0} if "nodrop" in speedups else {})})
    torch.manual_seed(seed)
    net = load_model(cfg, model_path, "cpu", "bfloat16")
    as_before(net, speedups)
    run_dir = d / "tuning" / ".throughput"
    shutil.rmtree(run_dir, ignore_errors=True)
    split, loss_sum, draw = loop._head_split, loop._loss_sum, model._uniform15
    if "frozen" not in speedups:  # the head cast by autocast in every pass, as before
        loop._head_split = lambda net, dtype=None: split(net)
    if "causal" not in speedups:
        loop._loss_sum = masked_loss_sum
    if "lanes" not in speedups:
        model._uniform15 = one_draw_per_element
    try:
        res = loop.train(net, data.examples, cfg, run_dir, device="cpu", precision="bfloat16",
                         pad_id=pad_id, fingerprint={})
    finally:
        loop._head_split, loop._loss_sum, model._uniform15 = split, loss_sum, draw
        shutil.rmtree(run_dir, ignore_errors=True)
    sched = loop.Schedule.plan(len(data.examples), cfg, [len(e.input_ids) for e in data.examples])
    batches = [[data.examples[i] for i in b] for s in range(STEPS)
               for b in sched.micro_batches(s, seed)]
    padded = sum(len(b) * max(len(e.input_ids) for e in b) for b in batches)
    s = res.session
    return {"config": name, "seed": seed, "tokens": s["tokens"], "padded_tokens": padded,
            "wall_s": s["wall_s"], "tokens_per_s": s["tokens_per_s"],
            "steps_per_s": s["steps_per_s"], "flops": step_flops(shape(net), batches),
            "losses": res.losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--repeats", type=int, default=REPEATS)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    args = ap.parse_args()
    globals()["STEPS"] = args.steps
    import torch

    from icma.core.settings import Settings
    from icma.generation.models import DEFAULT_LLM, resolve_model
    from icma.tuning.model import load_tokenizer

    torch.set_num_threads(THREADS)
    started = time.strftime("%Y-%m-%d %H:%M")
    d = data_dir()
    model_path = resolve_model(DEFAULT_LLM, Settings(data_dir=d).data_dir)
    tokenizer = load_tokenizer(model_path, DEFAULT_LLM)
    data = training_set(d, tokenizer)
    print("training set", data.stats(), flush=True)
    names = args.configs.split(",")
    peaks = [peak_gflops()]
    runs = []
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            r = one_run(d, model_path, data, tokenizer.pad_token_id, name, CONFIGS[name][1],
                        seed=rep)
            runs.append(r)
            print(f"round {rep} {name}: {r['tokens_per_s']:.0f} tokens/s, "
                  f"{r['flops'] / r['wall_s'] / 1e9:.1f} GFLOP/s", flush=True)
        peaks.append(peak_gflops())  # the machine may be busier at one time than another
        save({"started": started, "steps": args.steps, "repeats": rep + 1,
              "threads": THREADS, "peaks": peaks, "runs": runs, "stats": data.stats(),
              "configs": names, "machine": machine(), "commit": git_commit(),
              "torch": torch.__version__})  # after every round: a cut run keeps its rounds


def save(res: dict) -> None:
    (RESULTS / "icmt_throughput.json").write_text(json.dumps(res, indent=1) + "\n")
    write("icmt_throughput.md", report(res))
    plot(res)


def summary(res: dict) -> dict:
    peak = statistics.median(p["bfloat16"]["best"] for p in res["peaks"])
    out = {}
    for name in res["configs"]:
        rs = [r for r in res["runs"] if r["config"] == name]
        out[name] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
            "runs": [r["tokens_per_s"] for r in rs],
            "gflops": statistics.median(r["flops"] / r["wall_s"] / 1e9 for r in rs),
            "padding": sum(r["padded_tokens"] - r["tokens"] for r in rs)
            / sum(r["padded_tokens"] for r in rs)}
        out[name]["mfu"] = out[name]["gflops"] / peak
    base = out[res["configs"][0]]["tokens_per_s"]
    for v in out.values():
        v["ratio"] = v["tokens_per_s"] / base
    return out


def report(res: dict) -> str:
    peaks = res["peaks"]
    bf = [p["bfloat16"]["best"] for p in peaks]
    fp = [p["float32"]["best"] for p in peaks]
    s = summary(res)
    st = res["stats"]
    lines = [
        "# ICMT training throughput and model-FLOPs utilisation (CPU)", "",
        f"On {res['machine']}, torch {res['torch']} ({res['threads']} threads), commit "
        f"{res['commit']}. Produced by `benchmarks/bench_icmt_throughput.py` (protocol and the "
        f"FLOPs formula in its docstring). Run {res['started']}.", "",
        "Setting: SmolLM2-135M-Instruct, LoRA r 32 / alpha 64 / dropout 0.1 (unless the row "
        "says otherwise) on every Linear but the head, bfloat16 autocast, 8 prompts per step (no accumulation), loss on the answers "
        f"only; the whole ChEBI-20 validation split as `icma tune` builds it (graph retrieval, "
        f"2 examples, cutoff 512): {st['examples']:,} examples, median {st['median_tokens']} "
        f"tokens, longest {st['max_tokens']}. {res['steps']} steps per run, "
        f"{res['repeats']} runs per configuration, alternated (each round one seed for all).", "",
        f"Matrix-multiply peak (`torch.matmul`, {PEAK_N} x {PEAK_N}, best of {PEAK_REPEATS}, "
        f"measured before and after every round): bfloat16 **{statistics.median(bf):.0f} "
        f"GFLOP/s** (range {min(bf):.0f}-{max(bf):.0f}), float32 "
        f"**{statistics.median(fp):.0f} GFLOP/s** (range {min(fp):.0f}-{max(fp):.0f}). "
        "MFU is against the median bfloat16 peak.", "",
        "| configuration | what | tokens/s (median) | runs | model GFLOP/s | MFU | padding | "
        "vs before |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for name in res["configs"]:
        v = s[name]
        lines.append(f"| {name} | {CONFIGS[name][0]} | {v['tokens_per_s']:.0f} | "
                     f"{', '.join(f'{x:.0f}' for x in v['runs'])} | {v['gflops']:.1f} | "
                     f"{100 * v['mfu']:.1f}% | {100 * v['padding']:.0f}% | "
                     f"**{v['ratio']:.2f}x** |")
    lines += ["", "Padding: share of the tokens in the micro-batches' tensors that are padding "
              "(the same batches for every configuration without grouping)."]
    return "\n".join(lines) + "\n"


def plot(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary(res)
    names = res["configs"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh(names, [s[n]["tokens_per_s"] for n in names], color="tab:blue")
    for i, n in enumerate(names):
        ax.text(s[n]["tokens_per_s"], i, f" {s[n]['tokens_per_s']:.0f} ({s[n]['ratio']:.2f}x, "
                f"MFU {100 * s[n]['mfu']:.1f}%)", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s (median, non-padding)")
    ax.set_title("ICMT LoRA training on this CPU, bfloat16 autocast", fontsize=10)
    ax.set_xlim(0, max(s[n]["tokens_per_s"] for n in names) * 1.5)
    fig.tight_layout()
    fig.savefig(RESULTS / "icmt_throughput.png", dpi=120)
    print("wrote", RESULTS / "icmt_throughput.png")


if __name__ == "__main__":
    main()
