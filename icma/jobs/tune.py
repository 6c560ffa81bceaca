"""Tune jobs of the worker: queued in the job store, each run in its own process.

A training run takes minutes to days and all the memory it can get; in its own process it
cannot stall the worker's HTTP loop or engine thread, a crash in it does not take the worker
down, and its memory is returned when it ends. The child (``icma tune --job ID``) reads its
settings from the job store and writes its progress there; it dies with the worker (Linux
``PR_SET_PDEATHSIG``), and a restarted worker queues the job again, which resumes from its last
checkpoint. One tune job runs at a time.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from icma.core.errors import IcmaError, public_message
from icma.core.settings import Settings
from icma.jobs.store import JobStore
from icma.tuning.sources import Sources, remove_uploads, uploads_root

log = logging.getLogger(__name__)
KIND = "tune"
#: Most [step, loss] points a job's progress carries (older ones are thinned out past this).
CURVE_POINTS = 400
#: A child that dies by a signal (killed, out of memory) is restarted this many times; each
#: restart resumes from the last checkpoint.
MAX_ATTEMPTS = 3
#: Seconds an upload folder without a job is kept (the job is created after its files).
UPLOAD_GRACE_S = 3600


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class TuneRunner:
    """Starts queued tune jobs one at a time as child processes and watches them."""

    def __init__(self, store: JobStore, settings: Settings, poll: float = 1.0,
                 python: str = sys.executable):
        self.store, self.settings = store, settings
        self.data_dir, self.adapters_dir = Path(settings.data_dir), settings.adapters_path()
        self.poll, self.python = poll, python
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._loop, name="tune-jobs", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, grace: float = 30.0) -> None:
        """Ask a running child to checkpoint and stop (the job stays 'running', so the next
        start resumes it), then stop watching."""
        self._stop.set()
        self._wake.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._thread.join(timeout=grace + 5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            job = self.store.next_queued(KIND)
            if job is None:
                self._sweep_uploads()
                self._wake.wait(self.poll)
                self._wake.clear()
                continue
            try:
                self._run(job.id)
            except Exception:  # a bug here must not stop the runner
                log.exception("tune job %s", job.id)
                self.store.set_state(job.id, "failed", "internal error (see the worker's log)")
            if not self.store.get(job.id).active:
                remove_uploads(self.data_dir, job.id)

    def _sweep_uploads(self) -> None:
        """Uploaded corpora of jobs that ended without this runner (cancelled while queued) or
        are gone; a folder without a job is left an hour (its job may be being created)."""
        root = uploads_root(self.data_dir)
        if not root.is_dir():
            return
        for folder in root.iterdir():
            job = self.store.find(folder.name)
            stale = job is None and time.time() - folder.stat().st_mtime > UPLOAD_GRACE_S
            if stale or (job is not None and not job.active):
                remove_uploads(self.data_dir, folder.name)

    def _run(self, job_id: str) -> None:
        if not self.store.set_state(job_id, "running", None, only_from=("queued",)):
            return  # cancelled meanwhile
        attempts = 0
        while True:
            attempts += 1
            code = self._child(job_id)
            job = self.store.get(job_id)
            if job.state != "running" or self._stop.is_set():
                return  # the child finished it, it was cancelled, or the worker is stopping
            if code < 0 and attempts < MAX_ATTEMPTS:  # killed: resume from the checkpoint
                log.warning("tune job %s: the training process died (signal %d); resuming",
                            job_id, -code)
                self.store.set_message(job_id, f"restarted after signal {-code}")
                continue
            self.store.set_state(job_id, "failed",
                                 f"the training process exited with {code} (see the worker's "
                                 f"log); resubmit the job to resume from its last checkpoint",
                                 only_from=("running",))
            return

    def _child(self, job_id: str) -> int:
        cmd = [self.python, "-m", "icma", "tune", "--job", job_id,
               "--jobs-db", str(self.store.path), "--data-dir", str(self.data_dir),
               "--adapters-dir", str(self.adapters_dir)]
        # The child reads its settings from the environment: the ones that decide what a job
        # may read are this worker's.
        env = {**os.environ, "ICMA_PROGRESS": "false",
               "ICMA_DATA_DIR": str(self.data_dir),
               "ICMA_MODELS_DIR": str(self.settings.models_path()),
               "ICMA_ALLOW_MODEL_DOWNLOADS": str(self.settings.allow_model_downloads).lower()}
        self._proc = proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent, env=env)
        try:
            while proc.poll() is None:
                if self.store.get(job_id).state == "cancelled":
                    proc.send_signal(signal.SIGTERM)  # it checkpoints at its next step
                    try:
                        proc.wait(15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                    break
                if self._stop.wait(self.poll):
                    break
            return proc.wait() if not self._stop.is_set() else 0
        finally:
            self._proc = None


def run_job(store: JobStore, job_id: str, *, settings: Settings, data_dir: Path,
            adapters_dir: Path, stop: threading.Event) -> int:
    """The child's side: run the job's config (``tune`` with ``settings``), report into the
    store, set the final state. Exit code 0 whenever the job's state says what happened."""
    from icma.tuning import Stopped, parse_config, tune

    job = store.get(job_id)
    if job.state != "running":
        return 0
    last = [0.0]
    curve: list[list[float]] = []  # [step, loss]: the page's loss curve

    def progress(p: dict) -> None:
        if p.get("phase") == "training" and p.get("loss") is not None:
            curve.append([p["step"], p["loss"]])
            if len(curve) > CURVE_POINTS:  # keep it small: every other point of the past
                curve[:] = curve[:-1:2] + curve[-1:]
        p = {**p, "curve": curve} if curve else p
        now = time.monotonic()
        if p.get("phase") == "training" and now - last[0] < 0.5 and \
                p.get("step") != p.get("total_steps"):
            return  # at most two writes a second
        last[0] = now
        store.set_progress(job_id, p, done=p.get("step"), total=p.get("total_steps"))

    checked = [0.0, False]

    def should_stop() -> bool:
        if stop.is_set():
            return True
        now = time.monotonic()
        if now - checked[0] >= 1.0:
            checked[0] = now
            checked[1] = store.get(job_id).state != "running"
        return checked[1]

    sources = Sources.for_job(data_dir, settings.data_dir, settings.models_path(),
                              settings.allow_model_downloads, job_id)
    try:
        cfg = parse_config({**job.options, "task": job.task})
        manifest = tune(cfg, settings=settings, data_dir=data_dir, adapters_dir=adapters_dir,
                        on_progress=progress, should_stop=should_stop, sources=sources)
    except Stopped as exc:
        log.info("tune job %s: %s", job_id, exc)
        return 0  # cancelled (state says so) or stopping with the worker (resumes)
    except IcmaError as exc:
        log.info("tune job %s failed: %s", job_id, exc)
        message = public_message(str(exc), {"<data_dir>": data_dir, "<adapters_dir>":
                                            adapters_dir, "<models_dir>": settings.models_path()})
        store.set_state(job_id, "failed", message, only_from=("running",))
        return 0
    summary = {"phase": "done", "adapter": cfg.name, "task": cfg.task,
               "final_loss": manifest["training"]["final_loss"],
               "steps": manifest["training"]["steps"],
               "metrics": _headline(manifest.get("evaluation")), "curve": curve}
    store.set_progress(job_id, summary)
    store.set_state(job_id, "succeeded", f"adapter {cfg.name!r} registered",
                    only_from=("running",))
    return 0


def _headline(evaluation: dict | None) -> dict | None:
    if not evaluation or not evaluation.get("metrics"):
        return None
    keep = ("bleu2", "bleu4", "rouge1", "rouge2", "rougeL", "meteor", "bleu", "exact_match",
            "levenshtein", "validity", "maccs_fts", "rdk_fts", "morgan_fts", "fcd")
    return {k: v for k, v in evaluation["metrics"].items() if k in keep}


def install_stop_signals(stop: threading.Event) -> Callable[[], None]:
    """SIGTERM and SIGINT set ``stop`` (the loop checkpoints and returns at its next step); a
    second Ctrl-C interrupts at once (e.g. while contexts are still being retrieved)."""
    def handler(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    return lambda: [signal.signal(s, h) for s, h in old.items()]
