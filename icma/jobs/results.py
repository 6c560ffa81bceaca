"""Result lines: what ``GET /v1/jobs/{id}/results`` streams and ``icma translate --output``
writes, JSON objects in input order: ``index``, ``id``, ``input``, ``reference`` (when given),
``prediction`` (``""`` when the item failed), for cap2mol ``valid``, ``canonical_smiles`` and
``candidates_tried``, the examples' CIDs, and ``error`` (``null`` or ``{code, message,
field}``). ``icma eval --format jsonl`` reads them directly.
"""

from __future__ import annotations

import json
import time
from typing import Iterator

from icma.core.errors import IcmaError
from icma.jobs.store import Item, JobStore


def error_json(exc: IcmaError) -> dict:
    return {"code": exc.code, "message": exc.message, "field": exc.field}


def result_line(task: str, idx: int, item: Item, outcome=None, error: dict | None = None) -> dict:
    """One result line. ``outcome``: an ``icma.generation.pipeline.Outcome``."""
    line: dict = {"index": idx, "id": item.id, "input": item.input}
    if item.reference is not None:
        line["reference"] = item.reference
    t = outcome.translation if outcome is not None else None
    if outcome is not None and outcome.error is not None:
        error = error_json(outcome.error)
    line["prediction"] = t.answer if t is not None else ""
    if task == "cap2mol":
        line["valid"] = bool(t and t.valid)
        line["canonical_smiles"] = t.canonical if t is not None else None
        line["candidates_tried"] = outcome.candidates_tried if outcome is not None else 0
    line["examples"] = [e.cid for e in t.examples] if t is not None else []
    line["finish_reason"] = t.finish_reason if t is not None else None
    line["error"] = error
    return line


def iter_results(store: JobStore, job_id: str, follow: bool = True,
                 poll: float = 0.5) -> Iterator[str]:
    """Result lines in input order, one per input. ``follow``: wait for items still being
    worked on (like ``tail -f``) until the job ends; otherwise stop at the first unfinished
    item. Items a cancelled or failed job never reached get an error line."""
    idx = 0
    while True:
        rows = store.results(job_id, idx)
        if not rows:
            return
        for i, item, line in rows:
            while line is None:
                job = store.get(job_id)
                if not job.active:
                    line = store.results(job_id, i, 1)[0][2] or result_line(
                        job.task, i, item, error={"code": job.state, "field": None,
                                                  "message": f"not translated: the job "
                                                             f"{job.state}"})
                    break
                if not follow:
                    return
                time.sleep(poll)
                line = store.results(job_id, i, 1)[0][2]
            yield json.dumps(line, ensure_ascii=False) + "\n"
            idx = i + 1


