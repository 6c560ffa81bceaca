"""``icma translate``: a file through the worker's job path, in this process.

The job lives in a SQLite file beside the output (``OUTPUT.partial.sqlite3``) while it runs, so
an interrupted run resumes from its last finished batch when started again with the same
arguments; the output is written at the end, all at once (never half a file), and the partial
store is then removed. Nothing is shared with a running worker's job queue.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from icma.generation.engines import GenerationParams, load_engine
from icma.core.errors import InputError
from icma.jobs.store import JobRunner, JobStore, iter_results, parse_items
from icma.generation.pipeline import DEFAULT_SHOTS, Options, batch_translator
from icma.generation.retrievers import METHODS, HttpRetriever, LocalRetriever, RetrievalOptions
from icma.core.settings import Settings


def translate_file(task: str, input: Path, output: Path, *, settings: Settings,
                   fmt: str = "jsonl",
                   engine: str | None = None, model: str | None = None,
                   adapter: str | None = None, n_shot: int | None = None,
                   method: str | None = None, corpus: str | None = None,
                   retrieval_url: str | None = None, decoding: str = "sample",
                   max_new_tokens: int = 256, seed: int = 42, num_candidates: int = 1,
                   prime_answer: bool | None = None, batch_size: int | None = None,
                   progress: bool | None = None) -> str:
    """Translate ``input`` into ``output`` (JSON lines, input order); returns a summary.
    ``settings`` give the limits and whatever the arguments leave out."""
    try:
        text = Path(input).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"no such file: {input}", field="--input") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{input} is not UTF-8 (byte {exc.start})", field="--input") from None
    items = parse_items(task, text, fmt, where=str(input))
    n_shot = DEFAULT_SHOTS[task] if n_shot is None else n_shot
    if not 0 <= n_shot <= settings.max_k:
        raise InputError(f"must be between 0 and {settings.max_k}", field="--n-shot")
    if method is not None and method not in METHODS[task]:
        raise InputError(f"{method!r} does not retrieve for {task}; use one of "
                         f"{', '.join(METHODS[task])}", field="--method")
    if not 1 <= num_candidates <= settings.max_candidates:
        raise InputError(f"must be between 1 and {settings.max_candidates}",
                         field="--num-candidates")
    params = GenerationParams.for_task(task, decoding=decoding, max_new_tokens=max_new_tokens,
                                       seed=seed)
    adapter_ref = _adapter(adapter, settings)
    options = Options(n_shot=n_shot, retrieval=RetrievalOptions(method=method, corpus=corpus),
                      params=params, adapter=adapter_ref, prime_answer=prime_answer,
                      num_candidates=num_candidates)
    output = Path(output)
    if output.is_dir():
        raise InputError(f"{output} is a directory", field="--output")
    output.parent.mkdir(parents=True, exist_ok=True)

    # Same input, same settings -> same job id: a second run picks up the first one's results.
    fingerprint = json.dumps([task, hashlib.sha256(text.encode()).hexdigest(), n_shot, method,
                              corpus, retrieval_url, engine or settings.engine,
                              model or settings.llm_model, str(adapter_ref and adapter_ref.path),
                              params.__dict__, prime_answer, num_candidates], default=str)
    job_id = "cli-" + hashlib.sha256(fingerprint.encode()).hexdigest()[:24]
    partial = output.with_name(output.name + ".partial.sqlite3")
    store = JobStore(partial)
    try:
        job = store.find(job_id)
        if job is None:
            for old in store.list():  # the same output asked with other inputs or settings
                store.set_state(old.id, "cancelled", "superseded")
            job = store.create("translate", task, {}, items, job_id=job_id)
        elif job.state != "succeeded":
            store.set_state(job_id, "queued", "resumed", only_from=("running", "cancelled",
                                                                    "failed", "queued"))
        eng = (load_engine(engine or settings.engine, settings=settings, model=model)
               if job.done < job.total else None)
        if retrieval_url:
            retriever = HttpRetriever.from_settings(settings, base_url=retrieval_url)
        else:
            retriever = LocalRetriever(settings, [options.retrieval.method_for(task)])
        bar = _bar(job, progress if progress is not None else settings.progress)
        runner = JobRunner(store, batch_translator(retriever, eng, lambda t, raw: options),
                           batch_size=batch_size or settings.job_batch_size,
                           on_progress=lambda j: bar and bar.update(j.done - bar.n))
        job = runner.run_job(store.get(job_id)) if job.done < job.total else job
        if bar:
            bar.close()
        tmp = output.with_name(output.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for line in iter_results(store, job_id, follow=False):
                f.write(line)
        os.replace(tmp, output)
    finally:
        store.close()
    partial.unlink(missing_ok=True)
    for suffix in ("-wal", "-shm"):
        Path(str(partial) + suffix).unlink(missing_ok=True)
    return (f"{job.total} {task} inputs -> {output} ({job.total - job.failed} translated, "
            f"{job.failed} failed)")


def _adapter(spec: str | None, settings: Settings):
    from icma.generation.adapters import AdapterRegistry
    from icma.generation.engines import Adapter

    if spec is None:
        return None
    path = Path(spec)
    if path.is_dir():
        return Adapter(path.name, path)
    return AdapterRegistry(settings.adapters_path()).get(spec).as_adapter()


def _bar(job, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=job.total, initial=job.done, unit="item", desc=f"{job.task}")
