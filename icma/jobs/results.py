"""A job's result lines in input order, as ``GET /v1/jobs/{id}/results`` streams them and
``icma translate --output`` writes them (the line format: ``icma.evaluation.predictions``)."""

from __future__ import annotations

import json
import time
from typing import Iterator

from icma.evaluation.predictions import result_line
from icma.jobs.store import JobStore


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
                        job.task, i, item.input, id=item.id, reference=item.reference,
                        error={"code": job.state, "field": None,
                               "message": f"not translated: the job {job.state}"})
                    break
                if not follow:
                    return
                time.sleep(poll)
                line = store.results(job_id, i, 1)[0][2]
            yield json.dumps(line, ensure_ascii=False) + "\n"
            idx = i + 1


