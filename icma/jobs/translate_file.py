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

from icma.core.errors import InputError
from icma.core.settings import Settings
from icma.generation.adapters import AdapterInfo, AdapterRegistry, DefaultAdapters, \
    read_adapter
from icma.generation.options import build_options
from icma.generation.engines import load_engine
from icma.generation.retrievers import HttpRetriever, LocalRetriever
from icma.jobs.items import parquet_items, parse_items
from icma.jobs.results import iter_results
from icma.jobs.runner import JobRunner, batch_translator
from icma.jobs.store import JobStore


#: Request fields as ``icma translate`` calls them, for its error messages.
FLAGS = {"n_shot": "--n-shot", "num_candidates": "--num-candidates", "adapter": "--adapter",
         "prime_answer": "--prime-answer", "retrieval.method": "--method",
         "retrieval.corpus": "--corpus", "generation.decoding": "--decoding",
         "generation.max_new_tokens": "--max-new-tokens", "generation.seed": "--seed",
         "generation.num_samples": "--num-samples",
         "generation.no_repeat_ngram_size": "--no-repeat-ngram-size",
         "prompt_style": "--prompt-style"}


def translate_file(task: str, input: Path, output: Path, *, settings: Settings,
                   fmt: str = "jsonl", engine: str | None = None, model: str | None = None,
                   adapter: str | None = None, n_shot: int | None = None,
                   method: str | None = None, corpus: str | None = None,
                   retrieval_url: str | None = None, decoding: str | None = None,
                   max_new_tokens: int = 256, seed: int = 42, num_candidates: int = 1,
                   num_samples: int | None = None, no_repeat_ngram_size: int = 0,
                   prime_answer: bool | None = None, batch_size: int | None = None,
                   progress: bool | None = None, prompt_style: str | None = None,
                   executor: str = "local", ray_address: str | None = None) -> str:
    """Translate ``input`` into ``output`` (JSON lines in input order, or Parquet for a
    ``.parquet`` output); returns a summary. ``executor`` ``ray``: on the Ray cluster at
    ``ray_address`` (``icma.jobs.ray_executor``) instead of in this process."""
    if executor not in ("local", "ray"):
        raise InputError(f"unknown executor {executor!r}; use local or ray", field="--executor")
    try:
        data = Path(input).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise InputError(f"no such file: {input}", field="--input") from None
    if fmt == "parquet":
        items = parquet_items(task, data, where=str(input))
    else:
        try:
            # universal newlines, as a text-mode read gives them
            text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        except UnicodeDecodeError as exc:
            raise InputError(f"{input} is not UTF-8 (byte {exc.start})",
                             field="--input") from None
        items = parse_items(task, text, fmt, where=str(input))
    request = {"n_shot": n_shot, "retrieval": {"method": method, "corpus": corpus},
               "generation": {"decoding": decoding, "max_new_tokens": max_new_tokens,
                              "seed": seed, "num_samples": num_samples,
                              "no_repeat_ngram_size": no_repeat_ngram_size},
               "adapter": adapter, "prime_answer": prime_answer,
               "num_candidates": num_candidates, "prompt_style": prompt_style}
    registry = AdapterRegistry.from_settings(settings)
    defaults = DefaultAdapters.from_settings(settings, registry, engine=engine, model=model)
    try:
        options = build_options(task, request, max_k=settings.max_k,
                                max_candidates=settings.max_candidates,
                                max_samples=settings.max_samples,
                                adapters=lambda name: _adapter(name, registry),
                                default_adapter=defaults.for_task)
    except InputError as exc:
        raise exc.at(FLAGS.get(exc.field, exc.field)) from None
    output = Path(output)
    if output.is_dir():
        raise InputError(f"{output} is a directory", field="--output")
    as_parquet = output.suffix.lower() == ".parquet"
    if as_parquet:
        _pyarrow("--output")
    if executor == "ray":
        from icma.core.ray_cluster import connect

        settings = settings.model_copy(update={"ray_address": ray_address
                                               or settings.ray_address})
        connect(settings.ray_address)  # an unreachable cluster: a clear error before any work
    output.parent.mkdir(parents=True, exist_ok=True)

    # Same input, same settings -> same job id: a second run picks up the first one's results.
    engine_name = engine or settings.engine
    served = ([settings.openai_base_url, settings.openai_model] if engine_name == "openai"
              else model or settings.llm_model)
    fingerprint = json.dumps([task, hashlib.sha256(data).hexdigest(), retrieval_url,
                              engine_name, served, repr(options)])
    job_id = "cli-" + hashlib.sha256(fingerprint.encode()).hexdigest()[:24]
    partial = output.with_name(output.name + ".partial.sqlite3")
    store, retriever = JobStore(partial), None
    try:
        job = store.find(job_id)
        if job is None:
            for old in store.list():  # the same output asked with other inputs or settings
                store.set_state(old.id, "cancelled", "superseded")
            job = store.create("translate", task, {}, items, job_id=job_id)
        elif job.state != "succeeded":
            store.set_state(job_id, "queued", "resumed", only_from=("running", "cancelled",
                                                                    "failed", "queued"))
        before = job.done  # results of an earlier, interrupted run: not redone
        eng = None
        if job.done < job.total and executor == "local":  # (its errors before any bar)
            eng = load_engine(engine or settings.engine, settings=settings, model=model)
            if retrieval_url:
                retriever = HttpRetriever.from_settings(settings, base_url=retrieval_url)
            else:
                retriever = LocalRetriever(settings, [options.retrieval.method_for(task)])
        bar = _bar(job, progress if progress is not None else settings.progress)
        size = batch_size or settings.job_batch_size
        shown = (lambda j: bar.update(j.done - bar.n)) if bar else None
        if job.done >= job.total:
            pass
        elif executor == "ray":
            from icma.jobs.ray_executor import Parts, run_job_on_ray

            # Called once, not through the runner's retries: a pipeline that fails is the
            # command's error, and running it again resumes.
            store.set_state(job_id, "running", None, only_from=("queued",))
            job = run_job_on_ray(store, store.get(job_id), options,
                                 Parts(settings, engine, model, retrieval_url),
                                 batch_size=size, on_progress=shown)
            if job.done == job.total:
                store.set_state(job_id, "succeeded", None, only_from=("running",))
        else:
            runner = JobRunner(store, batch_translator(retriever, eng, lambda t, raw: options),
                               batch_size=size, on_progress=shown)
            job = runner.run_job(store.get(job_id))
        if bar:
            bar.close()
        tmp = output.with_name(output.name + ".tmp")
        if as_parquet:
            _write_parquet(tmp, (json.loads(x) for x in iter_results(store, job_id,
                                                                     follow=False)))
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for line in iter_results(store, job_id, follow=False):
                    f.write(line)
        os.replace(tmp, output)
    finally:
        store.close()
        if retriever is not None:
            retriever.close()
    partial.unlink(missing_ok=True)
    for suffix in ("-wal", "-shm"):
        Path(str(partial) + suffix).unlink(missing_ok=True)
    resumed = f"; {before} done by an earlier run" if before else ""
    return (f"{job.total} {task} inputs -> {output} ({job.total - job.failed} translated, "
            f"{job.failed} failed{resumed})")


def _pyarrow(field: str):
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise InputError("Parquet needs pyarrow: pip install 'icma[ray]'", field=field) from None
    return pyarrow


def _write_parquet(path: Path, lines) -> None:
    """The result lines as a Parquet table: one row per input, the JSON lines' fields as
    columns (nested ones as structs and lists)."""
    pa = _pyarrow("--output")
    pa.parquet.write_table(pa.Table.from_pylist(list(lines)), path)


def _adapter(spec: str, registry: AdapterRegistry) -> AdapterInfo:
    """A folder (the operator's own files), or a name in the registry."""
    path = Path(spec)
    if path.is_dir():
        info = read_adapter(path)
        if info is None:
            raise InputError(f"{path} is not a peft adapter folder (no adapter_config.json)",
                             field="adapter")
        return info
    return registry.get(spec)


def _bar(job, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=job.total, initial=job.done, unit="item", desc=f"{job.task}")
