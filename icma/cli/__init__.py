"""The ``icma`` command line. Every user error ends in one line naming the problem, exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from icma import __version__
from icma.core.errors import IcmaError, InputError

EMBEDDED = "embedded"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except IcmaError as exc:
        print(f"icma: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("icma: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `icma retrieve ... | head`
        return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="icma", description="ICMA molecule <-> caption translation")
    p.add_argument("--version", action="version", version=f"icma {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress and decisions")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    # index
    idx = sub.add_parser("index", help="build or inspect retrieval indexes")
    isub = idx.add_subparsers(dest="index_command", metavar="ACTION")
    b = isub.add_parser("build", help="build an index over a corpus and save it")
    b.add_argument("--corpus", required=True,
                   help=f"TSV/JSONL corpus file, or '{EMBEDDED}' for the shipped ChEBI-20")
    b.add_argument("--kind", required=True,
                   help="graph | morgan | rdkit | bm25 | sentence | random")
    b.add_argument("--out", required=True, type=Path, help="directory to save the index in")
    b.add_argument("--encoder", help="graph: shipped encoder name or .pth path")
    b.add_argument("--arch", help="graph: gin | gcn | gat | graphsage, if the file name does not say")
    b.add_argument("--ivf-nlist", type=int, help="graph: IVF clusters (approximate; large corpora)")
    b.add_argument("--model", help="sentence: local model folder (default all-MiniLM-L6-v2)")
    b.add_argument("--seed", type=int, help="random: seed")
    b.add_argument("--strict", action="store_true", help="fail on any malformed row or bad SMILES")
    b.set_defaults(func=cmd_index_build)
    info = isub.add_parser("info", help="print an index's manifest")
    info.add_argument("directory", type=Path)
    info.set_defaults(func=cmd_index_info)

    # retrieve
    r = sub.add_parser("retrieve", help="top-k neighbours for every query in a corpus file")
    r.add_argument("--index", required=True, type=Path)
    r.add_argument("--queries", required=True, type=Path,
                   help="corpus file; molecule indexes read SMILES, bm25 the description")
    r.add_argument("--k", type=int, default=10)
    r.add_argument("--exclude-self", action="store_true", help="drop each query's own CID")
    r.add_argument("--exclude-same-structure", action="store_true",
                   help="drop neighbours with the query's canonical SMILES")
    r.add_argument("--exclude-same-caption", action="store_true",
                   help="drop neighbours with the query's exact caption")
    r.add_argument("--format", choices=["neighbours", "json"], default="neighbours",
                   help="neighbours: ICMA's query_CID<TAB>neighbour_CID<TAB>score lines")
    r.add_argument("--output", type=Path, help="write here instead of standard output")
    r.set_defaults(func=cmd_retrieve)

    # prompt
    pr = sub.add_parser("prompt", help="print an assembled ICMA prompt for one query")
    pr.add_argument("--task", required=True, choices=["mol2cap", "cap2mol"])
    q = pr.add_mutually_exclusive_group(required=True)
    q.add_argument("--smiles", help="mol2cap query")
    q.add_argument("--caption", help="cap2mol query")
    pr.add_argument("--index", type=Path,
                    help="saved index (default: the embedded corpus, graph or bm25 by task)")
    pr.add_argument("--n-shot", type=int, help="examples (default: 2 mol2cap, 4 cap2mol)")
    pr.add_argument("--order", choices=["reversed", "ranked"], default="reversed")
    pr.add_argument("--rerank", choices=["top", "random_walk", "bucket"], default="top")
    pr.add_argument("--skip-prob", type=float, default=0.0, help="random walk skip probability")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--bucket-start", type=int, default=0)
    pr.add_argument("--exclude-cid", action="append", default=[], help="never use this CID")
    pr.add_argument("--prime-answer", action="store_true",
                    help="end with the answer marker (for models not tuned on ICMA prompts)")
    pr.add_argument("--tokenizer", type=Path, help="local tokenizer folder for the token budget")
    pr.add_argument("--cutoff", type=int, default=2048, help="token budget of the whole sequence")
    pr.add_argument("--reserve", type=int, default=256, help="tokens kept free for the answer")
    pr.add_argument("--json", action="store_true", help="print the prompt with its examples")
    pr.set_defaults(func=cmd_prompt)

    # corpus
    c = sub.add_parser("corpus", help="check corpus files")
    csub = c.add_subparsers(dest="corpus_command", metavar="ACTION")
    v = csub.add_parser("validate", help="report malformed rows, bad SMILES, duplicate CIDs")
    v.add_argument("path", type=Path)
    v.add_argument("--strict", action="store_true", help="exit non-zero on any problem")
    v.set_defaults(func=cmd_corpus_validate)

    # download
    d = sub.add_parser("download", help="fetch the full public splits (needs internet)")
    d.add_argument("dataset", help="chebi20 | pubchem324k | pubchem324k-iupac")
    d.add_argument("--to", required=True, type=Path)
    d.add_argument("--base-url", help="mirror to fetch from instead of the public host")
    d.set_defaults(func=cmd_download)

    # serve
    sv = sub.add_parser("serve", help="run a service")
    svsub = sv.add_subparsers(dest="service", metavar="SERVICE")
    rs = svsub.add_parser("retrieval", help="the retrieval microservice (FastAPI + uvicorn)")
    rs.add_argument("--host", default="127.0.0.1")
    rs.add_argument("--port", type=int, default=8001)
    rs.add_argument("--workers", type=int, default=None,
                    help="worker processes sharing the port (default ICMA_WORKERS, 1); one per "
                         "core uses every core")
    rs.add_argument("--log-level", default="info")
    rs.set_defaults(func=cmd_serve_retrieval)
    ws = svsub.add_parser("worker", help="the translation worker: /mol2cap, /cap2mol, jobs")
    ws.add_argument("--host", default="127.0.0.1")
    ws.add_argument("--port", type=int, default=8000)
    ws.add_argument("--retrieval-url", help="the retrieval service (default ICMA_RETRIEVAL_URL, "
                                            "http://127.0.0.1:8001)")
    ws.add_argument("--engine", help="transformers | vllm | nearest-neighbour (ICMA_ENGINE)")
    ws.add_argument("--model", help="LLM folder or hub id (ICMA_LLM_MODEL; default the shipped "
                                    "SmolLM2-135M-Instruct)")
    ws.add_argument("--log-level", default="info")
    ws.set_defaults(func=cmd_serve_worker)
    sa = svsub.add_parser("all", help="both services, started in order, with example requests")
    sa.add_argument("--host", default="127.0.0.1")
    sa.add_argument("--retrieval-port", type=int, default=8001)
    sa.add_argument("--port", type=int, default=8000, help="the worker's port")
    sa.add_argument("--engine", help="transformers | vllm | nearest-neighbour (ICMA_ENGINE)")
    sa.add_argument("--model", help="LLM folder or hub id (ICMA_LLM_MODEL)")
    sa.add_argument("--once", action="store_true",
                    help="stop after the example requests (a smoke test)")
    sa.set_defaults(func=cmd_serve_all)

    # translate
    tr = sub.add_parser(
        "translate", help="translate a file (the worker's job path, in this process)",
        description="Translate every input of a file with retrieved examples and an LLM; writes "
                    "JSON lines in input order (icma eval --format jsonl reads them). An "
                    "interrupted run resumes where it stopped when run again with the same "
                    "arguments.")
    tr.add_argument("--task", required=True, choices=["mol2cap", "cap2mol"])
    tr.add_argument("--input", required=True, type=Path,
                    help="JSONL ({input, id, reference} or {cid, smiles, description}) or a "
                         "corpus TSV (CID SMILES description)")
    tr.add_argument("--output", required=True, type=Path, help="JSON lines, one per input")
    tr.add_argument("--format", choices=["jsonl", "tsv"],
                    help="input format (default: from the extension; .jsonl -> jsonl)")
    tr.add_argument("--engine", help="transformers | vllm | nearest-neighbour (ICMA_ENGINE)")
    tr.add_argument("--model", help="LLM folder or hub id (default ICMA_LLM_MODEL)")
    tr.add_argument("--adapter", help="LoRA adapter: a folder, or a name in the registry")
    tr.add_argument("--n-shot", type=int, help="examples per prompt (default 2 / 4)")
    tr.add_argument("--method", help="retrieval: graph|morgan|rdkit|random (mol2cap), "
                                     "bm25|sentence|random (cap2mol)")
    tr.add_argument("--corpus", help="retrieval corpus name (default: the embedded ChEBI-20)")
    tr.add_argument("--retrieval-url",
                    help="use this retrieval service; default: local indexes in the data dir")
    tr.add_argument("--decoding", choices=["sample", "greedy", "beam"], default="sample")
    tr.add_argument("--max-new-tokens", type=int, default=256)
    tr.add_argument("--seed", type=int, default=42)
    tr.add_argument("--num-candidates", type=int, default=1,
                    help="cap2mol: sample until a valid molecule, at most this many")
    tr.add_argument("--prime-answer", choices=["auto", "on", "off"], default="auto",
                    help="end prompts with the answer marker (auto: on unless --adapter)")
    tr.add_argument("--batch-size", type=int, help="items per engine call (ICMA_JOB_BATCH_SIZE)")
    tr.set_defaults(func=cmd_translate)

    # tune
    tu = sub.add_parser(
        "tune", help="in-context molecule tuning: LoRA or full fine-tuning on retrieved prompts",
        description="Tune an LLM on ICMA prompts built from a training corpus, each with "
                    "examples retrieved from the corpus itself (its own CID excluded), exactly "
                    "as the worker builds them when serving. Settings come from --config "
                    "(JSON, TOML or YAML) and the flags below, flags winning. The adapter is "
                    "saved into the registry (ICMA_ADAPTERS_DIR) under --name, with a manifest, "
                    "and served by the worker at once. Ctrl-C checkpoints and stops; running "
                    "the same command again resumes.")
    tu.add_argument("--config", type=Path, help="settings file (.json, .toml, .yaml)")
    tu.add_argument("--restart", action="store_true",
                    help="discard this name's checkpoints instead of resuming from them")
    tu.add_argument("--data-dir", type=Path, help="default ICMA_DATA_DIR")
    tu.add_argument("--adapters-dir", type=Path, help="default ICMA_ADAPTERS_DIR")
    tu.add_argument("--json", action="store_true", help="print the manifest as JSON at the end")
    tu.add_argument("--job", help=argparse.SUPPRESS)  # the worker's tune jobs: this job's id
    tu.add_argument("--jobs-db", type=Path, help=argparse.SUPPRESS)
    _config_flags(tu)
    tu.set_defaults(func=cmd_tune)

    # openapi
    oa = sub.add_parser("openapi", help="write the services' OpenAPI document")
    oa.add_argument("--out", type=Path, default=Path("openapi.yaml"))
    oa.set_defaults(func=cmd_openapi)

    # eval
    from icma.evaluation.predictions import FORMATS_HELP

    ev = sub.add_parser(
        "eval", help="score predictions with MolT5's metrics",
        description="Score model outputs with MolT5's metrics (MolT5's evaluation scripts).\n"
                    "  mol2cap: BLEU-2/4 and METEOR on SciBERT word pieces, ROUGE-1/2/L.\n"
                    "  cap2mol: character BLEU, exact match (InChI), Levenshtein, validity,\n"
                    "           MACCS/RDK/Morgan Tanimoto, FCD.\n"
                    "Text2Mol is not computed: its weights are not available.",
        epilog=FORMATS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("task", choices=["mol2cap", "cap2mol"])
    ev.add_argument("--predictions", required=True, type=Path, help="the file to score")
    ev.add_argument("--format", choices=["molt5", "jsonl"],
                    help="file format (default: from the extension)")
    ev.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    ev.add_argument("--no-fcd", action="store_true",
                    help="cap2mol: skip FCD (ChemNet needs a few minutes per 3,000 pairs on "
                         "2 CPU cores)")
    ev.set_defaults(func=cmd_eval)

    # bench
    bn = sub.add_parser("bench", help="benchmarks that write results files")
    bsub = bn.add_subparsers(dest="bench", metavar="BENCHMARK")
    bq = bsub.add_parser(
        "quality", help="end-to-end quality: retrieval -> prompt -> engine -> MolT5 metrics",
        description="Nearest-neighbour baselines per retrieval method (every test query), the "
                    "LLM with retrieved examples and zero-shot (the first --limit queries), and "
                    "the LLM with each --adapter; writes quality-PROTOCOL.md/.json, and .png "
                    "with matplotlib (pip install 'icma[plots]').")
    bq.add_argument("--protocol", required=True, help="chebi20-val-test | pubchem324k-iupac")
    bq.add_argument("--data", type=Path,
                    help="folder with the protocol's split files (pubchem324k-iupac: train.txt "
                         "and test.txt, from `icma download`; default for ChEBI-20: shipped)")
    bq.add_argument("--limit", type=int, default=300, help="test queries for LLM rows (300)")
    bq.add_argument("--queries", type=int,
                    help="use only the first N test queries in every row (a smoke run)")
    bq.add_argument("--tasks", default="mol2cap,cap2mol", help="comma-separated (both)")
    bq.add_argument("--engine", default="transformers", help="engine for LLM rows")
    bq.add_argument("--model", help="LLM (default: ICMA_LLM_MODEL, the shipped SmolLM2)")
    bq.add_argument("--adapter", action="append", default=[],
                    help="a tuned LoRA adapter folder (repeatable): one more row each")
    bq.add_argument("--dtype", help="LLM weights: float32 | bfloat16 (default ICMA_LLM_DTYPE)")
    bq.add_argument("--max-new-tokens", type=int, default=256, help="per answer (ICMA: 256)")
    bq.add_argument("--no-llm", action="store_true", help="nearest-neighbour rows only")
    bq.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot rows")
    bq.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                    help="results folder (default benchmarks/results)")
    bq.set_defaults(func=cmd_bench_quality)

    # demo
    dm = sub.add_parser("demo", help="index the embedded corpus (cached) and show retrieval")
    dm.add_argument("--data-dir", type=Path, help="where to cache indexes (default ICMA_DATA_DIR)")
    dm.set_defaults(func=cmd_demo)
    return p


# --- commands ----------------------------------------------------------------------------------

def _load_corpus(spec: str, **kw):
    from icma.core.corpus import embedded_corpus, read_corpus

    if spec == EMBEDDED:
        return embedded_corpus(), None
    return read_corpus(spec, **kw)


def _report(report) -> None:
    if report is None:
        return
    print(report.summary(), file=sys.stderr)
    for line in report.details(5):
        print(f"  {line}", file=sys.stderr)


def cmd_index_build(args) -> int:
    from icma.retrieval import build_index, index_class

    cls = index_class(args.kind)  # unknown kinds and misplaced flags fail before any work
    flags = {"--encoder": ("graph", args.encoder), "--arch": ("graph", args.arch),
             "--ivf-nlist": ("graph", args.ivf_nlist), "--model": ("sentence", args.model),
             "--seed": ("random", args.seed)}
    for flag, (kind, value) in flags.items():
        if value is not None and args.kind != kind:
            raise InputError(f"{flag} applies to {kind} indexes only")
    on_invalid = "keep" if cls.modality == "caption" else "skip"
    corpus, report = _load_corpus(args.corpus, on_invalid=on_invalid, strict=args.strict)
    _report(report)
    params = {f[2:].replace("-", "_"): v for f, (_, v) in flags.items() if v is not None}
    t0 = time.perf_counter()
    index = build_index(args.kind, corpus, **params)
    index.save(args.out)
    print(f"built {args.kind} index over {len(corpus)} records in "
          f"{time.perf_counter() - t0:.1f} s -> {args.out}", file=sys.stderr)
    return 0


def cmd_index_info(args) -> int:
    from icma.retrieval import read_manifest

    print(json.dumps(read_manifest(args.directory), indent=2))
    return 0


def cmd_retrieve(args) -> int:
    from icma.core.corpus import read_corpus
    from icma.retrieval import ExclusionRule, load_index

    index = load_index(args.index)
    on_invalid = "keep" if index.modality == "caption" else "skip"
    queries, report = read_corpus(args.queries, on_invalid=on_invalid)
    if report.invalid_smiles or report.malformed or report.empty_descriptions:
        _report(report)
    rule = ExclusionRule(self_cid=args.exclude_self, same_structure=args.exclude_same_structure,
                         same_caption=args.exclude_same_caption)
    texts = [index.query_text(r) for r in queries.records]
    exclusions = [rule.for_record(r) for r in queries.records]
    results = index.search(texts, args.k, exclusions)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for rec, hits in zip(queries.records, results):
            if args.format == "neighbours":
                for h in hits:
                    out.write(f"{rec.cid}\t{h.cid}\t{h.score!r}\n")
            else:
                out.write(json.dumps({"cid": rec.cid, "query": index.query_text(rec),
                                      "neighbours": [{"cid": h.cid, "score": h.score, "rank": i}
                                                     for i, h in enumerate(hits)]},
                                     ensure_ascii=False) + "\n")
    finally:
        if args.output:
            out.close()
    return 0


def cmd_prompt(args) -> int:
    from icma.retrieval.examples import retrieve_examples
    from icma.core.prompts import build_prompt, hf_token_counter
    from icma.core.rerank import RerankConfig
    from icma.retrieval import Exclusion, load_index
    from icma.retrieval.cache import cached_index

    task = args.task
    query = args.smiles if task == "mol2cap" else args.caption
    if query is None:
        need = "--smiles" if task == "mol2cap" else "--caption"
        raise InputError(f"task {task} takes its query from {need}", field=need)
    if args.index:
        index = load_index(args.index)
    else:
        index = cached_index("graph" if task == "mol2cap" else "bm25")
    want = "molecule" if task == "mol2cap" else "caption"
    if index.modality != want:
        raise InputError(f"{task} retrieves by {want}, but {args.index} is a {index.kind} index "
                         f"over {index.modality}s", field="index")
    n_shot = args.n_shot if args.n_shot is not None else (2 if task == "mol2cap" else 4)
    rerank = RerankConfig(method=args.rerank, skip_prob=args.skip_prob, seed=args.seed,
                          bucket_start=args.bucket_start)
    excl = Exclusion(cids=frozenset(args.exclude_cid)) if args.exclude_cid else None
    examples = retrieve_examples(index, [query], n_shot, rerank=rerank, exclusions=[excl])[0]
    counter = None
    if args.tokenizer:
        counter = hf_token_counter(_load_tokenizer(args.tokenizer))
    prompt = build_prompt(task, query, examples, order=args.order, prime_answer=args.prime_answer,
                          count_tokens=counter, cutoff=args.cutoff, reserve=args.reserve)
    if args.json:
        print(json.dumps({
            "prompt": prompt.text, "n_tokens": prompt.n_tokens, "n_requested": prompt.n_requested,
            "examples": [vars(e) for e in prompt.examples],
            "dropped_for_budget": [e.cid for e in prompt.dropped]}, indent=2, ensure_ascii=False))
    else:
        print(prompt.text)
    return 0


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not folder.is_dir():
        raise InputError(f"no tokenizer folder at {folder}", field="--tokenizer")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types for an unusable folder
        raise InputError(f"cannot load a tokenizer from {folder}: {exc}",
                         field="--tokenizer") from None


def cmd_corpus_validate(args) -> int:
    from icma.core.corpus import read_corpus

    corpus, report = read_corpus(args.path, on_invalid="keep")
    print(report.summary())
    for line in report.details(20):
        print(f"  {line}")
    problems = (report.malformed or report.invalid_smiles or report.empty_descriptions
                or report.duplicate_cids)
    return 1 if args.strict and problems else 0


def cmd_download(args) -> int:
    from icma.evaluation.download import download

    download(args.dataset, args.to, base_url=args.base_url,
             log=lambda m: print(m, file=sys.stderr))
    print(f"{args.dataset} -> {args.to}")
    return 0


def cmd_serve_retrieval(args) -> int:
    from icma.server.supervisor import serve
    from icma.core.settings import get_settings

    workers = args.workers if args.workers is not None else get_settings().workers
    return serve("icma.services.retrieval.app:create_app", host=args.host, port=args.port,
                 workers=workers, log_level=args.log_level)


def cmd_serve_worker(args) -> int:
    import os

    from icma.server.supervisor import serve

    # The app factory reads the settings in the serving process: pass flags as settings.
    for flag, name in ((args.retrieval_url, "ICMA_RETRIEVAL_URL"), (args.engine, "ICMA_ENGINE"),
                       (args.model, "ICMA_LLM_MODEL")):
        if flag:
            os.environ[name] = flag
    _settings_fresh()
    # One process: the engine holds the model once, and its thread batches all requests.
    return serve("icma.workers.translator.app:create_app", host=args.host, port=args.port,
                 workers=1, log_level=args.log_level)


def cmd_serve_all(args) -> int:
    import os

    from icma.server.launcher import run_stack

    for flag, name in ((args.engine, "ICMA_ENGINE"), (args.model, "ICMA_LLM_MODEL")):
        if flag:
            os.environ[name] = flag
    _settings_fresh()
    return run_stack(args.host, args.retrieval_port, args.port, once=args.once,
                     say=lambda m: print(m, flush=True))


def _settings_fresh():
    from icma.core.settings import get_settings

    get_settings.cache_clear()
    return get_settings()


def cmd_translate(args) -> int:
    from icma.jobs.translate_file import translate_file

    fmt = args.format or ("jsonl" if args.input.suffix.lower() in (".jsonl", ".ndjson")
                          else "tsv")
    prime = {"auto": None, "on": True, "off": False}[args.prime_answer]
    summary = translate_file(
        args.task, args.input, args.output, fmt=fmt, engine=args.engine, model=args.model,
        adapter=args.adapter, n_shot=args.n_shot, method=args.method, corpus=args.corpus,
        retrieval_url=args.retrieval_url, decoding=args.decoding,
        max_new_tokens=args.max_new_tokens, seed=args.seed, num_candidates=args.num_candidates,
        prime_answer=prime, batch_size=args.batch_size)
    print(summary, file=sys.stderr)
    return 0


def _config_flags(parser) -> None:
    """One flag per TuneConfig field, generated from the model (so the two cannot drift)."""
    import typing

    from icma.tuning.config import TuneConfig

    group = parser.add_argument_group("tuning settings (see the README's ICMT section)")
    for name, f in TuneConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        ann = f.annotation
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        kind = args[0] if args and typing.get_origin(ann) is not typing.Literal else ann
        default = "" if f.is_required() else f" (default {f.default})"
        help_ = (f.description or "") + default
        kw: dict = {"dest": f"cfg_{name}", "default": argparse.SUPPRESS, "help": help_}
        if typing.get_origin(ann) is typing.Literal or typing.get_origin(kind) is typing.Literal:
            kw["choices"] = typing.get_args(ann if typing.get_origin(ann) is typing.Literal
                                            else kind)
        elif kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif kind in (int, float):
            kw["type"] = kind
        elif typing.get_origin(kind) is list:
            kw["nargs"] = "+"
        elif name == "random_walk":
            kw.update(nargs=2, metavar=("SKIP_PROBABILITY", "SEED"))
        group.add_argument(flag, **kw)


def tune_settings(args) -> dict:
    from icma.tuning import read_config_file

    data = read_config_file(args.config) if args.config else {}
    for key, value in vars(args).items():
        if key.startswith("cfg_"):
            name = key[4:]
            if name == "random_walk":
                value = {"skip_probability": value[0], "seed": value[1]}
            data[name] = value
    return data


def cmd_tune(args) -> int:
    import threading

    from icma.core.settings import get_settings
    from icma.tuning import Stopped, parse_config, tune
    from icma.jobs.tune import install_stop_signals, run_job

    settings = get_settings()
    data_dir = args.data_dir or settings.data_dir
    adapters_dir = args.adapters_dir or (settings.adapters_path() if not args.data_dir
                                         else Path(data_dir) / "adapters")
    stop = threading.Event()
    restore = install_stop_signals(stop)
    try:
        if args.job:
            from icma.jobs.store import JobStore

            store = JobStore(args.jobs_db or settings.jobs_path())
            try:
                return run_job(store, args.job, data_dir=Path(data_dir),
                               adapters_dir=Path(adapters_dir), stop=stop)
            finally:
                store.close()
        cfg = parse_config(tune_settings(args))
        progress = _TuneProgress(settings.progress)
        try:
            manifest = tune(cfg, data_dir=data_dir, adapters_dir=adapters_dir,
                            on_progress=progress, should_stop=stop.is_set, restart=args.restart)
        except Stopped as exc:
            progress.close()
            print(f"icma: {exc}; run the same command again to resume", file=sys.stderr)
            return 130
        progress.close()
    finally:
        restore()
    t = manifest["training"]
    print(f"adapter {cfg.name!r}: {t['steps']} steps, loss {t['first_loss']:.4f} -> "
          f"{t['final_loss']:.4f}, {t['wall_s']:.0f} s training; saved in "
          f"{Path(adapters_dir if cfg.method == 'lora' else Path(data_dir) / 'models') / cfg.name}",
          file=sys.stderr)
    ev = manifest.get("evaluation")
    if ev and ev.get("metrics"):
        from icma.evaluation.metrics import report_lines

        print(f"evaluation on {ev['n']} records of {ev['split']}:", file=sys.stderr)
        for line in report_lines(ev["metrics"]):
            print("  " + line, file=sys.stderr)
    if args.json:
        print(json.dumps(manifest, indent=2))
    return 0


class _TuneProgress:
    """Phases as log lines, training steps and evaluation as tqdm bars."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.bar_phase = enabled, None, None

    def __call__(self, p: dict) -> None:
        from tqdm import tqdm

        phase = p.get("phase")
        total = p.get("total_steps") if phase == "training" else p.get("total")
        if total and phase in ("training", "evaluating"):
            if self.bar_phase != phase:
                self.close()
                self.bar = tqdm(total=total, desc=phase, unit="step" if phase == "training"
                                else "item", disable=not self.enabled, initial=0)
                self.bar_phase = phase
            done = p.get("step") if phase == "training" else p.get("done")
            self.bar.update(done - self.bar.n)
            if phase == "training":
                self.bar.set_postfix(loss=f"{p['loss']:.4f}", lr=f"{p['learning_rate']:.2e}",
                                     refresh=False)
            return
        if phase in ("checking", "retrieving contexts", "loading model", "saving"):
            self.close()
            extra = {k: v for k, v in p.items() if k != "phase"}
            print(f"icma tune: {phase}" + (f" {extra}" if extra else ""), file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar, self.bar_phase = None, None


def cmd_openapi(args) -> int:
    from icma.server.openapi import render
    from icma.services.retrieval.app import create_app as retrieval_app
    from icma.workers.translator.app import create_app as worker_app

    args.out.write_text(render(retrieval_app, worker_app), encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from icma.evaluation.metrics import evaluate, report_lines
    from icma.evaluation.predictions import read_predictions

    if args.no_fcd and args.task != "cap2mol":
        raise InputError("--no-fcd applies to cap2mol only", field="--no-fcd")
    preds = read_predictions(args.predictions, args.task, args.format)
    report = {"predictions": str(preds.path), "format": preds.format,
              **evaluate(args.task, preds.predictions, preds.references, fcd=not args.no_fcd)}
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(f"{args.task}: {preds.path} ({preds.format} format, {report['n']} pairs)")
        print("\n".join(report_lines(report)))
    return 0


def cmd_bench_quality(args) -> int:
    from icma.evaluation import quality
    from icma.evaluation.machine import git_commit, machine

    if args.limit < 1:
        raise InputError(f"--limit must be at least 1, got {args.limit}", field="--limit")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    protocol = quality.load_protocol(args.protocol, args.data, args.queries)
    figure = quality.can_plot()
    if not figure:  # said now, not after the hours of the run: there is time to install it
        print(f"icma: matplotlib is not installed ({quality.PLOTS_EXTRA}): writing the tables "
              "without the .png figure", file=sys.stderr)
    options = {"dtype": args.dtype} if args.dtype and args.engine == "transformers" else {}
    t0 = time.perf_counter()
    rows = quality.run_quality(
        protocol, tasks=tasks, llm_limit=args.limit, engine=args.engine, model=args.model,
        adapters=args.adapter, zero_shot=not args.no_zero_shot, llm=not args.no_llm,
        max_new_tokens=args.max_new_tokens, engine_options=options,
        report=lambda line: print(line, flush=True))
    llm = next((r for r in rows if r.engine != "nearest-neighbour"), None)
    meta = {"engine": llm.engine if llm else "none", "model": llm.model if llm else "none",
            "dtype": args.dtype or "auto", "max_new_tokens": args.max_new_tokens,
            "machine": machine(), "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "total_seconds": round(time.perf_counter() - t0, 1)}
    stem = quality.write_results(protocol, rows, args.out, meta, figure=figure)
    print(f"wrote {stem}.md, .json and .png" if figure else
          f"wrote {stem}.md and .json (no .png without matplotlib)")
    return 0


def cmd_demo(args) -> int:
    from icma.core.corpus import embedded_corpus
    from icma.retrieval.examples import retrieve_examples
    from icma.core.prompts import build_prompt
    from icma.retrieval import Exclusion
    from icma.retrieval.cache import cached_index

    corpus = embedded_corpus()
    print(f"embedded corpus: {corpus.name}, {len(corpus)} molecule-caption pairs (ChEBI-20 "
          "validation + test, CC BY 4.0)")
    indexes = {}
    for kind in ("graph", "bm25"):
        t0 = time.perf_counter()
        indexes[kind] = cached_index(kind, corpus, args.data_dir)
        print(f"{kind} index ready in {time.perf_counter() - t0:.1f} s")
    rec = corpus[corpus.position("5354212")] if "5354212" in corpus.cids else corpus[0]
    own = [Exclusion(cids=frozenset([rec.cid]))]

    def show(kind: str, query: str, n: int, line) -> list:
        t0 = time.perf_counter()
        examples = retrieve_examples(indexes[kind], [query], n, exclusions=own)[0]
        ms = (time.perf_counter() - t0) * 1000
        for e in examples:
            print("  " + line(e))
        print(f"  ({kind} retrieval: {ms:.1f} ms)")
        return examples

    print(f"\nmol2cap query (CID {rec.cid}, its own record excluded): {rec.smiles}")
    ex = show("graph", rec.smiles, 2,
              lambda e: f"CID {e.cid}  cosine {e.score:.3f}  {e.caption[:100]}")
    print(f"\n--- ICMA prompt ---\n{build_prompt('mol2cap', rec.smiles, ex).text}")
    print(f"\ncap2mol query: {rec.description[:100]}...")
    show("bm25", rec.description, 4, lambda e: f"CID {e.cid}  BM25 {e.score:.2f}  {e.smiles}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
