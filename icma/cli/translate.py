"""``icma translate``: a file through the worker's job path, in this process."""

from __future__ import annotations

import sys
from pathlib import Path

from icma.cli.serve import ENGINE_HELP, openai_flags
from icma.core.molregpt import PROMPT_STYLES
from icma.core.tasks import TASK_SPECS, TASKS
from icma.generation.engines import DECODINGS


def add_parser(sub) -> None:
    tr = sub.add_parser(
        "translate", help="translate a file (the worker's job path, in this process)",
        description="Translate every input of a file with retrieved examples and an LLM; writes "
                    "JSON lines in input order (icma eval --format jsonl reads them). An "
                    "interrupted run resumes where it stopped when run again with the same "
                    "arguments.")
    tr.add_argument("--task", required=True, choices=TASKS)
    tr.add_argument("--input", required=True, type=Path,
                    help="JSONL ({input, id, reference} or {cid, smiles, description}) or a "
                         "corpus TSV (CID SMILES description)")
    tr.add_argument("--output", required=True, type=Path, help="JSON lines, one per input")
    tr.add_argument("--format", choices=["jsonl", "tsv", "parquet"],
                    help="input format (default: from the extension: .jsonl -> jsonl, "
                         ".parquet -> parquet, else tsv); an output named .parquet is "
                         "written as Parquet")
    tr.add_argument("--executor", choices=["local", "ray"], default="local",
                    help="local: in this process; ray: a Ray Data pipeline on a Ray cluster "
                         "(retrieval actors, then generation actors; README 'Scaling out')")
    tr.add_argument("--ray-address",
                    help="ray: the cluster (ray://HOST:10001, or HOST:6379 on one of its "
                         "nodes; auto: the one running on this machine; default "
                         "ICMA_RAY_ADDRESS, then RAY_ADDRESS, else a Ray runtime started here)")
    tr.add_argument("--engine", help=ENGINE_HELP)
    tr.add_argument("--model", help="LLM folder or hub id (default ICMA_LLM_MODEL)")
    openai_flags(tr)
    tr.add_argument("--prompt-style", choices=PROMPT_STYLES,
                    help="icma (default): ICMA's prompts; molregpt: MolReGPT's chat messages "
                         "and JSON answers (default 10 examples, rdkit / bm25 retrieval)")
    tr.add_argument("--adapter", help="LoRA adapter: a folder, a name in the registry, or "
                                      "'base' for the untuned model (default: the task's "
                                      "default adapter, ICMA_DEFAULT_ADAPTERS)")
    tr.add_argument("--n-shot", type=int, help="examples per prompt (default 2 / 4)")
    tr.add_argument("--method", help="retrieval: " + ", ".join(
        f"{'|'.join(s.methods)} ({t})" for t, s in TASK_SPECS.items()))
    tr.add_argument("--corpus", help="retrieval corpus name (default: the embedded ChEBI-20)")
    tr.add_argument("--retrieval-url",
                    help="use this retrieval service; default: local indexes in the data dir")
    tr.add_argument("--decoding", choices=DECODINGS,
                    help="default: the adapter's (its manifest's generation), else sample; "
                         "consensus: sample --num-samples answers per input and write the one "
                         "most similar to them and to the examples' answers")
    tr.add_argument("--num-samples", type=int,
                    help="consensus: answers sampled per input (default 8, at most "
                         "ICMA_MAX_SAMPLES)")
    tr.add_argument("--no-repeat-ngram-size", type=int, default=0,
                    help="no n-gram of this many tokens twice in an answer (0: off)")
    tr.add_argument("--max-new-tokens", type=int, default=256)
    tr.add_argument("--seed", type=int, default=42)
    tr.add_argument("--num-candidates", type=int, default=1,
                    help="cap2mol: sample until a valid molecule, at most this many")
    tr.add_argument("--prime-answer", choices=["auto", "on", "off"], default="auto",
                    help="end prompts with the answer marker (auto: on for the untuned "
                         "model, else as the adapter was tuned)")
    tr.add_argument("--batch-size", type=int, help="items per engine call (ICMA_JOB_BATCH_SIZE)")
    tr.set_defaults(func=cmd_translate)


def cmd_translate(args) -> int:
    from icma.cli.serve import with_engine_flags
    from icma.core.settings import get_settings
    from icma.jobs.translate_file import translate_file

    suffix = args.input.suffix.lower()
    fmt = args.format or ("jsonl" if suffix in (".jsonl", ".ndjson") else
                          "parquet" if suffix == ".parquet" else "tsv")
    prime = {"auto": None, "on": True, "off": False}[args.prime_answer]
    summary = translate_file(
        args.task, args.input, args.output,
        settings=with_engine_flags(get_settings(), args), fmt=fmt,
        engine=args.engine, model=args.model, prompt_style=args.prompt_style, adapter=args.adapter, n_shot=args.n_shot, method=args.method,
        corpus=args.corpus, retrieval_url=args.retrieval_url, decoding=args.decoding,
        max_new_tokens=args.max_new_tokens, seed=args.seed, num_candidates=args.num_candidates,
        num_samples=args.num_samples, no_repeat_ngram_size=args.no_repeat_ngram_size,
        prime_answer=prime, batch_size=args.batch_size, executor=args.executor,
        ray_address=args.ray_address)
    print(summary, file=sys.stderr)
    return 0
