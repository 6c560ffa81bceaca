"""The ICMT recipe, found by experiment on a dev slice of the ChEBI-20 validation split.

Protocol: the validation split (3,301 pairs) is cut, by a seeded shuffle, into ``val-train``
(training records and the retrieval database of their contexts, each record's own CID excluded,
as serving excludes the query) and ``val-dev`` (``DEV`` pairs, never trained on: the queries that
choose the recipe). The test split is never looked at here; it measures the shipped default once
the recipe is chosen (``bench_quality`` / the full-test-split evaluation).

Each *arm* is one tuning recipe (``ARMS``: ICMA's defaults, and one change each: learning rate,
full fine-tuning, Morgan examples, loss on the whole text, no examples (naive SFT), no sequence
reversal). An arm trains with ``icma tune`` (checkpoints every ``--every`` optimiser steps, all
kept; an interrupted arm resumes where it stopped), then every checkpoint at a multiple of
``--every`` (and the last) is exported as an adapter and the first ``--dev`` dev queries are
translated through the serving path (greedy, ``MAX_NEW_TOKENS``) and scored with MolT5's metrics: dev metrics against steps, the learning
curve. The nearest-neighbour baseline (the best retrieved example's answer) is scored on the
same queries. Runs and checkpoints are kept in ``.bench-icmt-recipe/`` and resume: run the same
command again after an interruption (a session ends, a machine reboots) and it goes on. The
scores are kept beside the report, in ``benchmarks/results/icmt_recipe_<task>.json``, and
committed as they come: a fresh checkout (whose ``.bench-icmt-recipe/`` is empty) keeps every
arm scored so far and trains only what is missing.

    .venv/bin/python benchmarks/bench_icmt_recipe.py --task mol2cap --arms icma,lr1e-3 \\
        [--dev 200] [--every 50] [--epochs 2] [--precision float32] [--report-only]

Results: ``benchmarks/results/icmt_recipe_<task>.md`` and ``.png``.

Decodings (``--decode LABEL [--decodings sample,consensus] [--num-samples 8]``): arm LABEL's
dev-best checkpoint (the one ``--ship`` ships) decoded with ICMA's sampling and with consensus
on the same dev queries as its greedy curve point, beside the nearest neighbour. Which decoding
a shipped default is served with is chosen here, by the mean of the task's ``HEADLINE``
metrics (rule fixed 2026-11-29, before any decoding but greedy was scored); the test split
then measures all three.

How the recipe is chosen (fixed before any arm was scored, 2026-11-27): at the last checkpoint
of the small-scale comparisons, each arm's mean difference from ``icma`` over the task's
``HEADLINE`` metrics; the recipe is the single arm with the largest mean difference, if it is
above +0.005, else ICMA's; between arms within 0.005 of each other the cheaper one per step
wins (``nodrop`` over ``icma``). ``naive-sft`` and ``ranked`` are the paper's ablations, not
candidates. cap2mol runs ``icma``, the ablations and mol2cap's winning change.

Chosen 2026-11-29, when the last candidate (``inputs``) was scored: mol2cap's recipe is
``lr1e-3`` (mean +0.013 over the bfloat16 reference), ahead of ``morgan`` (+0.010 over the
float32 one: within 0.005 of it, but no cheaper per step, so the larger difference decides),
``full`` (-0.002), ``nodrop`` (-0.002) and ``inputs`` (-0.028).

Precision (added 2026-11-28, before any float32 arm was scored): the first arms trained and
decoded in bfloat16 autocast on a CPU with AMX. On a CPU without bfloat16 hardware torch's
bfloat16 matmul is ~90x slower than float32 (``matmul_amd-epyc.md``), so arms run there in
float32 (``--precision float32``, run names ending ``-fp32``). An arm is only ever compared with
ICMA's recipe trained and decoded in the same precision at the same steps (``icma-s40-fp32``
is the float32 reference), and the selection rule above reads each arm's difference from that
reference. Float32 points decode with prompt-lookup speculation, bfloat16 points without it
(``SPECULATION_CHECK``: in float32 it changed none of the reference's 100 answers).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, SHARED, git_commit, machine, write  # noqa: E402

DEFAULT_WORK = WORK = REPO / ".bench-icmt-recipe"
#: Why float32 dev points decode with prompt-lookup speculation (measured 2026-11-29, AMD EPYC):
#: ``icma-s40-fp32`` step 40 decoded again with ``speculative_tokens`` 16 gave the same
#: prediction for all 100 dev queries as without it, hence the same metrics.
SPECULATION_CHECK = {"run": "mol2cap-icma-s40-fp32", "step": 40, "queries": 100,
                     "same_predictions": 100}
DEV = 300  # pairs held out of the validation split (the first --dev of them are scored)
SPLIT_SEED = 20261127
MAX_NEW_TOKENS = 160
#: ICMA's recipe (icma-method.md section 4) as this machine can afford it: LoRA r 32 / alpha 64
#: on every Linear but the head, AdamW 2e-4, effective batch 32, loss on the answer only, the
#: task's ICMA examples (2 graph / 4 BM25), reversed order, cutoff 2048 (keeps 3,288 / 3,223 of
#: 3,301 examples: icmt_lengths.md), bf16 autocast (float32 on CPUs without bf16 hardware). The comparisons run at small scale, the
#: same steps for every arm (``--steps`` of ``SMALL`` prompts each): on two cores ICMA's
#: effective batch of 32 for an epoch of val-train is hours per arm. Micro-batches of 2: what a
#: step keeps for its backward pass is about 1.2 MB per token on SmolLM2 with LoRA (30 layers of
#: activations, dropped LoRA inputs and masks), and 4 prompts of up to 2,000 tokens (13.6 GB)
#: were killed for memory beside other work on this 24 GB machine.
BASE = {"lora_r": 32, "lora_alpha": 64, "learning_rate": 2e-4, "batch_size": 2,
        "grad_accum": 16, "cutoff": 2048, "seed": 42}
PRECISION = "bfloat16"  # of the arms this run trains and scores (--precision)
SMALL = {"grad_accum": 8}  # effective batch 16 for the small-scale comparisons
ARMS = {
    "icma": {},
    "lr1e-3": {"learning_rate": 1e-3},
    "lr5e-4": {"learning_rate": 5e-4},
    "full": {"method": "full", "learning_rate": 5e-5},
    "morgan": {"retrieval": "morgan"},  # mol2cap only
    "inputs": {"train_on_inputs": True},
    "naive-sft": {"n_shot": 0},
    "ranked": {"order": "ranked"},  # sequence reversal off: the best example first
    "nodrop": {"lora_dropout": 0.0},  # LoRA without dropout (ICMA: 0.1): icmt_throughput.md
}
METRICS = {"mol2cap": ["bleu2", "bleu4", "rouge1", "rouge2", "rougeL", "meteor"],
           "cap2mol": ["bleu", "exact_match", "levenshtein", "validity", "maccs_fts",
                       "rdk_fts", "morgan_fts"]}
HEADLINE = {"mol2cap": ["bleu4", "rougeL", "meteor"],
            "cap2mol": ["exact_match", "validity", "maccs_fts"]}


# --- data ----------------------------------------------------------------------------------------

def prepare() -> None:
    """``corpora/val-train.tsv`` and ``corpora/val-dev.tsv`` from the validation split."""
    folder = WORK / "corpora"
    if (folder / "val-dev.tsv").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    lines = (SHARED / "data/chebi20/validation.txt").read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], [r for r in lines[1:] if r.strip()]
    order = list(range(len(rows)))
    random.Random(SPLIT_SEED).shuffle(order)
    dev = sorted(order[:DEV])
    keep = set(dev)
    for name, idx in (("val-dev", dev), ("val-train", [i for i in range(len(rows))
                                                        if i not in keep])):
        text = "\n".join([header] + [rows[i] for i in idx]) + "\n"
        (folder / f".{name}.tmp").write_text(text, encoding="utf-8")
        (folder / f".{name}.tmp").rename(folder / f"{name}.tsv")


def env() -> dict:
    return {**os.environ, "ICMA_DATA_DIR": str(WORK), "ICMA_PROGRESS": "false",
            "ICMA_ADAPTERS_DIR": str(WORK / "adapters"), "ICMA_LLM_DTYPE": PRECISION}


def run_name(task: str, arm: str, steps: int | None = None) -> str:
    """``mol2cap-icma``; a small-scale comparison run ``mol2cap-icma-s40``; in float32
    ``mol2cap-icma-s40-fp32``."""
    return (f"{task}-{arm}" + (f"-s{steps}" if steps else "")
            + ("-fp32" if PRECISION == "float32" else ""))


def options(task: str, arm: str, epochs: float, every: int, steps: int | None = None) -> dict:
    """The arm's ``icma tune`` config: ``steps`` set, the small-scale comparison (``SMALL``
    batches, that many optimiser steps); else ``epochs`` of ICMA's batches."""
    length = {**SMALL, "max_steps": steps} if steps else {"epochs": epochs}
    return {"task": task, "name": run_name(task, arm, steps), "train": "val-train", **BASE,
            "precision": PRECISION, **ARMS[arm], **length, "save_steps": every, "keep_checkpoints": 1000}


# --- training ------------------------------------------------------------------------------------

def train(task: str, arm: str, epochs: float, every: int, steps: int | None) -> None:
    """``icma tune`` for the arm (resumes from its last checkpoint); done once the adapter is
    registered."""
    name = run_name(task, arm, steps)
    if (WORK / "adapters" / name).exists() or (WORK / "models" / name).exists():
        return
    config = WORK / "configs" / f"{name}.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(options(task, arm, epochs, every, steps), indent=2))
    print(f"[{time.strftime('%H:%M:%S')}] training {name}", flush=True)
    subprocess.run([sys.executable, "-m", "icma", "tune", "--config", str(config)],
                   cwd=REPO, env=env(), check=True)


# --- evaluation of checkpoints -------------------------------------------------------------------

def checkpoints(name: str) -> list[Path]:
    root = WORK / "tuning" / name / "checkpoints"
    return sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())


def to_score(ckpts: list[Path], every: int, done: set[int]) -> list[Path]:
    """The checkpoints that are curve points not scored yet: steps at a multiple of ``every``
    and the run's last step. A checkpoint an interruption saved between them is a resume
    point, not a curve point: scoring it would cost a dev decoding at a step no arm shares."""
    out = []
    for ckpt in ckpts:
        step = int(ckpt.name.split("-")[1])
        last = json.loads((ckpt / "state.json").read_text()).get("total_steps")
        if step not in done and (step % every == 0 or step == last):
            out.append(ckpt)
    return out


def evaluate_checkpoint(name: str, ckpt: Path, n: int, decoding: str = "greedy",
                        num_samples: int | None = None) -> dict:
    """The checkpoint as an adapter (or model), served on the first ``n`` dev queries with
    ``decoding`` (greedy: the curve points; sample and consensus of ``num_samples``:
    ``--decodings``)."""
    import torch

    from icma.core.settings import Settings
    from icma.generation.models import resolve_model
    from icma.retrieval.cache import cached_index
    from icma.retrieval.store import open_corpus
    from icma.tuning import parse_config
    from icma.tuning.model import load_model, trainable
    from icma.tuning.run import evaluate_adapter

    cfg = parse_config({**json.loads((WORK / "configs" / f"{name}.json").read_text()),
                        "eval": "val-dev", "eval_limit": n, "eval_decoding": decoding,
                        "eval_num_samples": num_samples, "eval_max_new_tokens": MAX_NEW_TOKENS})
    # Speculation off in bfloat16: the arms were first scored without it, and in bfloat16 a
    # pass over several positions rounds differently now and then. In float32 it is on: the
    # float32 reference's step-40 checkpoint, rescored with it, gave the same 100 answers
    # (SPECULATION_CHECK), and a dev point costs 18 minutes without it on the AMD EPYC.
    settings = Settings(data_dir=WORK, llm_dtype=cfg.precision, progress=False,
                        **({"speculative_tokens": 0} if cfg.precision == "bfloat16" else {}))
    base = resolve_model(cfg.base_model, WORK)
    out = WORK / "exported" / name / ckpt.name
    if not out.exists():
        net = load_model(cfg, base, "cpu", "float32")
        weights = torch.load(ckpt / "trainable.pt", weights_only=True)
        with torch.no_grad():
            for k, v in trainable(net).items():
                v.copy_(weights[k])
        tmp = out.with_name(out.name + ".tmp")
        net.save_pretrained(str(tmp))
        if cfg.method == "full":
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(base).save_pretrained(str(tmp))
        tmp.rename(out)
        del net
    contexts = open_corpus("val-train", WORK, field="train")
    index = cached_index(cfg.method_for_contexts, contexts, WORK, settings=settings)
    answers = out if decoding == "greedy" else WORK / "decoded" / name / ckpt.name / decoding
    answers.mkdir(parents=True, exist_ok=True)  # eval.jsonl: the answers, one file per decoding
    plan = SimpleNamespace(target=out, run_dir=answers)
    result = evaluate_adapter(cfg, plan, open_corpus("val-dev", WORK, field="eval"), index,
                              base, "cpu", lambda p: None, settings)
    return {"step": int(ckpt.name.split("-")[1]), "metrics": result.get("metrics"),
            "errors": result["errors"], "wall_s": result["wall_s"],
            "speculative_tokens": settings.speculative_tokens, "decoding": decoding,
            "num_samples": result.get("num_samples"), **winners(answers / "eval.jsonl")}


def winners(path: Path) -> dict:
    """Consensus decoding: how many answers were a sample and how many an example's answer
    (the top-ranked one's counted apart: there consensus returned the nearest neighbour)."""
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    picks = [x["consensus"] for x in lines if x.get("consensus")]
    if not picks:
        return {}
    return {"winners": {"sample": sum(c["source"] == "sample" for c in picks),
                        "top_example": sum(c["source"] == "example" and c["rank"] == 1
                                           for c in picks),
                        "other_example": sum(c["source"] == "example" and c["rank"] != 1
                                             for c in picks)}}


#: Other retrievals whose nearest neighbour is scored beside the default one: an arm that
#: retrieves its examples another way is read against that way's best example too (on the
#: test split Morgan's top caption beats the graph's: quality-chebi20-val-test.md).
OTHER_BASELINES = {"mol2cap": ["morgan"], "cap2mol": []}


def nearest_neighbour(task: str, n: int, method: str | None = None) -> dict:
    """The best retrieved example's answer for each dev query (the baseline to beat), by
    ``method`` (default: the task's)."""
    from icma.core.settings import Settings
    from icma.core.tasks import spec
    from icma.evaluation.metrics import evaluate
    from icma.retrieval.cache import cached_index
    from icma.retrieval.store import open_corpus
    from icma.tuning.data import answer_side

    settings = Settings(data_dir=WORK, progress=False)
    contexts = open_corpus("val-train", WORK, field="train")
    dev = open_corpus("val-dev", WORK, field="eval").records[:n]
    method = method or spec(task).default_method
    index = cached_index(method, contexts, WORK, settings=settings)
    pairs = [answer_side(task, r) for r in dev]
    hits = index.search([q for q, _ in pairs], 1)
    side = "description" if task == "mol2cap" else "smiles"
    preds = [getattr(contexts.records[h[0].row], side) for h in hits]
    return {"method": method,
            "metrics": evaluate(task, preds, [ref for _, ref in pairs], data_dir=WORK)}


def baselines(res: dict) -> list[tuple[str, dict]]:
    """(label, metrics) of each nearest-neighbour baseline scored: the default retrieval's
    first (its results entry predates the others and names no method), then the others'."""
    out = []
    nn = res.get("nearest_neighbour", {})
    if nn.get("metrics"):
        out.append((f"nearest neighbour ({nn['method']})" if nn.get("method")
                    else "nearest neighbour", nn["metrics"]))
    for method, other in res.get("nearest_neighbour_other", {}).items():
        out.append((f"nearest neighbour ({method})", other["metrics"]))
    return out


def add_baselines(task: str, res: dict) -> None:
    """``OTHER_BASELINES``' nearest neighbours on the queries the default one was scored on
    (seconds each; once)."""
    n = res["nearest_neighbour"]["metrics"]["n"]
    other = res.setdefault("nearest_neighbour_other", {})
    for method in OTHER_BASELINES[task]:
        if method not in other:
            other[method] = nearest_neighbour(task, n, method)
            save_results(task, res)


def decoding_key(decoding: str, num_samples: int | None) -> str:
    return f"{decoding}-{num_samples}" if decoding == "consensus" else decoding


def score_decodings(task: str, res: dict, label: str, decodings: list[str],
                    num_samples: int, n: int) -> None:
    """Arm ``label``'s dev-best checkpoint (the one ``--ship`` would ship) decoded each way in
    ``decodings`` on the same dev queries as its curve: which decoding the shipped default
    should be measured with is chosen here, never on test. Greedy is the curve point itself."""
    data = res["arms"][label]
    best = max(data["curve"], key=lambda p: headline_score(task, p["metrics"]))
    name = f"{task}-{label}"
    ckpt = WORK / "tuning" / name / "checkpoints" / f"step-{best['step']:07d}"
    entry = res.setdefault("decodings", {}).setdefault(label, {"step": best["step"],
                                                               "rows": {}})
    if entry["step"] != best["step"]:
        raise SystemExit(f"{label}: decodings were scored at step {entry['step']}, its dev-best "
                         f"checkpoint is now step {best['step']}")
    entry["rows"]["greedy"] = best
    n = (best.get("metrics") or {}).get("n", n)  # the curve's queries, whatever --dev says
    for decoding in decodings:
        key = decoding_key(decoding, num_samples if decoding == "consensus" else None)
        if key in entry["rows"]:
            continue
        if not ckpt.is_dir():
            raise SystemExit(f"{label} step {best['step']}: no checkpoint at {ckpt} (trained in "
                             f"another checkout?)")
        print(f"[{time.strftime('%H:%M:%S')}] decoding {label} step {best['step']}: {key}",
              flush=True)
        point = evaluate_checkpoint(name, ckpt, n, decoding,
                                    num_samples if decoding == "consensus" else None)
        point["machine"] = machine().rsplit(",", 3)[0]
        entry["rows"][key] = point
        save_results(task, res)


# --- shipping ------------------------------------------------------------------------------------

def headline_score(task: str, metrics: dict) -> float:
    """The mean of the task's headline metrics: what checkpoints and arms are chosen by."""
    return sum(metrics[h] for h in HEADLINE[task]) / len(HEADLINE[task])


def ship(task: str, label: str, name: str, dest: Path) -> Path:
    """The arm ``label``'s dev-best checkpoint (by ``headline_score``) as a shipped default
    adapter ``name`` in ``dest``: the run's manifest (recipe, data sha256, losses) with the
    chosen step and its dev metrics, and that checkpoint's weights (``icma adapters ship``'s
    layout: bfloat16, no machine paths, marked default)."""
    import shutil

    from icma.generation.adapters import read_adapter, ship_adapter

    res = load_results(task)
    data = res["arms"][label]
    best = max(data["curve"], key=lambda p: headline_score(task, p["metrics"]))
    run = WORK / "adapters" / f"{task}-{label}"  # the run's name (label: its arm and scale)
    manifest = json.loads((run / "icma-adapter.json").read_text())
    stage = WORK / "ship" / name
    shutil.rmtree(stage, ignore_errors=True)
    stage.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(WORK / "exported" / run.name / f"step-{best['step']:07d}", stage,
                    ignore=shutil.ignore_patterns("eval.jsonl", "README.md"))
    manifest.update(name=name, selection={
        "rule": "the checkpoint with the best mean of " + ", ".join(HEADLINE[task])
                + " on the dev queries (bench_icmt_recipe.py)",
        "step": best["step"], "of_steps": manifest["training"]["steps"],
        "dev": {"split": f"val-dev (first {best['metrics'].get('n')} of {DEV})",
                "metrics": {k: v for k, v in best["metrics"].items()
                            if isinstance(v, (int, float))}},
        "nearest_neighbour_dev": dict(baselines(res))})
    decoded = res.get("decodings", {}).get(label)
    if decoded and decoded["step"] == best["step"]:
        # Served with the dev-best decoding (a request naming none gets it), chosen by the
        # same mean as the checkpoint; greedy is always among them (the curve point).
        key, row = max(decoded["rows"].items(),
                       key=lambda kv: headline_score(task, kv[1]["metrics"]))
        manifest["generation"] = {"decoding": row.get("decoding", "greedy"),
                                  **({"num_samples": row["num_samples"]}
                                     if row.get("decoding") == "consensus" else {})}
        manifest["selection"]["decodings_dev"] = {
            k: {h: r["metrics"][h] for h in HEADLINE[task]} for k, r in decoded["rows"].items()}
    (stage / "icma-adapter.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return ship_adapter(read_adapter(stage), dest)


# --- results -------------------------------------------------------------------------------------

def results_path(task: str) -> Path:
    """Committed, not in ``WORK``: the scores are what the recipe is chosen by, and they must
    outlive the checkout that trained the arms."""
    folder = REPO / "benchmarks" / "results" if WORK == DEFAULT_WORK else WORK
    return folder / f"icmt_recipe_{task}.json"


def load_results(task: str) -> dict:
    path = results_path(task)
    return json.loads(path.read_text()) if path.exists() else {"arms": {}}


def save_results(task: str, res: dict) -> None:
    path = results_path(task)
    path.with_suffix(".tmp").write_text(json.dumps(res, indent=2))
    path.with_suffix(".tmp").rename(path)


def report(task: str, res: dict, n: int) -> str:
    n = (res.get("nearest_neighbour", {}).get("metrics") or {}).get("n", n)  # as scored
    where = {}
    for arm, data in res["arms"].items():
        where.setdefault(data.get("machine", "unrecorded"), []).append(arm)
    lines = [f"# ICMT recipe on a dev slice: {task}", "",
             f"Report written on {machine()}; commit {git_commit()}. Produced by "
             "`benchmarks/bench_icmt_recipe.py`. Arms trained and scored on: "
             + "; ".join(f"{m} ({', '.join(arms)})" for m, arms in where.items()) + ".", "",
             f"Protocol: ChEBI-20 validation split cut by a seeded shuffle (seed {SPLIT_SEED}) "
             f"into val-train ({3301 - DEV} pairs: training records and the database their "
             f"contexts and the dev queries retrieve from) and val-dev ({DEV} pairs, never "
             f"trained on); the first {n} dev queries, greedy decoding, at most "
             f"{MAX_NEW_TOKENS} new tokens, MolT5's metrics. The test split is not used. Shared "
             f"settings: {json.dumps(BASE)}; each arm trains and decodes in the precision its row "
             f"names (bfloat16 autocast on a CPU with AMX; float32, run names ending `-fp32`, on "
             f"CPUs without bfloat16 hardware) and changes what its row says. Arms named "
             f"`-sN` are the small-scale comparisons: N optimiser steps with "
             f"{json.dumps(SMALL)} (effective batch {BASE['batch_size'] * SMALL['grad_accum']}),"
             f" the same data order for every arm. {decode_times(res, n)}", ""]
    return "\n".join(lines + final_table(task, res) + ["", "Every checkpoint (the learning "
                                                           "curves):", ""]
                     + curve_table(task, res) + decoding_table(task, res)) + "\n"


def decoding_table(task: str, res: dict) -> list[str]:
    """The dev-best checkpoints decoded each way (``--decode``), beside the nearest neighbour."""
    if not res.get("decodings"):
        return []
    cols = METRICS[task]
    lines = ["", "Decodings of an arm's dev-best checkpoint, on the same dev queries (sample: "
             "ICMA's sampling, seed 42; consensus-K: K samples pooled with the examples' "
             "answers, minimum Bayes risk; speculation as the arm's precision says). Winners: "
             "how many consensus answers were a sample / the top example's answer / another "
             "example's.", "",
             "| arm | step | decoding | " + " | ".join(cols) + " | mean of "
             + ", ".join(HEADLINE[task]) + " | minutes | winners |",
             "| --- | ---: | --- | " + " | ".join("---:" for _ in cols) + " | ---: | ---: | --- |"]
    for label, nn in baselines(res):
        lines.append(f"| {label} | | | " + " | ".join(_fmt(nn.get(c)) for c in cols)
                     + f" | {headline_score(task, nn):.3f} | | |")
    for label, entry in res["decodings"].items():
        for key, p in entry["rows"].items():
            m = p.get("metrics") or {}
            w = p.get("winners")
            lines.append(f"| {label} | {entry['step']} | {key} | "
                         + " | ".join(_fmt(m.get(c)) for c in cols)
                         + f" | {headline_score(task, m):.3f} | "
                         + (f"{p['wall_s'] / 60:.0f}" if p.get("wall_s") else "") + " | "
                         + (f"{w['sample']} / {w['top_example']} / {w['other_example']}"
                            if w else "") + " |")
    return lines


def decode_times(res: dict, n: int) -> str:
    """How long a dev point's decoding took, by machine and precision, from the recorded wall
    times (the first arms' were not recorded: about 5 minutes each in bfloat16 on the Xeon)."""
    times: dict[tuple, list[float]] = {}
    for data in res["arms"].values():
        for p in data.get("curve", []):
            if isinstance(p.get("wall_s"), (int, float)):
                key = (data.get("machine", "unrecorded"),
                       data.get("options", {}).get("precision", "bfloat16"),
                       "with" if p.get("speculative_tokens") else "without")
                times.setdefault(key, []).append(p["wall_s"])
    parts = [f"{statistics.median(t) / 60:.0f} minutes in {prec} {spec} speculation on {m} "
             f"(median of {len(t)})" for (m, prec, spec), t in times.items()]
    untimed = any(not isinstance(p.get("wall_s"), (int, float))
                  for d in res["arms"].values() for p in d.get("curve", []))
    return " ".join(
        ([f"Decoding the {n} dev queries of a point took " + "; ".join(parts) + "."]
         if parts else [])
        + (["Points without a recorded time (the first bfloat16 arms, on the Xeon) took about "
            "5 minutes each."] if untimed else []))


def final_table(task: str, res: dict) -> list[str]:
    """Each arm's last checkpoint against the nearest neighbour and against ICMA's recipe at
    the same step in the same precision (the comparison the recipe is chosen by)."""
    heads = HEADLINE[task]
    last = {arm: max(d["curve"], key=lambda p: p["step"]) for arm, d in res["arms"].items()
            if d.get("curve")}

    def kind(arm: str) -> tuple:
        o = res["arms"][arm].get("options", {})
        return o.get("precision", "bfloat16"), o.get("max_steps"), o.get("epochs")

    refs = {kind(arm): p for arm, p in last.items() if res["arms"][arm].get("arm", arm) == "icma"}
    lines = ["| arm | change | precision | step | " + " | ".join(heads) + " | "
             + " | ".join(f"{h} vs icma" for h in heads) + " |",
             "| --- | --- | --- | ---: | " + " | ".join("---:" for _ in heads * 2) + " |"]
    for label, nn in baselines(res):
        lines.append(f"| {label} | | | | " + " | ".join(_fmt(nn.get(h)) for h in heads)
                     + " |" + " |" * len(heads))
    for arm, p in last.items():
        m = p.get("metrics") or {}
        ref = refs.get(kind(arm))
        r = (ref or {}).get("metrics") or {}
        deltas = [f"{m[h] - r[h]:+.3f}" if ref is not None and ref["step"] == p["step"]
                  and isinstance(m.get(h), float) and isinstance(r.get(h), float) else ""
                  for h in heads]
        lines.append(f"| {arm} | {json.dumps(ARMS.get(res['arms'][arm].get('arm', arm), {}))} "
                     f"| {kind(arm)[0]} | {p['step']} | " + " | ".join(_fmt(m.get(h)) for h in heads) + " | "
                     + " | ".join(deltas) + " |")
    return lines


def curve_table(task: str, res: dict) -> list[str]:
    """Markdown rows: the nearest-neighbour baseline, then every arm's dev metrics at every
    checkpoint (the learning curves as a table)."""
    cols = METRICS[task]
    lines = ["| arm | change | epoch | step | train loss | " + " | ".join(cols) + " |",
             "| --- | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in cols) + " |"]
    for label, nn in baselines(res):
        lines.append(f"| {label} | the best example's answer | | | | "
                     + " | ".join(_fmt(nn.get(c)) for c in cols) + " |")
    for arm, data in res["arms"].items():
        for point in sorted(data.get("curve", []), key=lambda p: p["step"]):
            m = point.get("metrics") or {}
            change = json.dumps(ARMS.get(data.get("arm", arm), {}))
            lines.append(f"| {arm} | {change} | {point.get('epoch', '')} "
                         f"| {point['step']} | {_fmt(point.get('loss'))} | "
                         + " | ".join(_fmt(m.get(c)) for c in cols) + " |")
    return lines


def _fmt(v) -> str:
    return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def plot(task: str, res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = HEADLINE[task]
    fig, axes = plt.subplots(1, len(heads), figsize=(5 * len(heads), 4.8))
    # One colour per recipe change, one line style per precision: an arm's float32 run sits
    # beside its bfloat16 run, and a float32 arm is read against the float32 reference.
    colours = {a: f"C{i % 10}" for i, a in enumerate(dict.fromkeys(
        d.get("arm", k) for k, d in res["arms"].items()))}
    for ax, metric in zip(axes, heads):
        for arm, data in res["arms"].items():
            pts = sorted((p["step"], (p.get("metrics") or {}).get(metric))
                         for p in data.get("curve", []))
            pts = [(s, v) for s, v in pts if v is not None]
            fp32 = data.get("options", {}).get("precision") == "float32"
            if pts:
                ax.plot(*zip(*pts), color=colours[data.get("arm", arm)],
                        marker="s" if fp32 else "o", linestyle=":" if fp32 else "-", label=arm)
        for (label, nn), style in zip(baselines(res), ("--", "-.", (0, (1, 3)))):
            if metric in nn:
                ax.axhline(nn[metric], color="k", linestyle=style, label=label)
        ax.set_xlabel("optimiser step")
        ax.set_title(f"{task} dev {metric}")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8,
               title="solid: bfloat16 (Xeon, AMX); dotted: float32", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.13 + 0.04 * ((len(labels) - 1) // 6), 1, 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    global WORK, PRECISION
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=["mol2cap", "cap2mol"], required=True)
    ap.add_argument("--arms", default="icma", help="comma-separated: " + ", ".join(ARMS))
    ap.add_argument("--dev", type=int, default=200, help="dev queries scored per checkpoint")
    ap.add_argument("--every", type=int, default=50, help="checkpoint (and curve point) every N "
                                                           "optimiser steps")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--steps", type=int, help="small-scale comparison: this many optimiser "
                                              "steps of SMALL batches (overrides --epochs)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--ship", metavar="LABEL=NAME",
                    help="ship arm LABEL's dev-best checkpoint as default adapter NAME (into "
                         "--ship-to) and stop")
    ap.add_argument("--ship-to", type=Path, default=REPO / "icma" / "data" / "adapters")
    ap.add_argument("--decode", metavar="LABEL",
                    help="decode arm LABEL's dev-best checkpoint with each of --decodings and "
                         "stop (trains nothing)")
    ap.add_argument("--decodings", default="sample,consensus",
                    help="with --decode: comma-separated, of sample, consensus (greedy is the "
                         "curve point)")
    ap.add_argument("--num-samples", type=int, default=8, help="consensus: answers per query")
    ap.add_argument("--work", type=Path, default=WORK, help="where runs and results are kept "
                                                           "(a smoke test uses another)")
    ap.add_argument("--precision", choices=["bfloat16", "float32"],
                    help="what the arms train and decode in (default: bfloat16 where the CPU "
                         "multiplies it in hardware, else float32)")
    args = ap.parse_args()
    from icma.evaluation.machine import cpu_has_fast_bf16

    WORK, PRECISION = args.work, args.precision or ("bfloat16" if cpu_has_fast_bf16()
                                                    else "float32")
    prepare()
    if args.ship:
        label, _, name = args.ship.partition("=")
        print("shipped", ship(args.task, label, name, args.ship_to))
        return
    res = load_results(args.task)
    if args.decode:
        if args.decode not in res["arms"]:
            raise SystemExit(f"no arm {args.decode!r} scored for {args.task}; scored: "
                             + ", ".join(res["arms"]))
        wrong = set(args.decodings.split(",")) - {"sample", "consensus"}
        if wrong:
            raise SystemExit(f"--decodings: unknown {', '.join(sorted(wrong))}; choose from "
                             "sample, consensus")
        from icma.generation.engines import BOUNDS

        top = BOUNDS["num_samples"]["le"]  # the engines' one limit, checked before a load
        if not 2 <= args.num_samples <= top:
            raise SystemExit(f"--num-samples: must be between 2 and {top}, "
                             f"got {args.num_samples}")
        add_baselines(args.task, res)
        score_decodings(args.task, res, args.decode, args.decodings.split(","),
                        args.num_samples, args.dev)
    elif not args.report_only:
        if "nearest_neighbour" not in res:
            res["nearest_neighbour"] = nearest_neighbour(args.task, args.dev)
            save_results(args.task, res)
        add_baselines(args.task, res)
        for arm in args.arms.split(","):
            if arm not in ARMS:
                raise SystemExit(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
            name = run_name(args.task, arm, args.steps)
            opts = options(args.task, arm, args.epochs, args.every, args.steps)
            data = res["arms"].setdefault(name.split("-", 1)[1], {"arm": arm, "options": opts,
                                                                  "curve": []})
            if data.get("complete"):  # trained and scored, perhaps in another checkout
                continue
            train(args.task, arm, args.epochs, args.every, args.steps)
            done = {p["step"] for p in data["curve"]}
            for ckpt in to_score(checkpoints(name), args.every, done):
                step = int(ckpt.name.split("-")[1])
                state = json.loads((ckpt / "state.json").read_text())
                print(f"[{time.strftime('%H:%M:%S')}] evaluating {arm} step {step}", flush=True)
                point = evaluate_checkpoint(name, ckpt, args.dev)
                point["epoch"] = round(step * opts["batch_size"] * opts["grad_accum"]
                                       / (3301 - DEV), 2)
                point["loss"] = state["losses"][-1] if state.get("losses") else None
                data["curve"].append(point)
                data["machine"] = machine().rsplit(",", 3)[0]  # the CPU, without the date
                save_results(args.task, res)
            data["complete"] = True
            save_results(args.task, res)
    write(f"icmt_recipe_{args.task}.md", report(args.task, res, args.dev))
    plot(args.task, res, REPO / "benchmarks" / "results" / f"icmt_recipe_{args.task}.png")


if __name__ == "__main__":
    main()
