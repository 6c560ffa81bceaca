"""The ICMT recipe at full scale on a lent GPU: pack here, train and generate there, score here.

The recipe search (``bench_icmt_recipe.py``) and the full-test-split evaluation are hours of
work on 2 CPU cores and minutes on one GPU. The GPU machine has torch, transformers and peft but
not RDKit, FAISS or pydantic, so the work is split where the dependencies split:

``pack`` (here)
    Everything that needs icma's retrieval and prompts: the training sets of every arm, built by
    ``icma.tuning.data.build_training_set`` exactly as ``icma tune`` builds them, and every
    prompt the evaluation will generate from, captured by running icma's serving path
    (``icma.generation.pipeline.translate``) with an engine that records what it is asked to
    generate. Token ids go into one xz file in ``.device-icmt/`` with the base model's GGUF.
``device`` (there)
    Trains every arm with icma's own loop (``icma.tuning.loop.train``, which loads with torch
    alone) on the validation split minus a dev slice, scores each arm's dev answers at the end
    of every epoch, picks the winner of each task by the rule fixed below, trains it on the
    whole validation split with naive SFT beside it, and generates the test split's answers.
    It works to a deadline and writes what it finished to ``$OUT``.
``collect`` (here)
    Answers every recorded prompt with the GPU's continuations (an engine that replays them),
    so answer extraction, consensus choice, RDKit checks and MolT5's metrics are icma's own;
    writes the adapters with their manifests and the result tables.

The dev slice and the arms are ``bench_icmt_recipe.py``'s (the CPU version of this search).
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORK = REPO / ".device-icmt"
EPOCHS = 4  # the sweep's schedule; dev answers are scored after every epoch
#: The sweep trains on the first N val-train records (contexts from all of val-train): one GPU
#: for minutes affords every arm's 4 epochs at this size, not at 3,001 (measured: see the log).
SWEEP_RECORDS = 1200
DEV_TOKENS = 160  # new tokens for dev answers (bench_icmt_recipe's MAX_NEW_TOKENS)
TEST_TOKENS = 256  # ICMA's and icma bench quality's
CONSENSUS_SAMPLES = 8  # icma.generation.options.DEFAULT_NUM_SAMPLES
#: Arms compared on dev (bench_icmt_recipe.ARMS, whose BASE is the shared recipe). Only arms
#: that serve with the default request's prompt (the task's retrieval, 2/4 examples, reversed)
#: and ship as a LoRA adapter may be chosen as the default: the others are ablations.
ARMS_BY_TASK = {
    "mol2cap": ["icma", "lr5e-4", "inputs", "full", "morgan", "ranked", "naive-sft"],
    "cap2mol": ["icma", "lr5e-4", "inputs", "full", "ranked", "naive-sft"],
}
CANDIDATES = {"icma", "lr5e-4", "inputs"}
#: The selection rule, fixed before any result: the candidate arm and epoch with the highest
#: dev score; mol2cap: BLEU-4 of the captions (whitespace tokens, sacrebleu's corpus BLEU is not
#: used: the device computes this one itself); cap2mol: exact string match with the reference
#: SMILES, ties broken by character BLEU. Computed on the device from the raw continuations.
SELECTION = {"mol2cap": "caption BLEU-4 (whitespace tokens) of the dev answers",
             "cap2mol": "exact SMILES string match of the dev answers, ties by char BLEU-4"}


# --- here: pack ----------------------------------------------------------------------------------

class Recorder:
    """A Generator that records what it is asked to generate and answers nothing (pack), or
    answers from the device's continuations (collect)."""

    def __new__(cls, *a, **k):  # subclass Generator lazily: icma loads only here, not there
        from icma.generation.engines.base import Generator

        class _Recorder(Generator):
            name, model = "transformers", "smollm2-135m-instruct"

            def __init__(self, tokenizer, answers: dict | None = None, label: str = ""):
                self.tokenizer, self.answers, self.label, self.calls = tokenizer, answers, \
                    label, []

            def count_tokens(self, text: str) -> int:
                return len(self.tokenizer(text)["input_ids"])

            def generate(self, inputs, params, adapter=None):
                from icma.generation.engines.base import Generation, cut_at_stop

                p = params.for_engine()
                self.calls.append(([i.prompt for i in inputs], p))
                if self.answers is None:
                    return [Generation("") for _ in range(len(inputs) * p.num_samples)]
                out = []
                for x in inputs:
                    got = self.answers[self.label][x.prompt]
                    if len(got) < p.num_samples:
                        raise RuntimeError(f"{self.label}: {len(got)} samples, not "
                                           f"{p.num_samples}")
                    for text, n_new, ended in got[:p.num_samples]:
                        text, stopped = cut_at_stop(text, p.stop)
                        out.append(Generation(text, self.count_tokens(x.prompt), n_new,
                                              "stop" if ended or stopped else "length"))
                return out

        return _Recorder(*a, **k)


def _settings():
    from icma.core.settings import Settings

    return Settings(data_dir=WORK / "data", progress=False)


def _corpora():
    """val-train / val-dev (bench_icmt_recipe's seeded split), the whole validation split, the
    test split."""
    import benchmarks.bench_icmt_recipe as recipe
    from icma.core.corpus import EMBEDDED_DIR, read_corpus
    from icma.retrieval.store import open_corpus

    recipe.WORK = WORK / "data"
    recipe.prepare()
    return {"val-train": open_corpus("val-train", WORK / "data", field="train"),
            "val-dev": open_corpus("val-dev", WORK / "data", field="eval"),
            "val": read_corpus(EMBEDDED_DIR / "validation.txt", name="chebi20-validation")[0],
            "test": read_corpus(EMBEDDED_DIR / "test.txt", name="chebi20-test",
                                on_invalid="keep")[0]}


def arm_config(task: str, arm: str, train: str, epochs: float):
    from benchmarks.bench_icmt_recipe import ARMS, BASE
    from icma.tuning import parse_config

    return parse_config({"task": task, "name": f"{task}-{arm}", "train": train, **BASE,
                         **ARMS[arm], "epochs": epochs, "batch_size": 4, "grad_accum": 8})


def prompt_key(cfg) -> str:
    """Arms that share training prompts (``inputs`` differs only in its labels)."""
    return f"{cfg.method_for_contexts}-{cfg.shots}-{cfg.order}"


def pack(args) -> None:
    import numpy as np

    from icma.core.rerank import RerankConfig
    from icma.core.tasks import spec
    from icma.generation.models import resolve_model, shipped_gguf
    from icma.generation.options import build_options
    from icma.generation.pipeline import translate
    from icma.retrieval import Exclusion, ExclusionRule
    from icma.retrieval.cache import cached_index
    from icma.retrieval.examples import retrieve_examples
    from icma.tuning.data import Tokens, answer_side, build_training_set
    from icma.tuning.model import config_eos_id, load_tokenizer

    t0 = time.time()
    WORK.mkdir(exist_ok=True)
    settings = _settings()
    corpora = _corpora()
    base = resolve_model("smollm2-135m-instruct", WORK / "data")
    tok = load_tokenizer(base, "smollm2-135m-instruct")
    tokens = Tokens(tok, "</s>", config_eos_id(base))
    ids: list[list[int]] = []  # every token sequence, deduplicated by text
    seen: dict[str, int] = {}

    def add(text_key: str, seq: list[int]) -> int:
        if text_key not in seen:
            seen[text_key] = len(ids)
            ids.append(seq)
        return seen[text_key]

    meta = {"tasks": {}, "created": time.time(), "epochs": EPOCHS}
    local: dict = {}  # the test prompts' texts, for collect
    tasks = args.tasks.split(",")
    for task in tasks:
        tm = meta["tasks"][task] = {"sets": {}, "arms": {}, "dev": {}, "test": {}}
        limit = args.limit
        for split in ("val-train", "val"):
            records = corpora[split].records
            records = records[:limit] if split == "val-train" else records[:args.final_limit]
            for arm in ARMS_BY_TASK[task]:
                cfg = arm_config(task, arm, split, EPOCHS)
                key = f"{split}:{prompt_key(cfg)}"
                if split == "val-train":
                    tm["arms"][arm] = {"config": cfg.model_dump(mode="json"), "set": key}
                if key in tm["sets"]:
                    continue
                index = cached_index(cfg.method_for_contexts, corpora[split], WORK / "data",
                                     settings=settings)
                data = build_training_set(task, records, index, tokens, n_shot=cfg.shots,
                                          cutoff=cfg.cutoff, prime_answer=cfg.prime_answer,
                                          order=cfg.order, rerank=RerankConfig(),
                                          rule=ExclusionRule(self_cid=True))
                rows = []
                for e in data.examples:
                    n_prompt = len(tokens.prompt(e.prompt))
                    assert e.labels[n_prompt:] == e.input_ids[n_prompt:]
                    rows.append([add("train\0" + e.text, e.input_ids), n_prompt])
                tm["sets"][key] = {"rows": rows, "stats": data.stats(),
                                   "skipped": len(data.skipped)}
                print(f"[{time.time() - t0:5.0f}s] {task} {key}: {len(rows)} examples",
                      flush=True)
        # Dev prompts: each prompt form's greedy answers, as bench_icmt_recipe's evaluation
        # serves them (contexts from val-train, the dev queries' CIDs excluded).
        dev = corpora["val-dev"].records[:args.dev]
        pairs = [answer_side(task, r) for r in dev]
        for arm, info in tm["arms"].items():
            cfg = arm_config(task, arm, "val-train", EPOCHS)
            form = prompt_key(cfg)
            if form in tm["dev"]:
                continue
            index = cached_index(cfg.method_for_contexts, corpora["val-train"], WORK / "data",
                                 settings=settings)
            shots = retrieve_examples(index, _search(task, [q for q, _ in pairs]),
                                      max(cfg.shots, 1),
                                      exclusions=[Exclusion(cids=frozenset([r.cid]))
                                                  for r in dev])
            shots = [s[:cfg.shots] for s in shots]
            rec = Recorder(tok)
            opts = build_options(task, {"n_shot": cfg.shots, "order": cfg.order,
                                        "prime_answer": cfg.prime_answer, "cutoff": cfg.cutoff,
                                        "generation": {"decoding": "greedy",
                                                       "max_new_tokens": DEV_TOKENS}})
            translate(task, [q for q, _ in pairs], shots, rec, opts)
            prompts, params = rec.calls[0]
            tm["dev"][form] = {"prompts": [add("prompt\0" + p, tokens.prompt(p))
                                           for p in prompts],
                               "params": _params(params)}
        tm["dev_refs"] = [ref for _, ref in pairs]
        # Test prompts: icma bench quality's protocol (database = validation, queries = test,
        # the query's own CID excluded), the task's default retrieval.
        queries = corpora["test"].records[:args.test] if args.test else corpora["test"].records
        qs = [r.smiles if task == "mol2cap" else r.description for r in queries]
        method = spec(task).default_method
        index = cached_index(method, corpora["val"], WORK / "data", settings=settings)
        shots = retrieve_examples(index, _search(task, qs), spec(task).n_shot,
                                  exclusions=[Exclusion(cids=frozenset([r.cid]))
                                              for r in queries])
        runs = {"untuned": (shots, {"adapter": "base"}, ["greedy"]),
                "naive": ([[] for _ in qs], {"adapter": "base"}, ["greedy"]),
                "final": (shots, {"adapter": "base"}, ["greedy", "consensus"])}
        for label, (ex, asked, decodings) in runs.items():
            for decoding in decodings:
                generation = {"decoding": decoding, "max_new_tokens": TEST_TOKENS}
                if decoding == "consensus":
                    generation["num_samples"] = CONSENSUS_SAMPLES
                rec = Recorder(tok)
                translate(task, qs, ex, rec, build_options(
                    task, {"n_shot": len(ex[0]), **asked, "generation": generation}))
                prompts, params = rec.calls[0]
                local.setdefault(task, {})[f"{label}:{decoding}"] = prompts
                tm["test"][f"{label}:{decoding}"] = {
                    "prompts": [add("prompt\0" + p, tokens.prompt(p)) for p in prompts],
                    "params": _params(params)}
        print(f"[{time.time() - t0:5.0f}s] {task}: dev and test prompts recorded", flush=True)
    meta["eos_ids"] = _eos_ids(tok, base)
    meta["base_digest"] = _weights_digest(Path(base))
    meta["pad_id"] = tok.pad_token_id
    lengths = np.array([len(s) for s in ids], dtype=np.int64)
    flat = np.fromiter((t for s in ids for t in s), dtype=np.uint16, count=int(lengths.sum()))
    meta["n_sequences"], meta["n_tokens"] = len(ids), int(lengths.sum())
    payload = lengths.astype("<u4").tobytes() + flat.astype("<u2").tobytes()
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME,
                "dict_size": 1 << 27}]
    (WORK / "tokens.xz").write_bytes(lzma.compress(payload, format=lzma.FORMAT_XZ,
                                                   filters=filters))
    (WORK / "meta.json").write_text(json.dumps(meta))
    _local().mkdir(exist_ok=True)
    (_local() / "prompts.json.xz").write_bytes(lzma.compress(json.dumps(local).encode()))
    # The base model travels as the GGUF it is shipped as (split: 64 MiB per device call).
    gguf = shipped_gguf().read_bytes()
    half = len(gguf) // 2
    (WORK / "gguf.part1").write_bytes(gguf[:half])
    (WORK / "gguf-b").mkdir(exist_ok=True)
    (WORK / "gguf-b" / "gguf.part2").write_bytes(gguf[half:])
    tok.save_pretrained(WORK / "tokenizer")
    print(f"[{time.time() - t0:5.0f}s] packed {len(ids)} sequences, {lengths.sum()} tokens, "
          f"{(WORK / 'tokens.xz').stat().st_size / 1e6:.1f} MB compressed", flush=True)


def _search(task: str, queries):
    from icma.evaluation.quality import _search_queries

    return _search_queries(task, queries)


def _params(p) -> dict:
    return {"decoding": p.decoding, "max_new_tokens": p.max_new_tokens,
            "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
            "repetition_penalty": p.repetition_penalty, "num_samples": p.num_samples,
            "seed": p.seed, "stop": list(p.stop),
            "no_repeat_ngram_size": p.no_repeat_ngram_size}


def _eos_ids(tok, base) -> list[int]:
    from transformers import GenerationConfig

    eos = {tok.eos_token_id}
    try:
        g = GenerationConfig.from_pretrained(base).eos_token_id
        eos |= set(g if isinstance(g, list) else [g])
    except OSError:
        pass
    return sorted(e for e in eos if e is not None)


# --- there: train, select, generate -------------------------------------------------------------

class Example:
    """What the loop needs of a training example."""

    __slots__ = ("input_ids", "labels")

    def __init__(self, input_ids: list[int], labels: list[int]):
        self.input_ids, self.labels = input_ids, labels


class Cfg:
    """The loop's and ``load_model``'s view of a TuneConfig (pydantic is not there): its
    fields, and the warm-up ``pack`` computed with ``TuneConfig.warmup_for``."""

    def __init__(self, fields: dict, warmup: int):
        self.__dict__.update(fields)
        self.warmup_steps, self.save_steps, self.log_steps = warmup, 10**9, 1

    def warmup_for(self, total: int) -> int:
        return self.warmup_steps


def _sequences(work: Path):
    """Every packed token sequence (decompressed once into ``work/tokens.npz``)."""
    import numpy as np

    cache = work / "tokens.npz"
    if not cache.exists():
        raw = lzma.decompress((work / "tokens.xz").read_bytes())
        n = json.loads((work / "meta.json").read_text())["n_sequences"]
        lengths = np.frombuffer(raw[:4 * n], dtype="<u4").astype(np.int64)
        flat = np.frombuffer(raw[4 * n:], dtype="<u2").astype(np.int32)
        np.savez(work / ".tokens.npz", lengths=lengths, flat=flat)
        os.replace(work / ".tokens.npz", cache)
    z = np.load(cache)
    lengths, flat = z["lengths"], z["flat"]
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return lambda i: flat[starts[i]:starts[i + 1]].tolist()


def _training_data(seq, rows, train_on_inputs: bool) -> list[Example]:
    out = []
    for i, n_prompt in rows:
        ids = seq(i)
        labels = list(ids) if train_on_inputs else [-100] * n_prompt + ids[n_prompt:]
        labels[0] = -100
        out.append(Example(ids, labels))
    return out


def generate(net, tok, prompts: list[list[int]], params: dict, eos_ids: list[int], device: str,
             seed: int) -> list[tuple[str, int, bool]]:
    """(text, new tokens, ended) per prompt: the transformers engine's ``_batch`` (greedy or
    sampling with the same settings, stop texts, EOS ids), longest prompts first, in batches
    whose KV cache takes at most a third of the GPU memory free now (other arms share it)."""
    import torch

    c = (net.get_base_model() if hasattr(net, "get_base_model") else net).config
    kv_token = 2 * c.num_hidden_layers * c.num_key_value_heads * \
        (c.hidden_size // c.num_attention_heads) * 2  # bf16 keys and values
    free = torch.cuda.mem_get_info()[0] if device.startswith("cuda") else 2 << 30
    width_max = max(len(p) for p in prompts) + params["max_new_tokens"]
    batch = max(16, min(1024, int(free / 3 / (kv_token * width_max * 1.5))))

    out: list = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    kwargs = dict(max_new_tokens=params["max_new_tokens"], eos_token_id=eos_ids,
                  pad_token_id=tok.pad_token_id, use_cache=True,
                  repetition_penalty=params["repetition_penalty"],
                  stop_strings=[s for s in params["stop"] if s], tokenizer=tok)
    if params["decoding"] == "sample":
        kwargs.update(do_sample=True, temperature=params["temperature"], top_p=params["top_p"],
                      top_k=params["top_k"], num_beams=1)
    else:
        kwargs.update(do_sample=False, num_beams=1)
    torch.manual_seed(seed)
    was_training = net.training
    net.eval()
    for lo in range(0, len(order), batch):
        idx = order[lo:lo + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        with torch.inference_mode(), torch.autocast(device.split(":")[0],
                                                    dtype=torch.bfloat16):
            seqs = net.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                **kwargs)
        for r, i in enumerate(idx):
            new = seqs[r, width:].tolist()
            ended = False
            for j, t in enumerate(new):
                if t in eos_ids:
                    new, ended = new[:j], True
                    break
            out[i] = (tok.decode(new, skip_special_tokens=True), len(new), ended)
    if was_training:
        net.train()
    return out


def _answer(text: str, stop: list[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut].strip()


def bleu4(hyps: list[list[str]], refs: list[list[str]]) -> float:
    """Corpus BLEU-4 (uniform weights, brevity penalty, no smoothing): the device's selection
    score, not a reported metric (those are MolT5's, computed by ``collect``)."""
    import math
    from collections import Counter

    match, total = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for h, r in zip(hyps, refs):
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, 5):
            hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            match[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            total[n - 1] += max(len(h) - n + 1, 0)
    if min(match) == 0 or hyp_len == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(match, total)) / 4
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(log_p)


def dev_score(task: str, answers: list[str], refs: list[str]) -> dict:
    if task == "mol2cap":
        return {"score": bleu4([a.split() for a in answers], [r.split() for r in refs])}
    exact = sum(a == r for a, r in zip(answers, refs)) / len(refs)
    char = bleu4([list(a) for a in answers], [list(r) for r in refs])
    return {"score": exact + 1e-3 * char, "exact": exact, "char_bleu4": char}


def run_arm(args) -> None:
    """One process: train an arm (``--split val-train``: with dev scores after every epoch;
    ``val``: the final run) and generate what ``--generate`` lists; results to ``--result``."""
    import math

    import torch
    from transformers import AutoTokenizer

    from icma.tuning.loop import Stopped, train
    from icma.tuning.model import load_model

    meta = json.loads((WORK / "meta.json").read_text())
    tm = meta["tasks"][args.task]
    info = tm["arms"].get(args.arm)
    seq = _sequences(WORK)
    tok = AutoTokenizer.from_pretrained(str(WORK / "tokenizer"))
    tok.padding_side = "left"
    result = {"task": args.task, "arm": args.arm, "split": args.split, "epochs": args.epochs,
              "curve": [], "losses": [], "generations": {}, "started": time.time()}
    path = Path(args.result)

    def save():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, path)

    net = None
    if args.arm != "untuned":
        fields = info["config"]
        key = info["set"].replace("val-train:", f"{args.split}:")
        rows = tm["sets"][key]["rows"]
        data = _training_data(seq, rows, fields["train_on_inputs"])
        per_epoch = math.ceil(len(data) / fields["batch_size"])
        total = max(1, math.ceil(args.epochs * per_epoch / fields["grad_accum"]))
        cfg = Cfg({**fields, "epochs": args.epochs}, min(1000, total // 8))
        torch.manual_seed(cfg.seed)
        net = load_model(cfg, str(WORK / "base"), args.device, "bfloat16")
        if args.device.startswith("cuda"):
            # The first device run's losses turned NaN within 10 steps under SDPA: CUDA's
            # memory-efficient kernel gives NaN gradients for the fully masked query rows of
            # left padding. Eager attention masks with the dtype's minimum, never NaN.
            (net.get_base_model() if hasattr(net, "get_base_model") else net) \
                .set_attn_implementation("eager")
        boundaries = {round(k * per_epoch / fields["grad_accum"]): k
                      for k in range(1, int(args.epochs) + 1)}
        form = key.split(":", 1)[1]
        dev = tm["dev"].get(form)

        def progress(p):
            if p.get("phase") != "training":
                return
            result["losses"].append(p["loss"])
            result["tokens_per_s"] = p.get("tokens_per_s")
            epoch = boundaries.get(p["step"])
            if args.split == "val-train" and epoch is not None and dev is not None:
                t0 = time.time()
                gens = generate(net, tok, [seq(i) for i in dev["prompts"]], dev["params"],
                                meta["eos_ids"], args.device, dev["params"]["seed"])
                answers = [_answer(g[0], dev["params"]["stop"]) for g in gens]
                result["curve"].append({"epoch": epoch, "step": p["step"],
                                        "loss": p["loss"], "gen_s": time.time() - t0,
                                        **dev_score(args.task, answers, tm["dev_refs"]),
                                        "answers": answers})
            result["elapsed_s"] = time.time() - result["started"]
            save()

        run_dir = Path(args.tmp) / f"{args.task}-{args.arm}-{args.split}"
        try:
            res = train(net, data, cfg, run_dir, device=args.device, precision="bfloat16",
                        pad_id=tok.pad_token_id, fingerprint={}, on_progress=progress,
                        should_stop=lambda: time.time() > args.stop_at)
            result["train"] = {"steps": res.steps, "tokens": res.tokens, "wall_s": res.wall_s,
                               "examples": len(data), "tokens_per_s": res.session.get(
                                   "tokens_per_s")}
        except Stopped:
            result["stopped"] = "deadline"
        save()
        if args.save_adapter and "stopped" not in result:
            net.save_pretrained(str(Path(args.tmp) / f"adapter-{args.task}"))
            result["adapter_dir"] = str(Path(args.tmp) / f"adapter-{args.task}")
    else:
        from transformers import AutoModelForCausalLM

        net = AutoModelForCausalLM.from_pretrained(str(WORK / "base"),
                                                   dtype=torch.float32).to(args.device)
    for job in filter(None, args.generate.split(",")):
        spec = tm["test"][job]
        params = dict(spec["params"])
        prompts = [seq(i) for i in spec["prompts"]]
        passes = params.pop("num_samples")
        params["decoding"] = "sample" if job.endswith("consensus") else params["decoding"]
        done = result["generations"].setdefault(job, [])
        for k in range(passes):
            if time.time() > args.stop_at:
                result.setdefault("cut", []).append(f"{job}: {k} of {passes} passes")
                break
            t0 = time.time()
            done.append(generate(net, tok, prompts, params, meta["eos_ids"], args.device,
                                 params["seed"] + k))
            result.setdefault("gen_s", {})[f"{job}#{k}"] = time.time() - t0
            save()
    result["elapsed_s"] = time.time() - result["started"]
    save()


def device(args) -> None:
    """The whole GPU run (see the module docstring), to ``args.deadline`` seconds."""
    import subprocess

    import torch

    from icma.generation.models import _convert_gguf

    start = time.time()
    end = start + args.deadline
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path("/tmp/icmt-device")
    tmp.mkdir(exist_ok=True)
    log = open(out / "log.txt", "a")

    def say(msg):
        line = f"[{time.time() - start:6.1f}s] {msg}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    meta = json.loads((WORK / "meta.json").read_text())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    say(f"{gpu}; torch {torch.__version__}")
    if not (WORK / "base" / "config.json").exists():
        gguf = tmp / "SmolLM2-135M-Instruct.Q4_1.gguf"
        gguf.write_bytes((WORK / "gguf.part1").read_bytes()
                         + (WORK / "gguf-b" / "gguf.part2").read_bytes())
        _convert_gguf(gguf, WORK / "base.tmp")
        os.replace(WORK / "base.tmp", WORK / "base")
    _sequences(WORK)
    digest = _weights_digest(WORK / "base")
    say(f"base model ready, weights sha256 {digest} "
        f"({'same as' if digest == meta.get('base_digest') else 'DIFFERENT from'} here)")

    def launch(task, arm, split, epochs, stop_at, generate="", save_adapter=False):
        res = tmp / f"{task}-{arm}-{split}.json"
        cmd = [sys.executable, __file__, "arm", "--work", str(WORK), "--task", task,
               "--arm", arm, "--split", split, "--epochs", str(epochs), "--stop-at",
               str(stop_at), "--result", str(res), "--tmp", str(tmp), "--device",
               args.device, "--generate", generate] + (["--save-adapter"] if save_adapter
                                                       else [])
        logf = open(tmp / f"{task}-{arm}-{split}.log", "w")
        # One CPU thread each: the first run's many processes at 16 threads apiece trained at
        # 5-8 thousand tokens/s in all.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env), res

    def wait(procs):
        for p, _ in procs:
            p.wait()

    def read(path):
        return json.loads(path.read_text()) if path.exists() else {}

    if args.final_only:  # no sweep: TASK:ARM:EPOCHS trained on all of val, then the test split
        task, arm, epochs = args.final_only.split(":")
        p = launch(task, arm, "val", int(epochs), end - 15, "final:greedy", True)
        wait([p])
        results = {f"{task}/final": read(p[1])}
        chosen = {task: {"arm": arm, "epochs": int(epochs), "no_sweep": True}}
        _finish(out, tmp, results, {}, chosen, digest, gpu, start, say, log)
        return
    # Wave 1: every arm of both tasks at once (small models leave a GPU mostly idle).
    sweep_end = start + args.sweep_share * args.deadline
    procs = {(t, a): launch(t, a, "val-train", args.epochs, sweep_end)
             for t in meta["tasks"] for a in meta["tasks"][t]["arms"]
             if not args.arms or a in args.arms.split(",")}
    # The untuned model's test answers need no training: they run beside the sweep.
    for t in meta["tasks"]:
        procs[(t, "untuned")] = launch(t, "untuned", "val", 0, end - 20, "untuned:greedy")
    wait([v for k, v in procs.items() if k[1] != "untuned"])
    sweep = {k: read(v[1]) for k, v in procs.items() if k[1] != "untuned"}
    say("sweep done: " + ", ".join(f"{t}/{a}: {len(r.get('curve', []))} epochs"
                                   for (t, a), r in sweep.items()))
    # Selection (the rule in SELECTION), then wave 2: the winner and naive SFT on all of val.
    finals = []
    chosen = {}
    for t in meta["tasks"]:
        # ties: the fewer epochs, then ICMA's own settings first
        best = max(((p["score"], -p["epoch"], -ARMS_BY_TASK[t].index(a), a, p["epoch"])
                    for (task, a), r in sweep.items() if task == t and a in CANDIDATES
                    for p in r.get("curve", [])), default=None)
        if best is None:
            say(f"{t}: no candidate finished an epoch; nothing to choose")
            continue
        _, _, _, arm, epoch = best
        chosen[t] = {"arm": arm, "epochs": epoch}
        say(f"{t}: chose {arm} at {epoch} epochs (dev score {best[0]:.4f})")
        # The final run must end with time left to generate: at the sweep's own rate (shared by
        # every arm; wave 2 shares the GPU with fewer), cut its epochs if it would not.
        tm = meta["tasks"][t]
        tokens = tm["sets"][tm["arms"][arm]["set"].replace("val-train:", "val:")]["stats"][
            "tokens"]
        rate = sweep[(t, arm)].get("tokens_per_s") or 0
        left = end - time.time()
        while rate and epoch > 1 and epoch * tokens / (2 * rate) > 0.45 * left:
            epoch -= 1
        if epoch != chosen[t]["epochs"]:
            chosen[t].update(epochs=epoch, cut_from=chosen[t]["epochs"])
            say(f"{t}: {epoch} epochs instead, to leave time to generate "
                f"({rate:.0f} tokens/s in the sweep, {left:.0f}s left)")
        finals.append(((t, "final"), launch(t, arm, "val", epoch, end - 25,
                                            "final:greedy,final:consensus", True)))
        finals.append(((t, "naive"), launch(t, "naive-sft", "val", epoch, end - 25,
                                            "naive:greedy")))
    wait([v for _, v in finals])
    wait([v for k, v in procs.items() if k[1] == "untuned"])
    results = {f"{t}/{kind}": read(v[1]) for (t, kind), v in finals}
    results.update({f"{t}/untuned": read(v[1]) for (t, a), v in procs.items() if a == "untuned"})
    _finish(out, tmp, results, sweep, chosen, digest, gpu, start, say, log)


def _finish(out, tmp, results, sweep, chosen, digest, gpu, start, say, log) -> None:
    import torch

    blob = json.dumps({"sweep": {f"{t}/{a}": r for (t, a), r in sweep.items()},
                       "chosen": chosen, "finals": results, "base_digest": digest,
                       "device": gpu, "torch": torch.__version__,
                       "wall_s": time.time() - start})
    (out / "results.json.xz").write_bytes(lzma.compress(blob.encode(), preset=6))
    for t in chosen:  # the adapters, bf16, in parts under the 16 MiB a returned file may hold
        src = tmp / f"adapter-{t}"
        if (src / "adapter_model.safetensors").exists():
            _pack_adapter(src, out, t)
    say(f"done in {time.time() - start:.0f}s; cut: "
        + json.dumps({k: r.get("cut") for k, r in results.items() if r.get("cut")}))
    for f in sorted(tmp.glob("*.log")):  # the tails of the arms' logs
        log.write(f"--- {f.name}\n" + "".join(f.read_text().splitlines(True)[-15:]))
    log.close()


def _pack_adapter(src: Path, out: Path, task: str) -> None:
    import io
    import tarfile

    import torch
    from safetensors.torch import load_file, save_file

    weights = {k: v.to(torch.bfloat16) for k, v in
               load_file(str(src / "adapter_model.safetensors")).items()}
    save_file(weights, str(src / "adapter_model.bf16.safetensors"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(src / "adapter_config.json", "adapter_config.json")
        tar.add(src / "adapter_model.bf16.safetensors", "adapter_model.safetensors")
    data = buf.getvalue()
    half = len(data) // 2 + 1
    (out / f"adapter-{task}.tar.1").write_bytes(data[:half])
    (out / f"adapter-{task}.tar.2").write_bytes(data[half:])


def _weights_digest(folder: Path) -> str:
    """SHA-256 over the model's tensors (names, float32 bytes): the same base model here and
    there, whatever the files' layout."""
    import hashlib

    import torch
    from safetensors.torch import load_file

    h = hashlib.sha256()
    tensors = load_file(str(folder / "model.safetensors"))
    for name in sorted(tensors):
        h.update(name.encode() + tensors[name].to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


# --- here: collect -------------------------------------------------------------------------------



def _local() -> Path:
    """What stays here: the prompts' texts, the staged adapters, the quality tables."""
    return WORK.with_name(WORK.name + "-local")
NAMES = {"mol2cap": "icmt-mol2cap", "cap2mol": "icmt-cap2mol"}  # the shipped adapters


def _returned(src: Path) -> dict:
    blob = json.loads(lzma.decompress((src / "results.json.xz").read_bytes()))
    return blob


def collect(args) -> None:
    """Dev tables and learning curves, the adapters with their manifests (staged in
    ``LOCAL/adapters``; ``icma adapters ship`` puts them in the package), and the full test
    split through icma's serving path with the device's continuations."""
    import io
    import tarfile

    from benchmarks.common import RESULTS, git_commit, machine, write
    from icma.evaluation.metrics import evaluate

    blob = _returned(args.src)
    meta = json.loads((WORK / "meta.json").read_text())
    texts = json.loads(lzma.decompress((_local() / "prompts.json.xz").read_bytes()))
    # 1. the sweep: MolT5 metrics of every arm's dev answers after every epoch
    recipe = {}
    for task in meta["tasks"]:
        refs = meta["tasks"][task]["dev_refs"]
        res = {"arms": {}, "nearest_neighbour": _dev_nearest(task, len(refs))}
        for key, r in blob["sweep"].items():
            t, arm = key.split("/")
            if t != task:
                continue
            curve = []
            for p in r.get("curve", []):
                curve.append({"step": p["step"], "epoch": p["epoch"], "loss": p["loss"],
                              "selection_score": p["score"],
                              "metrics": evaluate(task, p["answers"], refs,
                                                  data_dir=_settings().data_dir)})
            res["arms"][arm] = {"curve": curve, "train": r.get("train"),
                                "stopped": r.get("stopped"),
                                "config": meta["tasks"][task]["arms"][arm]["config"]}
        recipe[task] = res
        (_local() / f"recipe-{task}.json").write_text(json.dumps(res, indent=1))
        write(f"icmt_recipe_{task}.md", _recipe_report(task, res, blob, len(refs)))
        from benchmarks.bench_icmt_recipe import plot

        plot(task, res, RESULTS / f"icmt_recipe_{task}.png")
    # 2. the full test split, every row through translate() with the device's continuations
    rows = _test_rows(meta, blob, texts)
    from icma.evaluation.quality import load_protocol, write_results

    protocol = load_protocol("chebi20-val-test")
    stem = write_results(protocol, rows, _local() / "quality", {
        "engine": f"transformers on {blob['device']} (bf16 autocast; continuations replayed "
                  f"through icma's serving path here)", "model": "smollm2-135m-instruct",
        "dtype": "float32 master, bf16 autocast", "max_new_tokens": TEST_TOKENS,
        "machine": f"generation: {blob['device']}; retrieval, prompts, answers, metrics: "
                   f"{machine()}", "date": time.strftime("%Y-%m-%d"), "commit": git_commit()})
    for suffix in (".md", ".json", ".png"):
        (RESULTS / f"icmt_full_test{suffix}").write_bytes(stem.with_suffix(suffix).read_bytes())
    # 3. the adapters, with manifests (recipe, data sha256, the test metrics above)
    for task, choice in blob["chosen"].items():
        data = b"".join((args.src / f"adapter-{task}.tar.{i}").read_bytes() for i in (1, 2))
        target = _local() / "adapters" / NAMES[task]
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(target, filter="data")
        manifest = _manifest(task, choice, meta, blob, recipe[task],
                             [r for r in rows if r.task == task])
        (target / "icma-adapter.json").write_text(json.dumps(manifest, indent=1) + "\n")
        print(f"staged {target}")


def _dev_nearest(task: str, n: int) -> dict:
    import benchmarks.bench_icmt_recipe as recipe

    recipe.WORK = WORK / "data"
    return recipe.nearest_neighbour(task, n)


def _recipe_report(task: str, res: dict, blob: dict, n: int) -> str:
    from benchmarks.bench_icmt_recipe import (BASE, DEV, HEADLINE, SPLIT_SEED, _fmt,
                                              curve_table)
    from benchmarks.common import git_commit

    chosen = blob["chosen"].get(task)
    lines = [f"# ICMT recipe on a dev slice: {task}", "",
             f"Trained and decoded on {blob['device']} (torch {blob['torch']}) by "
             f"`benchmarks/icmt_device.py` (icma's training loop; the prompts, training sets "
             f"and metrics are icma's, computed here); commit {git_commit()}.", "",
             f"Protocol: ChEBI-20 validation split cut by a seeded shuffle (seed {SPLIT_SEED}) "
             f"into val-train ({3301 - DEV} pairs: training records and the database their "
             f"contexts and the dev queries retrieve from) and val-dev ({DEV} pairs, never "
             f"trained on); all {n} dev queries, greedy decoding, at most {DEV_TOKENS} new "
             f"tokens, MolT5's metrics, after every epoch of a {EPOCHS}-epoch linear schedule. "
             f"The test split is not used. Shared settings: "
             f"{json.dumps({**BASE, 'batch_size': 4, 'grad_accum': 8})} (effective batch 32, "
             f"as ICMA); each arm changes what its row says.", "",
             f"Selection rule, fixed before the run: the best of the arms "
             f"{', '.join(sorted(CANDIDATES))} (those that serve with the default request's "
             f"prompt and ship as LoRA) by {SELECTION[task]}. Chosen: "
             + (f"**{chosen['arm']} at {chosen['epochs']} epochs**." if chosen else "none."),
             ""]
    lines += curve_table(task, res)
    lines += ["", "Headline metrics per arm at its best epoch (by the first headline metric):",
              "", "| arm | epoch | " + " | ".join(HEADLINE[task]) + " | tokens/s (training) |",
              "| --- | ---: | " + " | ".join("---:" for _ in HEADLINE[task]) + " | ---: |"]
    for arm, data in res["arms"].items():
        if not data["curve"]:
            lines.append(f"| {arm} | (no epoch finished) | |")
            continue
        best = max(data["curve"], key=lambda p: p["metrics"].get(HEADLINE[task][0]) or 0)
        tps = (data.get("train") or {}).get("tokens_per_s")
        lines.append(f"| {arm} | {best['epoch']} | "
                     + " | ".join(_fmt(best["metrics"].get(c)) for c in HEADLINE[task])
                     + f" | {tps:.0f} |" if tps else " | |")
    lines += ["", f"![learning curves](icmt_recipe_{task}.png)", ""]
    return "\n".join(lines)


def _test_rows(meta: dict, blob: dict, texts: dict) -> list:
    """The full-test-split rows: nearest neighbours (icma bench quality's own), then the LLM
    rows answered by replaying the device's continuations through ``translate``."""
    from icma.core.tasks import spec
    from icma.evaluation.metrics import evaluate
    from icma.evaluation.quality import Row, load_protocol, run_quality
    from icma.generation.options import build_options
    from icma.generation.pipeline import translate
    from icma.retrieval import Exclusion
    from icma.retrieval.cache import cached_index
    from icma.retrieval.examples import retrieve_examples
    from icma.tuning.model import load_tokenizer

    settings = _settings()
    protocol = load_protocol("chebi20-val-test")
    rows = run_quality(protocol, settings=settings, llm=False, data_dir=WORK / "data")
    tok = load_tokenizer(str(WORK / "tokenizer"), "smollm2-135m-instruct")
    for task, tm in meta["tasks"].items():
        records = protocol.queries.records
        qs = [r.smiles if task == "mol2cap" else r.description for r in records]
        refs = [r.description if task == "mol2cap" else r.smiles for r in records]
        index = cached_index(spec(task).default_method, protocol.database, WORK / "data",
                             settings=settings)
        shots = retrieve_examples(index, _search(task, qs), spec(task).n_shot,
                                  exclusions=[Exclusion(cids=frozenset([r.cid]))
                                              for r in records])
        chosen = blob["chosen"].get(task)
        plan = [("untuned", "greedy", f"LLM {spec(task).n_shot}-shot, untuned, greedy",
                 shots, None)]
        if chosen:
            plan.append(("naive", "greedy", f"naive SFT (0-shot, {chosen['epochs']} epochs), "
                         "greedy", [[] for _ in qs], "naive"))
            name = NAMES[task]
            plan += [("final", "sample", f"ICMT default {name}, ICMA's sampling", shots,
                      "final"),
                     ("final", "greedy", f"ICMT default {name}, greedy", shots, "final"),
                     ("final", "consensus", f"ICMT default {name}, consensus", shots, "final")]
        for label, decoding, system, ex, source in plan:
            result = blob["finals"].get(f"{task}/{source or 'untuned'}") or {}
            job = f"{label}:{'consensus' if decoding in ('sample', 'consensus') else decoding}"
            passes = result.get("generations", {}).get(job) or []
            if not passes or any(len(p) != len(qs) for p in passes):
                print(f"{task}: no complete continuations for {system}; row left out")
                continue
            prompts = texts[task][job]
            answers = {job: {p: [passes[k][i] for k in range(len(passes))]
                             for i, p in enumerate(prompts)}}
            generation = {"decoding": decoding, "max_new_tokens": TEST_TOKENS}
            if decoding == "consensus":
                generation["num_samples"] = len(passes)
            rec = Recorder(tok, answers, job)
            t0 = time.perf_counter()
            out = translate(task, qs, ex, rec, build_options(
                task, {"n_shot": len(ex[0]), "adapter": "base", "generation": generation}))
            extra = {"completion_tokens": sum(t.completion_tokens for t in out),
                     "stopped_by_length": sum(t.finish_reason == "length" for t in out),
                     "samples": [{"query": t.query, "reference": r, "answer": t.answer}
                                 for t, r in zip(out[:3], refs)],
                     "generated_on": blob["device"]}
            if decoding == "consensus":
                system += f" of {len(passes)}"
                extra["consensus_sample_wins"] = sum(t.consensus.winner.source == "sample"
                                                     for t in out)
            rows.append(Row(task, system, "transformers", "smollm2-135m-instruct",
                            NAMES[task] if source == "final" else
                            (f"naive-sft-{task}" if source == "naive" else None),
                            spec(task).default_method if ex[0] else None, len(ex[0]),
                            len(out), evaluate(task, [t.answer for t in out], refs,
                                               data_dir=settings.data_dir),
                            time.perf_counter() - t0, extra))
            print(f"{task}: {system}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in rows[-1].scores.items()
                if isinstance(v, float)), flush=True)
    return rows


def _manifest(task: str, choice: dict, meta: dict, blob: dict, recipe: dict, rows) -> dict:
    """The shipped adapter's manifest: icma tune's fields, the recipe and how it was chosen,
    the data's sha256, and the full-test-split metrics."""
    from icma import __version__
    from icma.core.prompts import PROMPT_FORMAT_VERSION
    from icma.generation.models import resolve_model
    from icma.tuning.model import folder_checksum
    from icma.tuning.run import MANIFEST_FORMAT, _data_checksum

    tm = meta["tasks"][task]
    arm = choice["arm"]
    cfg = {**tm["arms"][arm]["config"], "name": NAMES[task], "train": "chebi20-validation",
           "epochs": choice["epochs"]}
    key = tm["arms"][arm]["set"].replace("val-train:", "val:")
    seq = _sequences(WORK)
    data = _training_data(seq, tm["sets"][key]["rows"], cfg["train_on_inputs"])
    final = blob["finals"][f"{task}/final"]
    corpora = _corpora()
    base = resolve_model("smollm2-135m-instruct", WORK / "data")
    return {
        "format": MANIFEST_FORMAT, "name": NAMES[task], "task": task, "method": cfg["method"],
        "base_model": "smollm2-135m-instruct", "base_model_sha256": folder_checksum(base),
        "prompt": {"format_version": PROMPT_FORMAT_VERSION, "prime_answer": cfg["prime_answer"],
                   "eos": cfg["eos"], "order": cfg["order"], "n_shot": tm["arms"][arm].get(
                       "shots", 2 if task == "mol2cap" else 4), "cutoff": cfg["cutoff"],
                   "retrieval": "graph" if task == "mol2cap" else "bm25", "random_walk": None},
        "data": {"train": "chebi20-validation", "train_sha256": corpora["val"].checksum,
                 "train_records": len(corpora["val"]), "contexts": "chebi20-validation",
                 "contexts_sha256": corpora["val"].checksum,
                 "training_set_sha256": _data_checksum(data), **tm["sets"][key]["stats"]},
        "hyperparameters": cfg,
        "recipe": {"chosen_arm": arm, "epochs": choice["epochs"],
                   "selection": SELECTION[task], "candidates": sorted(CANDIDATES),
                   "dev": "val-dev (300 pairs of the validation split, seed 20261127); "
                          "benchmarks/results/icmt_recipe_" + task + ".md",
                   "dev_curve": [{"epoch": p["epoch"], **{k: p["metrics"].get(k) for k in
                                                         ("bleu4", "rougeL", "meteor",
                                                          "exact_match", "validity",
                                                          "maccs_fts") if k in p["metrics"]}}
                                 for p in recipe["arms"].get(arm, {}).get("curve", [])]},
        "training": {"steps": final.get("train", {}).get("steps"),
                     "epochs": choice["epochs"], "first_loss": final["losses"][0],
                     "final_loss": final["losses"][-1], "losses": final["losses"],
                     "tokens": final.get("train", {}).get("tokens"),
                     "wall_s": final.get("train", {}).get("wall_s"),
                     "device": blob["device"], "precision": "bfloat16"},
        "evaluation": {"split": "chebi20-test (val -> test, each query's CID excluded)",
                       "n": rows[0].n if rows else None,
                       "rows": {r.system: r.scores for r in rows},
                       "results": "benchmarks/results/icmt_full_test.md"},
        "icma_version": __version__, "created": time.time(),
    }




# --- entry ---------------------------------------------------------------------------------------

def main() -> None:
    global WORK
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="here: training sets and prompts into .device-icmt/")
    p.add_argument("--tasks", default="mol2cap,cap2mol")
    p.add_argument("--limit", type=int, default=SWEEP_RECORDS,
                   help="val-train records the sweep trains on")
    p.add_argument("--final-limit", type=int, default=None,
                   help="validation records the final runs train on (smoke runs; default all)")
    p.add_argument("--dev", type=int, default=300)
    p.add_argument("--test", type=int, default=None, help="test queries (default: all)")
    d = sub.add_parser("device", help="there: train, select, generate into $OUT")
    d.add_argument("--deadline", type=float, default=540, help="seconds for the whole run")
    d.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "device-out")))
    d.add_argument("--device", default="cuda")
    d.add_argument("--epochs", type=int, default=EPOCHS)
    d.add_argument("--arms", default="", help="only these arms (smoke runs; default: all)")
    d.add_argument("--final-only", default="",
                   help="TASK:ARM:EPOCHS: no sweep, that run on all of val and its test answers")
    d.add_argument("--sweep-share", type=float, default=0.4,
                   help="share of the deadline the sweep may take")
    a = sub.add_parser("arm", help=argparse.SUPPRESS)  # one process of `device`
    for name in ("--task", "--arm", "--split", "--result", "--tmp", "--device"):
        a.add_argument(name, required=True)
    a.add_argument("--epochs", type=float, required=True)
    a.add_argument("--stop-at", type=float, required=True)
    a.add_argument("--generate", default="")
    a.add_argument("--save-adapter", action="store_true")
    c = sub.add_parser("collect", help="here: adapters, metrics and result tables")
    c.add_argument("--from", dest="src", type=Path, required=True)
    for q in (p, d, a, c):
        q.add_argument("--work", type=Path, default=WORK)
    args = ap.parse_args()
    WORK = args.work
    {"pack": pack, "device": device, "arm": run_arm, "collect": collect}[args.cmd](args)


if __name__ == "__main__":
    main()
