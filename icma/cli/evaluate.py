"""``icma eval`` and ``icma bench quality``: predictions scored with MolT5's metrics."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from icma.cli.serve import openai_flags, with_engine_flags
from icma.core.errors import InputError
from icma.core.tasks import TASKS


def add_parser(sub) -> None:
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
    ev.add_argument("task", choices=TASKS)
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
    bq.add_argument("--engine", default="transformers",
                    help="engine for LLM rows (openai: the server of ICMA_OPENAI_BASE_URL / "
                         "--openai-base-url)")
    openai_flags(bq)
    bq.add_argument("--molregpt", action="store_true",
                    help="also MolReGPT rows: the untuned model asked MolReGPT's way (10 "
                         "examples, chat messages, JSON answers; the openai engine sends them "
                         "to the server's chat API)")
    bq.add_argument("--model", help="LLM (default: ICMA_LLM_MODEL, the shipped SmolLM2)")
    bq.add_argument("--adapter", action="append", default=[],
                    help="a tuned LoRA adapter folder (repeatable): one more row each")
    bq.add_argument("--dtype", help="LLM weights: float32 | bfloat16 (default ICMA_LLM_DTYPE); "
                    "--engine openai: the server's, as the report should name them")
    bq.add_argument("--max-new-tokens", type=int, default=256, help="per answer (ICMA: 256)")
    bq.add_argument("--no-llm", action="store_true", help="nearest-neighbour rows only")
    bq.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot rows")
    bq.add_argument("--decodings", default="sample",
                    help="comma-separated decodings of every LLM row: sample (ICMA's), greedy, "
                         "beam, consensus (default sample)")
    bq.add_argument("--baseline-decodings",
                    help="comma-separated subset of --decodings for the LLM rows other than the "
                         "default adapter's (default: all of them)")
    bq.add_argument("--num-samples", type=int,
                    help="answers sampled per query by consensus rows (default 8)")
    bq.add_argument("--answers", type=Path,
                    help="keep each LLM row's answers in this folder as they come; run the same "
                         "command again after an interruption and it goes on where it stopped")
    bq.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                    help="results folder (default benchmarks/results)")
    bq.set_defaults(func=cmd_bench_quality)


def cmd_eval(args) -> int:
    from icma.core.settings import get_settings
    from icma.evaluation.metrics import evaluate, report_lines
    from icma.evaluation.predictions import read_predictions

    if args.no_fcd and args.task != "cap2mol":
        raise InputError("--no-fcd applies to cap2mol only", field="--no-fcd")
    preds = read_predictions(args.predictions, args.task, args.format)
    report = {"predictions": str(preds.path), "format": preds.format,
              **evaluate(args.task, preds.predictions, preds.references,
                         data_dir=get_settings().data_dir, fcd=not args.no_fcd)}
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(f"{args.task}: {preds.path} ({preds.format} format, {report['n']} pairs)")
        print("\n".join(report_lines(report)))
    return 0


def cmd_bench_quality(args) -> int:
    from icma.core.settings import get_settings
    from icma.evaluation import quality
    from icma.evaluation.machine import git_commit, machine
    from icma.generation.options import build_options

    if args.limit < 1:
        raise InputError(f"--limit must be at least 1, got {args.limit}", field="--limit")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    decodings = [d.strip() for d in args.decodings.split(",") if d.strip()]
    for d in decodings:  # checked now, not after the nearest-neighbour rows
        try:
            build_options("mol2cap", {"generation": {"decoding": d, "num_samples": (
                args.num_samples if d == "consensus" else None)}})
        except InputError as exc:
            raise exc.at("--num-samples" if exc.field == "generation.num_samples"
                         else "--decodings") from None
    baseline = None
    if args.baseline_decodings is not None:
        baseline = [d.strip() for d in args.baseline_decodings.split(",") if d.strip()]
        extra = sorted(set(baseline) - set(decodings))
        if extra:
            raise InputError(f"{', '.join(extra)} not among --decodings "
                             f"({', '.join(decodings)})", field="--baseline-decodings")
    if args.answers is not None and args.answers.exists() and not args.answers.is_dir():
        raise InputError(f"{args.answers} is a file; give a folder to keep the answers in",
                         field="--answers")
    protocol = quality.load_protocol(args.protocol, args.data, args.queries)
    figure = quality.can_plot()
    if not figure:  # said now, not after the hours of the run: there is time to install it
        print(f"icma: matplotlib is not installed ({quality.PLOTS_EXTRA}): writing the tables "
              "without the .png figure", file=sys.stderr)
    options = {"dtype": args.dtype} if args.dtype and args.engine == "transformers" else {}
    t0 = time.perf_counter()
    rows = quality.run_quality(
        protocol, settings=with_engine_flags(get_settings(), args),
        tasks=tasks, llm_limit=args.limit, engine=args.engine,
        model=args.model, adapters=args.adapter, zero_shot=not args.no_zero_shot,
        llm=not args.no_llm, max_new_tokens=args.max_new_tokens, engine_options=options,
        decodings=decodings, num_samples=args.num_samples, baseline_decodings=baseline,
        answers_dir=args.answers, molregpt_rows=args.molregpt,
        report=lambda line: print(line, flush=True))
    llm = next((r for r in rows if r.engine != "nearest-neighbour"), None)
    meta = {"engine": llm.engine if llm else "none", "model": llm.model if llm else "none",
            # an OpenAI-compatible server's weights are its own: unknown here unless told
            "dtype": args.dtype or ("the server's" if args.engine == "openai" else "auto"),
            "max_new_tokens": args.max_new_tokens,
            "machine": machine(), "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "total_seconds": round(time.perf_counter() - t0, 1)}
    stem = quality.write_results(protocol, rows, args.out, meta, figure=figure)
    print(f"wrote {stem}.md, .json and .png" if figure else
          f"wrote {stem}.md and .json (no .png without matplotlib)")
    return 0
