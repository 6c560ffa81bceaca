"""``icma index build|info``, ``icma retrieve`` and ``icma prompt``: retrieval indexes and
the prompts built from what they find."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from icma.core.errors import InputError
from icma.core.tasks import TASKS, per_task, spec

EMBEDDED = "embedded"


def add_parser(sub) -> None:
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
    pr.add_argument("--task", required=True, choices=TASKS)
    q = pr.add_mutually_exclusive_group(required=True)
    q.add_argument("--smiles", help="mol2cap query")
    q.add_argument("--caption", help="cap2mol query")
    pr.add_argument("--index", type=Path,
                    help="saved index (default: the embedded corpus, "
                         + per_task("default_method") + ")")
    pr.add_argument("--n-shot", type=int, help="examples (default: " + per_task("n_shot") + ")")
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
    from icma.core.settings import get_settings
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
    index = build_index(args.kind, corpus, settings=get_settings(), **params)
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
    from icma.core.settings import get_settings
    from icma.retrieval import ExclusionRule, load_index

    index = load_index(args.index, settings=get_settings())
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
    from icma.core.settings import get_settings

    settings = get_settings()
    task = args.task
    query = args.smiles if task == "mol2cap" else args.caption
    if query is None:
        need = "--smiles" if task == "mol2cap" else "--caption"
        raise InputError(f"task {task} takes its query from {need}", field=need)
    if args.index:
        index = load_index(args.index, settings=settings)
    else:
        index = cached_index(spec(task).default_method, None, settings.data_dir,
                             settings=settings)
    want = "molecule" if task == "mol2cap" else "caption"
    if index.modality != want:
        raise InputError(f"{task} retrieves by {want}, but {args.index} is a {index.kind} index "
                         f"over {index.modality}s", field="index")
    n_shot = args.n_shot if args.n_shot is not None else spec(task).n_shot
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
