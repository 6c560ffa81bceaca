"""The end-to-end quality benchmark: retrieval -> prompt -> engine -> MolT5 metrics.

Rows, per task (mol2cap, cap2mol):
- nearest-neighbour baselines, one per retrieval method, over every test query (the answer is
  the top-1 example's);
- the LLM with retrieved examples and no tuning (answer priming on), over the first
  ``llm_limit`` test queries in file order, with the nearest-neighbour baseline of the default
  method on the same queries beside it;
- the LLM zero-shot, same queries;
- the LLM with the task's default adapter (``icma.generation.adapters.DefaultAdapters``: the
  shipped one, or ``ICMA_DEFAULT_ADAPTERS``'s), when one applies to the model, same queries;
- the LLM with each given adapter (tuned: no priming), same queries.
The untuned rows ask for the base model explicitly (``"adapter": "base"``). Each LLM row runs
once per decoding asked for (default ICMA's sampling only; ``greedy`` and ``consensus`` of
``num_samples`` add rows named after them), on the same retrieved examples; rows other than the
default adapter's may be given fewer decodings (``baseline_decodings``).

With ``answers_dir`` every LLM row keeps its answers there as they come, ``ANSWER_CHUNK``
queries at a time, and a run started again with the same arguments reuses them: a full test
split is hours of generation on a CPU, and a session that ends loses at most one chunk.

Protocols:
- ``chebi20-val-test``: database = ChEBI-20 validation (3,301 pairs, shipped), queries = ChEBI-20
  test (3,300). The paper's database is the 26k train split (not available offline): numbers
  under this protocol are not comparable with published ones.
- ``pubchem324k-iupac``: database = the IUPAC-name task's train split (11,856), queries = its
  test split (1,985); caption = IUPAC name. Needs the split files (``icma download
  pubchem324k-iupac --to DIR``; pass DIR as ``data``).
A query's own CID is excluded from its examples (2 PubChem324k-IUPAC test CIDs are in train).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from typing import Callable, Sequence

from icma.core import molregpt
from icma.core.corpus import EMBEDDED_DIR, Corpus, read_corpus
from icma.generation.engines import Generator, load_engine
from icma.core.errors import InputError
from icma.retrieval.examples import retrieve_examples
from icma.evaluation.metrics import REPORT_ROWS
from icma.core.prompts import Example
from icma.core.settings import Settings
from icma.core.tasks import TASK_SPECS, Task, check_task
from icma.retrieval import Exclusion
from icma.retrieval.cache import cached_index
from icma.generation.adapters import BASE, AdapterRegistry, DefaultAdapters, read_adapter
from icma.generation.options import build_options
from icma.generation.pipeline import translate

log = logging.getLogger(__name__)

PROTOCOLS = ("chebi20-val-test", "pubchem324k-iupac")
#: Retrieval methods of the nearest-neighbour rows, the default (used for LLM prompts) first:
#: every method of the task but sentence embeddings (they need a model folder of their own).
NN_METHODS: dict[str, tuple[str, ...]] = {t: tuple(m for m in s.methods if m != "sentence")
                                          for t, s in TASK_SPECS.items()}
N_SHOT = {t: s.n_shot for t, s in TASK_SPECS.items()}  # ICMA's released settings
SAMPLES = 3  # answers of each LLM row shown in the report
ANSWER_CHUNK = 32  # queries generated between two appends to a row's kept answers


@dataclass
class Protocol:
    name: str
    database: Corpus
    queries: Corpus
    note: str


@dataclass
class Row:
    task: str
    system: str  # what a reader compares: "nearest neighbour (graph)", "LLM 2-shot" ...
    engine: str
    model: str
    adapter: str | None
    retrieval: str | None
    n_shot: int
    n: int
    scores: dict
    seconds: float
    extra: dict = field(default_factory=dict)


def load_protocol(name: str, data: str | Path | None = None,
                  queries: int | None = None) -> Protocol:
    """The protocol's database and test queries (``queries``: only the first N, for smoke
    runs)."""
    p = _load_protocol(name, data)
    if queries is not None:
        if queries < 1:
            raise InputError(f"queries must be at least 1, got {queries}", field="queries")
        p.queries = p.queries.subset(range(min(queries, len(p.queries))))
        p.note += f"; only the first {len(p.queries)} test queries (a smoke run)"
    return p


def _load_protocol(name: str, data: str | Path | None) -> Protocol:
    if name == "chebi20-val-test":
        folder = Path(data) if data else EMBEDDED_DIR
        db, _ = read_corpus(folder / "validation.txt", name="chebi20-validation")
        q, _ = read_corpus(folder / "test.txt", name="chebi20-test", on_invalid="keep")
        return Protocol(name, db, q, "database = ChEBI-20 validation, queries = ChEBI-20 test "
                        "(the paper used the 26k train split: not comparable with published "
                        "numbers)")
    if name == "pubchem324k-iupac":
        if data is None:
            raise InputError("pubchem324k-iupac needs its split files: run `icma download "
                             "pubchem324k-iupac --to DIR` and pass --data DIR", field="data")
        folder = Path(data)
        for split in ("train.txt", "test.txt"):
            if not (folder / split).is_file():
                raise InputError(f"{folder / split} is missing", field="data")
        db, _ = read_corpus(folder / "train.txt", name="pubchem324k-iupac-train")
        q, _ = read_corpus(folder / "test.txt", name="pubchem324k-iupac-test", on_invalid="keep")
        return Protocol(name, db, q, "database = PubChem324k-IUPAC train, queries = its test "
                        "split (caption = IUPAC name)")
    raise InputError(f"unknown protocol {name!r}; use one of {', '.join(PROTOCOLS)}",
                     field="protocol")


def run_quality(protocol: Protocol, *, settings: Settings,
                tasks: Sequence[str] = ("mol2cap", "cap2mol"),
                llm_limit: int = 300, engine: str = "transformers", model: str | None = None,
                adapters: Sequence[str] = (), zero_shot: bool = True, llm: bool = True,
                data_dir: str | Path | None = None, max_new_tokens: int = 256,
                engine_options: dict | None = None, decodings: Sequence[str] = ("sample",),
                num_samples: int | None = None, baseline_decodings: Sequence[str] | None = None,
                answers_dir: Path | None = None, molregpt_rows: bool = False,
                report: Callable[[str], None] = print) -> list[Row]:
    """Every row of the benchmark for ``protocol`` (see the module docstring). Indexes are
    cached in ``data_dir`` (default: the settings'); the engines load with ``settings``.
    ``molregpt_rows``: also the untuned model asked MolReGPT's way (``icma.core.molregpt``:
    10 examples, chat messages, JSON answers): in-context learning alone beside ICMA's rows."""
    from icma.evaluation.metrics import evaluate

    data_dir = data_dir or settings.data_dir
    rows: list[Row] = []
    nn = load_engine("nearest-neighbour", settings=settings)
    llm_engine: Generator | None = None
    registry = AdapterRegistry.from_settings(settings)
    defaults = DefaultAdapters.from_settings(settings, registry, engine=engine, model=model)
    for task in tasks:
        check_task(task)
        records = protocol.queries.records
        queries = [r.smiles if task == "mol2cap" else r.description for r in records]
        refs = [r.description if task == "mol2cap" else r.smiles for r in records]
        exclusions = [Exclusion(cids=frozenset([r.cid])) for r in records]
        default_method = NN_METHODS[task][0]
        examples_of: dict[str, list[list[Example]]] = {}
        for method in NN_METHODS[task]:
            t0 = time.perf_counter()
            index = cached_index(method, protocol.database, data_dir, settings=settings,
                                 **({"seed": 0} if method == "random" else {}))
            search_q = _search_queries(task, queries)
            # any row's examples (an adapter may be tuned on more; MolReGPT asks for 10)
            k = max(*N_SHOT.values(), molregpt.N_SHOT if molregpt_rows else 0)
            examples_of[method] = retrieve_examples(index, search_q, k, exclusions=exclusions)
            preds = [t.answer for t in translate(task, queries, [e[:1] for e in
                                                                 examples_of[method]], nn)]
            rows.append(Row(task, f"nearest neighbour ({method})", nn.name, nn.model, None,
                            method, 1, len(preds),
                            evaluate(task, preds, refs, data_dir=settings.data_dir),
                            time.perf_counter() - t0))
            report(_line(rows[-1]))
        if not llm:
            continue
        n = min(llm_limit, len(records))
        sub_q, sub_refs = queries[:n], refs[:n]
        nn_sub = [e[:1] for e in examples_of[default_method][:n]]
        t0 = time.perf_counter()
        preds = [t.answer for t in translate(task, sub_q, nn_sub, nn)]
        rows.append(Row(task, f"nearest neighbour ({default_method}), first {n}", nn.name,
                        nn.model, None, default_method, 1, n,
                        evaluate(task, preds, sub_refs, data_dir=settings.data_dir),
                        time.perf_counter() - t0))
        report(_line(rows[-1]))
        if llm_engine is None:
            llm_engine = load_engine(engine, settings=settings, model=model,
                                     **(engine_options or {}))
        untuned = {"adapter": BASE, "n_shot": N_SHOT[task]}
        runs = [(f"LLM {N_SHOT[task]}-shot ({default_method}), untuned", llm_engine, untuned)]
        if zero_shot:
            runs.append(("LLM zero-shot, untuned", llm_engine, {**untuned, "n_shot": 0}))
        if molregpt_rows:
            runs.append(("MolReGPT {shots}, untuned", llm_engine,
                         {"adapter": BASE, "prompt_style": "molregpt"}))
        default = defaults.for_task(task)
        default_system = None
        if default is not None:  # the shipped default, served as a request naming none is
            default_system = "LLM {shots} + default adapter " + default.name
            runs.append((default_system, llm_engine, {}))
        for adapter in adapters:  # the engine carries it: the request asks for no other
            info = read_adapter(Path(adapter))
            tuned = info.tuned_prompt if info is not None else {}
            # served with the prompt form it was tuned on, as the worker serves a named adapter
            asked = {"adapter": BASE, "prime_answer": tuned.get("prime_answer", False),
                     "order": tuned.get("order"), "n_shot": tuned.get("n_shot"),
                     "retrieval": {"method": tuned.get("retrieval")}}
            if asked["retrieval"]["method"] not in NN_METHODS[task]:
                asked["retrieval"] = {}
            runs.append(("LLM {shots} + adapter " + Path(adapter).name,
                         load_engine(engine, settings=settings, model=model, adapter=adapter,
                                     **(engine_options or {})), asked))
        for (label, eng, asked), decoding in product(runs, decodings):
            if baseline_decodings is not None and label != default_system \
                    and decoding not in baseline_decodings:
                continue
            generation = {"max_new_tokens": max_new_tokens, "decoding": decoding,
                          "num_samples": num_samples if decoding == "consensus" else None}
            options = build_options(task, {**asked, "generation": generation},
                                    adapters=registry.get, default_adapter=defaults.for_task)
            params, prime = options.params, options.prime_answer
            method, k = options.retrieval.method, options.n_shot
            system = label.format(shots=f"{k}-shot ({method})" if k else "zero-shot")
            if k > len(examples_of[method][0]):
                raise InputError(f"{system} wants {k} examples; the benchmark retrieves "
                                 f"{len(examples_of[method][0])}", field="n_shot")
            ex = [e[:k] for e in examples_of[method][:n]]
            if decoding != "sample":
                system += f", {decoding}" + (f" of {params.num_samples}"
                                             if decoding == "consensus" else "")
            identity = {"task": task, "system": system, "engine": eng.name, "model": eng.model,
                        "adapter": options.adapter.name if options.adapter else eng.adapter,
                        "decoding": asdict(params), "queries": n,
                        "database": len(protocol.database),
                        # both change which answers greedy decoding gives (rounding)
                        "dtype": getattr(eng, "dtype", None),
                        "speculative_tokens": getattr(eng, "speculative_tokens", 0)}
            out, secs = _answers(task, sub_q, ex, eng, options, identity, answers_dir, report)
            extra = {"completion_tokens": sum(t.completion_tokens for t in out),
                     "stopped_by_length": sum(t.finish_reason == "length" for t in out),
                     "prime_answer": prime, "max_new_tokens": max_new_tokens,
                     "decoding": asdict(params),
                     # what the model wrote, for a reader to see beside the scores
                     "samples": [{"query": t.query, "reference": ref, "answer": t.answer}
                                 for t, ref in zip(out[:SAMPLES], sub_refs)]}
            if decoding == "consensus":  # how often a sample, not an example's answer, won
                extra["consensus_sample_wins"] = sum(t.winner == "sample" for t in out)
            rows.append(Row(task, system, eng.name, eng.model,
                            options.adapter.name if options.adapter else eng.adapter,
                            method if k else None, k, n,
                            evaluate(task, [t.answer for t in out], sub_refs,
                                     data_dir=settings.data_dir), secs, extra))
            report(_line(rows[-1]))
    return rows


@dataclass
class Answer:
    """What a row keeps of a translation (and what ``answers_dir`` stores, a line each)."""

    query: str
    answer: str
    completion_tokens: int
    finish_reason: str
    winner: str | None = None  # consensus: where the chosen candidate came from


def _answers(task: str, queries: Sequence[str], examples, engine, options, identity: dict,
             answers_dir: Path | None, report: Callable[[str], None]) -> tuple[list[Answer], float]:
    """The row's answers and the seconds they took (those of earlier runs included), generated
    ``ANSWER_CHUNK`` queries at a time and appended to ``answers_dir`` after each chunk; answers
    kept there by an earlier run with the same ``identity`` are reused, not generated again.
    A chunk's sampled answers depend only on the chunk (a run resumed after any chunk gives
    what an uninterrupted one gives)."""
    import hashlib

    path = None
    done: list[Answer] = []
    seconds = 0.0
    if answers_dir is not None:
        key = json.dumps(identity, sort_keys=True, default=str)
        path = Path(answers_dir) / f"{task}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"
        if path.exists():
            text = path.read_text(encoding="utf-8")
            lines = text.splitlines()
            if not text.endswith("\n"):  # cut while appending: that chunk is generated again
                lines = lines[:-1]
                path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
            for x in map(json.loads, lines[1:]):
                seconds += x.pop("seconds")
                done.append(Answer(**x))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(key + "\n", encoding="utf-8")
        if done:
            report(f"{task} | {identity['system']} | resuming after {len(done)} of "
                   f"{len(queries)} answers kept in {path}")
    step = ANSWER_CHUNK if path is not None else max(len(queries), 1)
    for lo in range(len(done), len(queries), step):
        t0 = time.perf_counter()
        out = translate(task, queries[lo:lo + step], examples[lo:lo + step], engine, options)
        secs = time.perf_counter() - t0
        chunk = [Answer(t.query, t.answer, t.completion_tokens, t.finish_reason,
                        t.consensus.winner.source if t.consensus else None) for t in out]
        done += chunk
        seconds += secs
        if path is not None:
            with path.open("a", encoding="utf-8") as fh:
                for i, a in enumerate(chunk):  # the chunk's time on its first line
                    fh.write(json.dumps({**asdict(a), "seconds": secs if i == 0 else 0.0})
                             + "\n")
                fh.flush()
    return done, seconds


def _search_queries(task: Task, queries: Sequence[str]) -> list[str]:
    """Molecule queries are searched by canonical SMILES (as the services do); an unparsable
    test SMILES is searched as written (random and BM25 do not parse it; graph skips none here:
    the ChEBI-20 and PubChem test molecules all parse)."""
    if task != "mol2cap":
        return list(queries)
    from icma.core.chem import try_canonical

    return [try_canonical(q)[0] or q for q in queries]


def _line(r: Row) -> str:
    keys = [key for _, key in REPORT_ROWS[r.task]]
    vals = ", ".join(f"{k} {r.scores[k]:.3f}" for k in keys
                     if isinstance(r.scores.get(k), (int, float)))
    return f"{r.task} | {r.system} | n={r.n} | {vals} | {r.seconds:.0f} s"


#: Where the figure's dependency comes from (it is not among icma's own: see can_plot).
PLOTS_EXTRA = "pip install 'icma[plots]'"


def can_plot() -> bool:
    """Whether matplotlib is installed. It is an extra, not a dependency: the services (and
    their images) install icma's dependencies and never draw, and the figure only repeats the
    tables, so without it the results are written without the .png."""
    return importlib.util.find_spec("matplotlib") is not None


def write_results(protocol: Protocol, rows: list[Row], out_dir: Path, meta: dict, *,
                  figure: bool = True) -> Path:
    """``quality-<protocol>.md`` and ``.json`` in ``out_dir``, and with ``figure`` the ``.png``
    (matplotlib, see can_plot)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"quality-{protocol.name}"
    payload = {"protocol": protocol.name, "note": protocol.note, **meta,
               "database_size": len(protocol.database), "queries": len(protocol.queries),
               "rows": [asdict(r) for r in rows]}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(render_markdown(payload, stem.name, figure=figure))
    if figure:
        plot(payload, stem.with_suffix(".png"))
    return stem


def render_markdown(p: dict, stem: str, figure: bool = True) -> str:
    lines = [f"# Quality benchmark: {p['protocol']}", "",
             f"Protocol: {p['note']}. Database {p['database_size']:,} pairs, "
             f"{p['queries']:,} test queries; each query's own CID excluded from its examples.",
             f"Engine for LLM rows: {p.get('engine')}, model {p.get('model')} "
             f"({p.get('dtype')} weights), decoding: ICMA's "
             f"(sampling, temperature 0.7, top_p 0.85, top_k 40, seed 42; repetition penalty "
             f"0.8 for cap2mol) unless the row names another (consensus samples at these "
             f"settings), at most {p.get('max_new_tokens')} new tokens; untuned rows "
             "prime the answer marker.",
             f"Metrics: MolT5's recipe (`icma.evaluation.metrics`; captions on SciBERT word pieces). "
             f"Machine: {p.get('machine')}; {p.get('date')}; commit {p.get('commit')}.", ""]
    for task in ("mol2cap", "cap2mol"):
        rows = [r for r in p["rows"] if r["task"] == task]
        if not rows:
            continue
        cols = [(key, label) for label, key in REPORT_ROWS[task]]
        lines += [f"## {task}", "",
                  "| system | n | " + " | ".join(c[1] for c in cols) + " | seconds |",
                  "| --- | ---: |" + " ---: |" * len(cols) + " ---: |"]
        for r in rows:
            cells = []
            for key, _ in cols:
                v = r["scores"].get(key)
                cells.append(f"{v:.3f}" if isinstance(v, (int, float)) else str(v or "-"))
            lines.append(f"| {r['system']} | {r['n']:,} | " + " | ".join(cells) +
                         f" | {r['seconds']:.0f} |")
        lines.append("")
    sampled = [r for r in p["rows"] if r.get("extra", {}).get("samples")]
    if sampled:
        lines += ["## Sample answers (the first test queries)", ""]
        for r in sampled:
            lines += [f"**{r['task']}, {r['system']}**", ""]
            for x in r["extra"]["samples"]:
                lines.append(f"- query `{_short(x['query'])}`: answer `{_short(x['answer'])}` "
                             f"(reference `{_short(x['reference'])}`)")
            lines.append("")
    if figure:
        lines += [f"![quality]({stem}.png)", ""]
    return "\n".join(lines)


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split()).replace("`", "'")
    return text if len(text) <= n else text[: n - 3] + "..."


def plot(p: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ("mol2cap", "cap2mol") if any(r["task"] == t for r in p["rows"])]
    keys = {"mol2cap": [("bleu2", "BLEU-2"), ("rougeL", "ROUGE-L"), ("meteor", "METEOR")],
            "cap2mol": [("exact_match", "exact"), ("validity", "validity"),
                        ("maccs_fts", "MACCS")]}
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.2), dpi=110,
                             squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in p["rows"] if r["task"] == task]
        width = 0.8 / len(keys[task])
        for j, (key, label) in enumerate(keys[task]):
            vals = [r["scores"].get(key) or 0.0 for r in rows]
            ax.barh([i + j * width for i in range(len(rows))], vals, height=width, label=label)
        ax.set_yticks([i + 0.4 - width / 2 for i in range(len(rows))])
        ax.set_yticklabels([f"{r['system']} (n={r['n']})" for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(task, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"quality, {p['protocol']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
