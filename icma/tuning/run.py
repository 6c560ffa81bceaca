"""One ICMT run end to end: check everything, build the examples, train, save, register, evaluate.

Every check that can fail on the user's input runs before the first training step: the config,
the name (free in the registry), the base model and tokenizer, the corpora, the device and
precision, the LoRA targets, and the training set itself (at least one example must fit the
cutoff). A run lives in ``<data_dir>/tuning/<name>/`` (config, checkpoints, evaluation output);
a rerun of the same name and settings resumes from its last checkpoint. The result is a peft
adapter in the registry (``<adapters_dir>/<name>/``) or, for full fine-tuning, a model folder in
``<data_dir>/models/<name>/``, each with the manifest ``icma-adapter.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from icma import __version__
from icma.generation.adapters import MANIFEST
from icma.core.errors import InputError
from icma.core.filelock import locked
from icma.core.prompts import PROMPT_FORMAT_VERSION
from icma.core.settings import Settings
from icma.tuning.config import TuneConfig
from icma.tuning.loop import ProgressFn, train
from icma.tuning.model import (
    config_eos_id,
    count_parameters,
    folder_checksum,
    load_model,
    load_tokenizer,
    pick_device,
    pick_precision,
    write_json,
)
from icma.tuning.sources import Sources

log = logging.getLogger(__name__)
MANIFEST_FORMAT = "icma-adapter/1"
#: What an interrupted run leaves: a checkpoint or a model being saved (globs under the data
#: directory), an adapter being saved (under the adapters directory); see icma.core.tempfiles.
TEMP_PATTERNS = ("tuning/*/checkpoints/.step-*.tmp", "models/.*.saving")
ADAPTER_TEMP_PATTERNS = (".*.saving",)


class Plan:
    """Where a run's files go."""

    def __init__(self, cfg: TuneConfig, data_dir: Path, adapters_dir: Path):
        self.run_dir = data_dir / "tuning" / cfg.name
        self.target = (adapters_dir if cfg.method == "lora" else data_dir / "models") / cfg.name


def tune(cfg: TuneConfig, *, settings: Settings, data_dir: str | Path | None = None,
         adapters_dir: str | Path | None = None, on_progress: ProgressFn | None = None,
         should_stop: Callable[[], bool] | None = None, restart: bool = False,
         sources: Sources | None = None, executor: str = "local", num_workers: int = 2,
         use_gpu: bool = False, ray_address: str | None = None) -> dict:
    """Run ``cfg`` to its end; returns the manifest. Raises InputError (before any training)
    for anything wrong with the input, ``Stopped`` when ``should_stop`` ended it early.
    ``data_dir`` and ``adapters_dir`` default to the settings'; the shipped base model is
    converted into the settings' data directory, the engine that evaluates loads with them.
    ``sources`` is the rule for the corpora and the base model (default: the command line's,
    local paths allowed; a tune job passes its own). ``executor`` ``ray``: the loop on
    ``num_workers`` Ray Train workers (``icma.tuning.ray_train``; on GPUs with ``use_gpu``) of
    the cluster at ``ray_address``; the result is saved as a local run's is."""
    if executor not in ("local", "ray"):
        raise InputError(f"unknown executor {executor!r}; use local or ray", field="executor")
    if num_workers < 1:
        raise InputError("must be at least 1", field="num_workers")
    distributed = {"num_workers": num_workers, "use_gpu": use_gpu,
                   "ray_address": ray_address} if executor == "ray" else None
    data_dir = Path(data_dir or settings.data_dir)
    sources = sources or Sources(data_dir, settings.data_dir,
                                 allow_downloads=settings.allow_model_downloads)
    plan = Plan(cfg, data_dir, Path(adapters_dir or settings.adapters_path()))
    report = on_progress or (lambda p: None)
    if plan.target.exists():
        what = "an adapter" if cfg.method == "lora" else "a model"
        raise InputError(f"{what} named {cfg.name!r} exists already; choose another name or "
                         f"delete it", field="name")
    try:
        with locked(data_dir / "tuning" / f".{cfg.name}.lock", wait=False):
            return _tune(cfg, data_dir, plan, report, should_stop, restart, settings, sources,
                         distributed)
    except BlockingIOError:
        raise InputError(f"a run named {cfg.name!r} is in progress already", field="name") \
            from None


def check_sources(cfg: TuneConfig, sources: Sources) -> None:
    """The quick checks of a run's inputs (the base model resolves, each corpus exists), for
    refusing a tune job when it is submitted; ``tune`` checks everything again, in depth."""
    sources.check(cfg)


def _tune(cfg, data_dir: Path, plan: Plan, report: ProgressFn, should_stop, restart,
          settings: Settings, sources: Sources, distributed: dict | None = None) -> dict:
    import torch

    from icma.retrieval.cache import cached_index
    from icma.core.rerank import RerankConfig
    from icma.retrieval import ExclusionRule
    from icma.tuning.data import Tokens, build_training_set

    started = time.time()
    report({"phase": "checking"})
    device = pick_device(cfg.device)
    precision = pick_precision(cfg.precision, device)
    base_path = sources.base_model(cfg.base_model)
    tokenizer = load_tokenizer(base_path, cfg.base_model)
    tokens = Tokens(tokenizer, cfg.eos, config_eos_id(base_path))
    train_corpus = sources.open_corpus(cfg.train, "train")
    records = train_corpus.records[:cfg.train_limit] if cfg.train_limit else train_corpus.records
    ctx_corpus = (train_corpus if cfg.contexts is None
                  else sources.open_corpus(cfg.contexts, "contexts"))
    eval_corpus = sources.open_corpus(cfg.eval, "eval") if cfg.eval else None
    if restart:
        shutil.rmtree(plan.run_dir / "checkpoints", ignore_errors=True)

    report({"phase": "retrieving contexts", "records": len(records),
            "context_records": len(ctx_corpus)})
    index = cached_index(cfg.method_for_contexts, ctx_corpus, data_dir, settings=settings)
    rerank = (RerankConfig() if cfg.random_walk is None else
              RerankConfig(method="random_walk", skip_prob=cfg.random_walk.skip_probability,
                           seed=cfg.random_walk.seed))
    rule = ExclusionRule(self_cid=True, same_structure=cfg.exclude_same_structure,
                         same_caption=cfg.exclude_same_caption)
    data = build_training_set(cfg.task, records, index, tokens, n_shot=cfg.shots,
                              cutoff=cfg.cutoff, prime_answer=cfg.prime_answer, order=cfg.order,
                              rerank=rerank, rule=rule, train_on_inputs=cfg.train_on_inputs)
    if not data.examples:
        why = data.skipped[0][1] if data.skipped else "no records"
        raise InputError(f"no training example fits: {len(data.skipped)} of {len(records)} "
                         f"skipped (first: {why})", field="cutoff")
    stats = data.stats()
    if data.skipped:
        log.warning("%d of %d records skipped (first: %s)", len(data.skipped), len(records),
                    data.skipped[0][1])
    data_sha = _data_checksum(data.examples)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    write_json(plan.run_dir / "config.json", cfg.model_dump(mode="json"))
    _write_preview(plan.run_dir / "examples-preview.jsonl", data.examples[:20])

    report({"phase": "loading model", **stats})
    fingerprint = {**cfg.fingerprint(), "data_sha256": data_sha,
                   "base_model_sha256": folder_checksum(base_path)}
    if distributed:
        from icma.tuning.model import trainable
        from icma.tuning.ray_train import train_on_ray

        on = "cuda" if distributed["use_gpu"] else "cpu"
        precision = pick_precision(cfg.precision, on)
        report({"phase": "training on Ray", "workers": distributed["num_workers"]})
        result, weights = train_on_ray(data.examples, cfg, plan.run_dir, base_path=base_path,
                                       precision=precision, pad_id=tokenizer.pad_token_id,
                                       fingerprint=fingerprint, **distributed)
        torch.manual_seed(cfg.seed)
        net = load_model(cfg, base_path, "cpu", "float32")  # to save what the workers trained
        with torch.no_grad():
            for k, v in trainable(net).items():
                v.copy_(weights[k])
        trained_on = f"ray: {distributed['num_workers']} x {on}"
    else:
        torch.manual_seed(cfg.seed)  # LoRA's random initialisation
        net = load_model(cfg, base_path, device, precision)
        result = train(net, data.examples, cfg, plan.run_dir, device=device,
                       precision=precision, pad_id=tokenizer.pad_token_id,
                       fingerprint=fingerprint, on_progress=report, should_stop=should_stop)
        trained_on = device

    report({"phase": "saving"})
    manifest = {
        "format": MANIFEST_FORMAT, "name": cfg.name, "task": cfg.task, "method": cfg.method,
        "base_model": cfg.base_model, "base_model_path": base_path,
        "base_model_sha256": fingerprint["base_model_sha256"],
        "prompt": {"format_version": PROMPT_FORMAT_VERSION, "prime_answer": cfg.prime_answer,
                   "eos": cfg.eos, "order": cfg.order, "n_shot": cfg.shots,
                   "cutoff": cfg.cutoff, "retrieval": cfg.method_for_contexts,
                   "random_walk": cfg.random_walk.model_dump() if cfg.random_walk else None},
        "data": {"train": cfg.train, "train_sha256": train_corpus.checksum,
                 "train_records": len(records), "contexts": cfg.contexts or cfg.train,
                 "contexts_sha256": ctx_corpus.checksum, "training_set_sha256": data_sha,
                 **stats},
        "hyperparameters": cfg.model_dump(mode="json"),
        "training": {"steps": result.steps, "epochs": round(result.steps * cfg.grad_accum
                                                            * cfg.batch_size / len(data.examples), 3),
                     "first_loss": result.losses[0], "final_loss": result.losses[-1],
                     "losses": result.losses, "tokens": result.tokens, "wall_s": result.wall_s,
                     "resumed_from_step": result.resumed_from, "this_session": result.session,
                     "device": trained_on, "precision": precision,
                     "parameters": count_parameters(net)},
        "evaluation": None, "icma_version": __version__, "created": time.time(),
    }
    _save(net, tokenizer, cfg, plan.target, manifest)
    del net
    if eval_corpus is not None:
        report({"phase": "evaluating"})
        manifest["evaluation"] = {
            **evaluate_adapter(cfg, plan, eval_corpus, index, base_path, device, report,
                               settings),
            "split_sha256": eval_corpus.checksum}
        write_json(plan.target / MANIFEST, manifest)
    manifest["wall_s"] = time.time() - started
    write_json(plan.run_dir / "result.json", manifest)
    report({"phase": "done", "adapter": cfg.name})
    return manifest


def _save(net, tokenizer, cfg: TuneConfig, target: Path, manifest: dict) -> None:
    """Into a hidden folder beside the target, renamed into place: the registry lists only
    complete adapters (it skips names starting with a dot)."""
    tmp = target.parent / f".{target.name}.saving"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if cfg.method == "lora":
        net.save_pretrained(str(tmp))
    else:
        net.config.use_cache = True
        net.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    write_json(tmp / MANIFEST, manifest)
    tmp.rename(target)


def evaluate_adapter(cfg: TuneConfig, plan: Plan, corpus, index, base_path: str, device: str,
                     report: ProgressFn, settings: Settings) -> dict:
    """The evaluation split through the serving path (retrieval with the same options, the
    prompt, the transformers engine with the adapter), scored by ``icma.evaluation.metrics``."""
    from icma.evaluation.metrics import evaluate
    from icma.generation.engines import Adapter, load_engine
    from icma.generation.options import build_options
    from icma.generation.pipeline import run_batch
    from icma.generation.retrievers import IndexRetriever
    from icma.evaluation.predictions import result_line
    from icma.tuning.data import answer_side

    records = corpus.records[:cfg.eval_limit] if cfg.eval_limit else corpus.records
    if cfg.method == "lora":
        engine = load_engine("transformers", settings=settings, model=base_path, device=device)
        adapter = Adapter(cfg.name, plan.target)
    else:
        engine = load_engine("transformers", settings=settings, model=str(plan.target),
                             device=device)
        adapter = None
    # Served as a request would be: the prompt form the adapter is tuned on, the same retrieval.
    options = build_options(cfg.task, {
        "n_shot": cfg.shots, "prime_answer": cfg.prime_answer, "order": cfg.order,
        "cutoff": cfg.cutoff,
        "generation": {"decoding": cfg.eval_decoding, "max_new_tokens": cfg.eval_max_new_tokens,
                       **({"num_samples": cfg.eval_num_samples}
                          if cfg.eval_num_samples is not None else {})},
        "retrieval": {"method": cfg.method_for_contexts,
                      "random_walk": cfg.random_walk and cfg.random_walk.model_dump()}},
        adapter=adapter)
    retriever = IndexRetriever({cfg.method_for_contexts: index})
    lines, t0 = [], time.perf_counter()
    batch = settings.job_batch_size
    for lo in range(0, len(records), batch):
        chunk = records[lo:lo + batch]
        pairs = [answer_side(cfg.task, r) for r in chunk]
        # The batch's CIDs are excluded, in case the evaluation split overlaps the contexts.
        opts = replace(options, retrieval=replace(options.retrieval,
                                                  exclude_cids=tuple(r.cid for r in chunk)))
        outs = run_batch(cfg.task, [q for q, _ in pairs], opts, retriever, engine)
        for i, (r, (q, ref), o) in enumerate(zip(chunk, pairs, outs)):
            lines.append(result_line(cfg.task, lo + i, q, id=r.cid, reference=ref, outcome=o))
        report({"phase": "evaluating", "done": min(lo + batch, len(records)),
                "total": len(records), "elapsed_s": time.perf_counter() - t0})
    engine.close()
    out_file = plan.run_dir / "eval.jsonl"
    out_file.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    preds = [x["prediction"] for x in lines]
    refs = [x["reference"] for x in lines]
    result = {"split": cfg.eval, "n": len(lines), "decoding": cfg.eval_decoding,
              "num_samples": options.params.num_samples,
              "max_new_tokens": cfg.eval_max_new_tokens, "predictions": str(out_file),
              "errors": sum(1 for x in lines if x.get("error")),
              "wall_s": time.perf_counter() - t0}
    try:
        result["metrics"] = evaluate(cfg.task, preds, refs, data_dir=settings.data_dir)
    except Exception as exc:  # metrics need WordNet etc.; the adapter is good all the same
        log.exception("evaluation metrics failed")
        result["metrics"] = None
        result["metrics_error"] = str(exc)
    return result


def _data_checksum(examples) -> str:
    import hashlib

    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.input_ids, e.labels]).encode())
    return h.hexdigest()


def _write_preview(path: Path, examples) -> None:
    path.write_text("".join(json.dumps({"cid": e.cid, "prompt": e.prompt,
                                        "completion": e.completion,
                                        "tokens": len(e.input_ids)}, ensure_ascii=False) + "\n"
                            for e in examples))
