"""``icma serve all``: both services on one machine, started in order, with a first request each.

The retrieval service starts first (its first start indexes the embedded corpus, a minute or
two on 2 cores; later starts load the cache), then the worker pointed at it. When both are
ready, one real /mol2cap and /cap2mol request shows that the whole path works, and the ``curl``
calls to try are printed. Ctrl-C (or SIGTERM) stops both.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Callable

import httpx

from icma.core.settings import Settings
from icma.server.spawn import ServiceFailed, spawn_service, stop_services

EXAMPLE_SMILES = "CC(=O)Oc1ccccc1C(=O)O"
EXAMPLE_CAPTION = ("The molecule is a member of the class of benzoic acids that is salicylic acid "
                   "in which the hydroxy group has been acetylated.")


def _index_progress(url: str) -> str | None:
    try:
        corpora = httpx.get(url + "/v1/corpora", timeout=2).json()["corpora"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    for c in corpora:
        if c["state"] != "ready":
            p = c["progress"]
            return (f"indexing {c['name']} ({c['size']} pairs): {p['indexes_done']}/"
                    f"{p['indexes_total']} indexes done"
                    + (f", building {p['building']}" if p.get("building") else ""))
    return None


def curl_examples(worker: str, key: str | None) -> list[str]:
    auth = f" -H 'Authorization: Bearer {key}'" if key else ""
    j = "-H 'Content-Type: application/json'"
    return [
        f"curl -s {worker}/mol2cap {j}{auth} -d '{{\"smiles\": \"{EXAMPLE_SMILES}\"}}'",
        f"curl -s {worker}/cap2mol {j}{auth} -d '{{\"caption\": \"{EXAMPLE_CAPTION}\", "
        f"\"num_candidates\": 3}}'",
        f"curl -s {worker}/v1/jobs {j}{auth} -d '{{\"task\": \"mol2cap\", \"items\": "
        f"[\"CCO\", \"c1ccccc1O\"]}}'",
        f"curl -s {worker}/v1/jobs/JOB_ID/results{auth}",
        f"curl -s {worker}/v1/adapters{auth}",
    ]


def run_stack(settings: Settings, host: str = "127.0.0.1", retrieval_port: int = 8001,
              worker_port: int = 8000, once: bool = False, say: Callable[[str], None] = print,
              timeout: float = 1800) -> int:
    key = settings.api_key.get_secret_value() if settings.api_key else None
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    retrieval, worker = f"http://{shown}:{retrieval_port}", f"http://{shown}:{worker_port}"
    # The services read their settings from the environment they start in; the engine and
    # model are the ones these settings name (the command line may have set them).
    env = {**os.environ, "ICMA_RETRIEVAL_URL": retrieval, "ICMA_ENGINE": settings.engine,
           "ICMA_LLM_MODEL": settings.llm_model}
    procs: list[subprocess.Popen] = []
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        say(f"starting the retrieval service on {retrieval} (data: {settings.data_dir})")
        procs.append(spawn_service(["retrieval", "--host", host, "--port", str(retrieval_port),
                                    "--log-level", "warning"], retrieval, env=env,
                                   name="retrieval service", timeout=timeout, say=say,
                                   detail=lambda: _index_progress(retrieval)))
        say(f"starting the translation worker on {worker} (engine {settings.engine}, model "
            f"{settings.llm_model})")
        procs.append(spawn_service(["worker", "--host", host, "--port", str(worker_port),
                                    "--log-level", "warning"], worker, env=env, name="worker",
                                   timeout=timeout, say=say))
        headers = {"authorization": f"Bearer {key}"} if key else {}
        for path, body in (("/mol2cap", {"smiles": EXAMPLE_SMILES,
                                         "generation": {"max_new_tokens": 96}}),
                           ("/cap2mol", {"caption": EXAMPLE_CAPTION, "num_candidates": 3,
                                         "generation": {"max_new_tokens": 96}})):
            r = httpx.post(worker + path, json=body, headers=headers, timeout=600)
            if r.status_code != 200:
                raise ServiceFailed(f"POST {path} answered {r.status_code}: {r.text[:300]}")
            out = r.json()
            answer = out.get("caption") if path == "/mol2cap" else (
                f"{out['smiles']} (valid: {out['valid']}, {out['candidates_tried']} tried)")
            say(f"\nPOST {path} -> {answer}\n  examples: "
                f"{', '.join('CID ' + e['cid'] for e in out['examples'])}; timings: "
                f"{json.dumps(out['timings'])}")
        say("\nBoth services are up. Try:\n  " + "\n  ".join(curl_examples(worker, key))
            + f"\nAPI documents: {retrieval}/docs and {worker}/docs. Ctrl-C stops both.")
        while not once and not stop["now"]:
            for p in procs:
                if p.poll() is not None:
                    raise ServiceFailed(f"a service exited with status {p.returncode}")
            time.sleep(0.5)
        return 0
    finally:
        stop_services(reversed(procs))
        for s, h in old.items():
            signal.signal(s, h)
