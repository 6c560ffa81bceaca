"""In-context molecule tuning on this machine: CPU training throughput, a bounded ICMT LoRA
run of SmolLM2-135M, and the tuned model against the untuned one and the nearest-neighbour
baseline on ChEBI-20 test queries through the worker's /mol2cap.

Protocol ("ChEBI-20 val-to-test", as everywhere offline here: the ChEBI-20 train split is not
available): the ChEBI-20 validation split is the retrieval database and the source of the
training set; the test split gives the queries.

1. throughput: the same short training run (SmolLM2, LoRA r 32 on every Linear but the head,
   batches of 8 prompts, cutoff 512, 2 examples per prompt) in float32 and with bfloat16
   autocast, alternated, ``THROUGHPUT_REPEATS`` runs each; steps/s and tokens/s (non-padding).
2. tune: ICMT LoRA on the first ``TRAIN`` validation pairs, contexts from the whole validation
   split (each pair's own CID excluded), ``EPOCHS`` epochs; the settings are in the result file.
3. eval: ``QUERIES`` test molecules to /mol2cap of a worker serving SmolLM2 (untuned, then with
   the adapter) and of a worker with the nearest-neighbour engine, all retrieving 2 examples
   from the validation corpus through the same retrieval service, greedy decoding, scored with
   MolT5's caption metrics (SciBERT word pieces).

    .venv/bin/python benchmarks/bench_icmt.py [--parts throughput,tune,eval]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    REPO,
    RESULTS,
    SHARED,
    git_commit,
    machine,
    start_service,
    stop_services,
    write,
)

CORPUS = "chebi20-validation"
TRAIN = 500
EPOCHS = 2
QUERIES = 200
MAX_NEW_TOKENS = 192
CONCURRENCY = 8
THROUGHPUT_STEPS = 6
THROUGHPUT_REPEATS = 2
ADAPTER = "smollm2-icmt-chebi500"
RETRIEVAL_PORT, WORKER_PORT, NN_PORT = 18101, 18100, 18102

TUNE = {"task": "mol2cap", "name": ADAPTER, "train": CORPUS, "train_limit": TRAIN,
        "n_shot": 2, "cutoff": 512, "learning_rate": 5e-4, "warmup_steps": 6,
        "epochs": EPOCHS, "batch_size": 8, "grad_accum": 2, "save_steps": 10, "seed": 42}


def data_dir() -> Path:
    """One data directory for the whole benchmark: the validation corpus stored as a named
    corpus (the retrieval service and the tuning run both read it), indexes, the adapter."""
    d = REPO / ".bench-icmt"
    (d / "corpora").mkdir(parents=True, exist_ok=True)
    target = d / "corpora" / f"{CORPUS}.tsv"
    if not target.exists():
        shutil.copyfile(SHARED / "data/chebi20/validation.txt", target)
    return d


def env_for(d: Path, **extra) -> dict:
    return {**os.environ, "ICMA_DATA_DIR": str(d), "ICMA_PROGRESS": "false",
            "ICMA_TORCH_THREADS": "2", "ICMA_LLM_DTYPE": "float32",
            "ICMA_RETRIEVAL_KINDS": '["graph"]', "ICMA_JOBS_DB": str(d / "jobs.sqlite3"),
            **extra}


# --- 1. throughput -------------------------------------------------------------------------

def throughput(d: Path) -> dict:
    from icma.core.settings import get_settings
    from icma.tuning import parse_config, tune

    os.environ.update({k: v for k, v in env_for(d).items() if k.startswith("ICMA_")})
    started = time.strftime("%Y-%m-%d %H:%M")
    runs: dict[str, list[dict]] = {"float32": [], "bfloat16": []}
    for rep in range(THROUGHPUT_REPEATS):
        order = ("float32", "bfloat16") if rep % 2 == 0 else ("bfloat16", "float32")
        for precision in order:
            name = f"throughput-{precision}-{rep}"
            shutil.rmtree(d / "adapters" / name, ignore_errors=True)
            shutil.rmtree(d / "tuning" / name, ignore_errors=True)
            cfg = parse_config({**TUNE, "name": name, "max_steps": THROUGHPUT_STEPS,
                                "grad_accum": 1, "warmup_steps": 0, "precision": precision,
                                "save_steps": 1000})
            m = tune(cfg, settings=get_settings(), data_dir=d, adapters_dir=d / "adapters")
            s = m["training"]["this_session"]
            runs[precision].append({"steps_per_s": s["steps_per_s"],
                                    "tokens_per_s": s["tokens_per_s"], "wall_s": s["wall_s"],
                                    "losses": m["training"]["losses"]})
            print(f"{precision}: {s['tokens_per_s']:.0f} tokens/s, "
                  f"{s['steps_per_s']:.3f} steps/s", flush=True)
            shutil.rmtree(d / "adapters" / name, ignore_errors=True)
            shutil.rmtree(d / "tuning" / name, ignore_errors=True)
    return {"runs": runs, "steps": THROUGHPUT_STEPS, "batch": TUNE["batch_size"],
            "started": started}


# --- 2. tune -------------------------------------------------------------------------------

def run_tune(d: Path, precision: str) -> dict:
    shutil.rmtree(d / "adapters" / ADAPTER, ignore_errors=True)
    cmd = [sys.executable, "-m", "icma", "tune", "--json", "--data-dir", str(d),
           "--adapters-dir", str(d / "adapters")]
    cfg = {**TUNE, "precision": precision}
    cfg_file = d / "icmt-bench.json"
    cfg_file.write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    out = subprocess.run(cmd + ["--config", str(cfg_file)], env=env_for(d), cwd=REPO,
                         stdout=subprocess.PIPE, text=True, check=True)
    manifest = json.loads(out.stdout)
    manifest["wall_clock_s"] = time.perf_counter() - t0
    return manifest


# --- 3. eval -------------------------------------------------------------------------------



def ask(url: str, test, adapter: str | None) -> dict:
    def one(rec):
        body = {"smiles": rec.smiles, "retrieval": {"corpus": CORPUS},
                "generation": {"decoding": "greedy", "max_new_tokens": MAX_NEW_TOKENS}}
        if adapter:
            body["adapter"] = adapter
        r = httpx.post(url + "/mol2cap", json=body, timeout=3600)
        r.raise_for_status()
        return r.json()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        answers = list(pool.map(one, test))
    return {"wall_s": time.perf_counter() - t0, "answers": answers}


def evaluate_systems(d: Path) -> dict:
    from icma.core.corpus import read_corpus
    from icma.core.settings import get_settings
    from icma.evaluation.metrics import evaluate

    started = time.strftime("%Y-%m-%d %H:%M")
    test, _ = read_corpus(SHARED / "data/chebi20/test.txt")
    test = test.records[:QUERIES]
    refs = [r.description for r in test]
    retrieval = f"http://127.0.0.1:{RETRIEVAL_PORT}"
    worker, nn = f"http://127.0.0.1:{WORKER_PORT}", f"http://127.0.0.1:{NN_PORT}"
    env = env_for(d, ICMA_ADAPTERS_DIR=str(d / "adapters"))
    procs = [start_service(["retrieval", "--port", str(RETRIEVAL_PORT)], retrieval, env,
                           timeout=1800)]
    out = {}
    try:
        procs.append(start_service(["worker", "--port", str(NN_PORT), "--retrieval-url",
                                    retrieval, "--engine", "nearest-neighbour"], nn,
                                   {**env, "ICMA_JOBS_DB": str(d / "jobs-nn.sqlite3")}))
        procs.append(start_service(["worker", "--port", str(WORKER_PORT), "--retrieval-url",
                                    retrieval], worker, env, timeout=1800))
        for name, url, adapter in (("nearest-neighbour", nn, None),
                                   ("SmolLM2, untuned", worker, None),
                                   ("SmolLM2 + ICMT LoRA", worker, ADAPTER)):
            got = ask(url, test, adapter)
            preds = [a["caption"] for a in got["answers"]]
            out[name] = {
                "metrics": evaluate("mol2cap", preds, refs, data_dir=get_settings().data_dir),
                "wall_s": got["wall_s"],
                "completion_tokens": statistics.median(a["usage"]["completion_tokens"]
                                                       for a in got["answers"]),
                "hit_length_limit": sum(a["finish_reason"] == "length" for a in got["answers"]),
                "empty": sum(not p.strip() for p in preds),
                "samples": [{"cid": r.cid, "reference": r.description, "prediction": p}
                            for r, p in zip(test[:3], preds[:3])]}
            print(name, {k: round(v, 3) for k, v in out[name]["metrics"].items()
                         if isinstance(v, float)}, flush=True)
    finally:
        stop_services(procs, timeout=60)
    return {"systems": out, "queries": len(test), "started": started}


# --- report --------------------------------------------------------------------------------

def report(res: dict) -> str:
    import torch

    lines = ["# In-context molecule tuning (ICMT) on this machine", "",
             f"On {machine()}, torch {torch.__version__}, commit {git_commit()}. Produced by "
             "`benchmarks/bench_icmt.py`. Protocol: **ChEBI-20 val-to-test** (the validation "
             "split is the retrieval database and the training source, the test split the "
             "queries; the paper trained on the 26k train split, not available here).", ""]
    tp = res.get("throughput")
    if tp:
        lines += ["## Training throughput (CPU)", "",
                  f"SmolLM2-135M-Instruct, LoRA r 32 / alpha 64 on every Linear layer but the "
                  f"head, {tp['batch']} prompts per step (2 retrieved examples each, cutoff 512 "
                  f"tokens), loss on the answers only; {tp['steps']} steps per run, "
                  f"{len(tp['runs']['float32'])} runs per precision, alternated. Run "
                  f"{tp['started']}.", "",
                  "| precision | tokens/s (median) | steps/s (median) | runs (tokens/s) |",
                  "| --- | ---: | ---: | --- |"]
        med = {}
        for p, runs in tp["runs"].items():
            med[p] = statistics.median(r["tokens_per_s"] for r in runs)
            lines.append(f"| {p} | {med[p]:.0f} | "
                         f"{statistics.median(r['steps_per_s'] for r in runs):.3f} | "
                         f"{', '.join(format(r['tokens_per_s'], '.0f') for r in runs)} |")
        lines += ["", f"bfloat16 autocast / float32: **{med['bfloat16'] / med['float32']:.2f}x** "
                      "tokens per second (float32 master weights either way).", ""]
    t = res.get("tune")
    if t:
        tr, data = t["training"], t["data"]
        hp = t["hyperparameters"]
        lines += ["## The tuning run", "",
                  f"`icma tune` with {json.dumps({k: hp[k] for k in TUNE if k in hp})} and "
                  f"precision {tr['precision']}; everything else ICMA's defaults (LoRA r "
                  f"{hp['lora_r']}, alpha {hp['lora_alpha']}, dropout {hp['lora_dropout']}, "
                  f"AdamW, linear schedule, loss on the answer only, answer priming on).", "",
                  f"- training set: {data['examples']} examples ({data['skipped']} skipped), "
                  f"{data['tokens']:,} tokens of which {data['loss_tokens']:,} carry the loss; "
                  f"median {data['median_tokens']} tokens, longest {data['max_tokens']}; "
                  f"{data['mean_examples_in_prompt']:.2f} examples per prompt "
                  f"({data['examples_dropped']} dropped to fit the cutoff)",
                  f"- {tr['steps']} optimiser steps ({tr['epochs']} epochs), loss "
                  f"{tr['first_loss']:.3f} -> {tr['final_loss']:.3f}, "
                  f"{tr['wall_s'] / 60:.1f} min of training "
                  f"({tr['tokens'] / tr['wall_s']:.0f} tokens/s over the run), "
                  f"{tr['parameters']['trainable']:,} trainable parameters of "
                  f"{tr['parameters']['total']:,}", ""]
    e = res.get("eval")
    if e:
        rows = [("BLEU-2", "bleu2"), ("BLEU-4", "bleu4"), ("ROUGE-1", "rouge1"),
                ("ROUGE-2", "rouge2"), ("ROUGE-L", "rougeL"), ("METEOR", "meteor")]
        lines += ["## Tuned against untuned and nearest-neighbour", "",
                  f"The first {e['queries']} ChEBI-20 test molecules to `/mol2cap` (2 examples "
                  f"by graph retrieval from the validation corpus through the retrieval "
                  f"service), greedy decoding, at most {MAX_NEW_TOKENS} new tokens, "
                  f"{CONCURRENCY} requests in flight. MolT5's metrics on SciBERT word pieces. "
                  f"Run {e['started']}.", "",
                  "| system | " + " | ".join(r[0] for r in rows) +
                  " | median new tokens | stopped by the length limit | wall s |",
                  "| --- | " + " | ".join("---:" for _ in rows) + " | ---: | ---: | ---: |"]
        for name, s in e["systems"].items():
            m = s["metrics"]
            lines.append(f"| {name} | " + " | ".join(f"{m[k]:.3f}" for _, k in rows) +
                         f" | {s['completion_tokens']:.0f} | {s['hit_length_limit']} | "
                         f"{s['wall_s']:.0f} |")
        best = max(e["systems"], key=lambda n: e["systems"][n]["metrics"]["meteor"])
        lines += ["", f"Best METEOR: **{best}**.", "", "Three predictions of each system:", ""]
        for name, s in e["systems"].items():
            for x in s["samples"][:1]:
                lines.append(f"- {name}, CID {x['cid']}: {x['prediction'][:300]!r}")
        lines.append(f"- reference: {e['systems'][best]['samples'][0]['reference'][:300]!r}")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    if res.get("tune"):
        losses = res["tune"]["training"]["losses"]
        axes[0].plot(range(1, len(losses) + 1), losses)
        axes[0].set_xlabel("optimiser step")
        axes[0].set_ylabel("loss (answer tokens)")
        axes[0].set_title("ICMT LoRA, SmolLM2-135M, 500 ChEBI-20 val pairs", fontsize=9)
    if res.get("eval"):
        keys = ["bleu2", "bleu4", "rougeL", "meteor"]
        systems = list(res["eval"]["systems"])
        w = 0.8 / len(systems)
        for i, name in enumerate(systems):
            m = res["eval"]["systems"][name]["metrics"]
            axes[1].bar([k + i * w for k in range(len(keys))], [m[k] for k in keys], w,
                        label=name)
        axes[1].set_xticks([k + w for k in range(len(keys))], keys)
        axes[1].legend(fontsize=7)
        axes[1].set_title(f"{res['eval']['queries']} ChEBI-20 test queries via /mol2cap",
                          fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="throughput,tune,eval",
                    help="what to run; a part left out keeps its figures from icmt.json")
    ap.add_argument("--precision", default="float32",
                    help="precision of the tuning run (float32 | bfloat16)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    d = data_dir()
    res_file = RESULTS / "icmt.json"
    res = json.loads(res_file.read_text()) if res_file.exists() else {}
    if "throughput" in parts:
        res["throughput"] = throughput(d)
        res_file.write_text(json.dumps(res, indent=1))
    if "tune" in parts:
        res["tune"] = run_tune(d, args.precision)
        res_file.write_text(json.dumps(res, indent=1))
    if "eval" in parts:
        res["eval"] = evaluate_systems(d)
        res_file.write_text(json.dumps(res, indent=1))
    write("icmt.md", report(res))
    plot(res, RESULTS / "icmt.png")


if __name__ == "__main__":
    main()
