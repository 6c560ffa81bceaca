"""Retrieval service under load: latency p50/p90/p99 and throughput at concurrency 1, 8 and 32.

Protocol: the retrieval service runs in its own process group (``python -m icma serve retrieval
--workers N``, 127.0.0.1, an ephemeral port; ICMA_TORCH_THREADS=1, ICMA_RETRIEVAL_KINDS=graph,bm25),
once per worker count (default 1, then 2), 
over a temporary data directory holding two stored corpora, ``<data_dir>/corpora/NAME.tsv``,
which the service loads and indexes at start-up:

- ``chebi20-train``: the 26,409 ChEBI-20 train molecules (no captions: a graph index only),
  queried with ``POST /v1/retrieve/molecules`` (method graph, k 2, the service default) with the
  ChEBI-20 test SMILES;
- ``pubchem324k-iupac-train``: the 11,856 PubChem324k-IUPAC train captions, queried with
  ``POST /v1/retrieve/captions`` (method bm25, k 4, the service default) with its test captions.

The load generator (this process) is a closed loop on 127.0.0.1: N clients, each with its own
keep-alive connection, send one query per request back to back. Per endpoint and concurrency: a
warm-up (2 s, discarded), then a measured run that stops issuing at 10 s or 2,000 requests,
whichever comes first; in-flight requests complete. Latency is the client's wall clock from
writing the request to reading the whole response; throughput = 200 responses / elapsed. The
default client is a minimal HTTP/1.1 client on asyncio streams (a few tens of microseconds of CPU
a request, so that the measuring takes as little as possible of the 2 cores it shares with the
server); ``--client httpx`` uses httpx.AsyncClient instead.

    .venv/bin/python benchmarks/bench_retrieval_service.py [--quick] [--client raw|httpx]
        [--workers 1,2] [--data-dir DIR (kept: a second run reuses its cached indexes)]

Writes ``benchmarks/results/retrieval_service.md`` and ``.png`` (``-quick`` with --quick: every
9th train molecule and every 4th train caption, 0.5 s warm-up, 2 s or 300 requests a level).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    REPO,
    RESULTS,
    SHARED,
    git_commit,
    machine,
    pct,
    spawn_service,
    stop_services,
)
from icma.server.spawn import ServiceFailed  # noqa: E402

CHEBI_TRAIN = SHARED / "data/chebi20/partial/train_PARTIAL_cid_smiles_no_description.tsv"
CHEBI_TEST = SHARED / "data/chebi20/test.txt"
PUBCHEM_TRAIN = SHARED / "data/pubchem324k-iupac/train.txt"
PUBCHEM_TEST = SHARED / "data/pubchem324k-iupac/test.txt"
GRAPH_CORPUS, BM25_CORPUS = "chebi20-train", "pubchem324k-iupac-train"
CONCURRENCY = (1, 8, 32)
TARGETS = {"bm25": 300.0, "graph": 150.0}  # req/s at concurrency 8
TARGET_P99_MS = 25.0  # at concurrency 8
TARGET_AT = 8
REQUEST_TIMEOUT = 30.0


# --- the server ------------------------------------------------------------------------------

def prepare(data_dir: Path, quick: bool) -> None:
    """The two corpora as stored uploads (the service reads ``corpora/*.tsv`` at start-up)."""
    folder = data_dir / "corpora"
    folder.mkdir(parents=True, exist_ok=True)
    for name, src, every in ((GRAPH_CORPUS, CHEBI_TRAIN, 9), (BM25_CORPUS, PUBCHEM_TRAIN, 4)):
        dst = folder / f"{name}.tsv"
        if not quick:
            if not dst.exists() or dst.stat().st_size != src.stat().st_size:
                shutil.copyfile(src, dst)
            continue
        lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
        text = "".join(lines[:1] + lines[1::every])
        if not dst.exists() or dst.read_text(encoding="utf-8") != text:
            dst.write_text(text, encoding="utf-8")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(url: str, port: int, workers: int, data_dir: Path, log_path: Path,
                 extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, dict]:
    """The product's own command, ``icma serve retrieval`` (icma.server.supervisor), in its own
    process group, returned with /v1/corpora's entries once every worker reports both corpora
    ready (4 answers a worker in a row: each worker answers for itself)."""
    env = dict(os.environ, ICMA_DATA_DIR=str(data_dir), ICMA_TORCH_THREADS="1",
               ICMA_RETRIEVAL_KINDS='["graph","bm25"]', ICMA_PROGRESS="false",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ICMA_API_KEY", None)
    env.update(extra_env or {})
    names, corpora = (GRAPH_CORPUS, BM25_CORPUS), {}

    def both_ready() -> bool:
        corpora.update((c["name"], c) for c in
                       httpx.get(url + "/v1/corpora", timeout=5).json()["corpora"])
        failed = [corpora[n] for n in names if corpora.get(n, {}).get("state") == "failed"]
        if failed:
            raise ServiceFailed(f"index build failed: {failed}")
        return all(corpora.get(n, {}).get("state") == "ready" for n in names)

    proc = spawn_service(["retrieval", "--host", "127.0.0.1", "--port", str(port), "--workers",
                          str(workers), "--log-level", "warning"], url, env=env, cwd=REPO,
                         log=log_path, check=both_ready, confirmations=4 * workers)
    return proc, corpora


def system_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: everything but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def wait_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (at most ``max_wait`` s) until other work uses under ``threshold`` of a core over a
    second; returns the busy share last seen (in cores)."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = system_busy_seconds(), time.monotonic()
        time.sleep(1.0)
        busy = (system_busy_seconds() - b0) / (time.monotonic() - t0)
        if busy < threshold or time.monotonic() >= deadline:
            return busy
        print(f"machine busy ({busy:.0%} of a core used by other work): waiting", flush=True)


def tree_cpu_seconds(root: int) -> float:
    """user + system CPU seconds of a process and its descendants (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats, children = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            raw = (d / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2:].split()
        pid, ppid = int(d.name), int(fields[1])
        stats[pid] = (int(fields[11]) + int(fields[12])) / tick
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return total


# --- the load generator ----------------------------------------------------------------------

class RawConnection:
    """One keep-alive HTTP/1.1 connection: write a prepared request, read status and body."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, chunked, close = 0, False, False
        for line in lines[1:]:
            key, _, value = line.partition(b":")
            key = key.strip().lower()
            if key == b"content-length":
                length = int(value)
            elif key == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif key == b"connection":
                close = b"close" in value.lower()
        if chunked:
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                parts.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            body = b"".join(p[:-2] for p in parts)
        else:
            body = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, body


def raw_requests(path: str, port: int, bodies: list[bytes]) -> list[bytes]:
    return [(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json"
             f"\r\nContent-Length: {len(b)}\r\n\r\n").encode() + b for b in bodies]


async def run_level(kind: str, client: str, port: int, path: str, bodies: list[bytes],
                    concurrency: int, seconds: float, max_requests: int, offset: int) -> dict:
    """One closed-loop run: ``concurrency`` clients, back to back, until ``seconds`` have passed
    or ``max_requests`` were issued; in-flight requests finish. Queries from ``offset`` on."""
    url = f"http://127.0.0.1:{port}"
    n = len(bodies)
    issued = 0
    lat: list[float] = []
    server_ms: list[float] = []
    errors: list[str] = []
    if client == "raw":
        payloads = raw_requests(path, port, bodies)
        conns = [RawConnection("127.0.0.1", port) for _ in range(concurrency)]
    else:
        payloads = bodies
        hx = httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT, limits=httpx.Limits(
            max_connections=concurrency, max_keepalive_connections=concurrency))
        headers = {"content-type": "application/json"}

    async def send(w: int, i: int) -> tuple[int, bytes]:
        if client == "raw":
            return await conns[w].request(payloads[i])
        r = await hx.post(path, content=payloads[i], headers=headers)
        return r.status_code, r.content

    async def worker(w: int, deadline: float) -> None:
        nonlocal issued
        while issued < max_requests and time.perf_counter() < deadline:
            i = (offset + issued) % n
            issued += 1
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    status, body = await send(w, i)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                if client == "raw":
                    await conns[w].close()
                continue
            except Exception as exc:  # httpx's own errors
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            t1 = time.perf_counter()
            if status != 200:
                errors.append(f"HTTP {status}: {body[:200]!r}")
                continue
            lat.append(t1 - t0)
            try:
                server_ms.append(json.loads(body)["timings"]["total_ms"])
            except (ValueError, KeyError):
                errors.append(f"bad body: {body[:200]!r}")

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker(w, t0 + seconds) for w in range(concurrency)))
    finally:
        elapsed = time.perf_counter() - t0
        client_cpu = time.process_time() - cpu0
        if client == "raw":
            await asyncio.gather(*(c.close() for c in conns))
        else:
            await hx.aclose()
    ms = np.asarray(lat) * 1e3
    out = {"kind": kind, "concurrency": concurrency, "issued": issued, "ok": len(lat),
           "errors": len(errors), "error_examples": sorted(set(errors))[:5],
           "elapsed": elapsed, "rps": len(lat) / elapsed, "client_cpu": client_cpu}
    if len(ms):
        out.update(p50=pct(ms, 50), p90=pct(ms, 90), p99=pct(ms, 99), mean=float(ms.mean()),
                   max=float(ms.max()), server_p50=pct(server_ms, 50) if server_ms else None,
                   server_p99=pct(server_ms, 99) if server_ms else None,
                   lat=ms.tolist())
    return out


# --- the run ---------------------------------------------------------------------------------

def queries() -> dict[str, list[str]]:
    from icma.core.corpus import read_corpus

    smiles, _ = read_corpus(CHEBI_TEST)  # invalid SMILES skipped: they would be 422s, not load
    captions, _ = read_corpus(PUBCHEM_TEST, on_invalid="keep")
    return {"graph": list(smiles.smiles), "bm25": list(captions.descriptions)}


def bodies_for(kind: str, texts: list[str]) -> tuple[str, list[bytes], int]:
    if kind == "graph":
        k = 2
        return "/v1/retrieve/molecules", [json.dumps(
            {"smiles": s, "corpus": GRAPH_CORPUS, "method": "graph", "k": k}).encode()
            for s in texts], k
    k = 4
    return "/v1/retrieve/captions", [json.dumps(
        {"caption": c, "corpus": BM25_CORPUS, "method": "bm25", "k": k}).encode()
        for c in texts], k


def check_answers(url: str, kind: str, path: str, body: bytes, k: int) -> None:
    r = httpx.post(url + path, content=body, headers={"content-type": "application/json"},
                   timeout=30)
    r.raise_for_status()
    res = r.json()["results"]
    if len(res) != 1 or len(res[0]["examples"]) != k:
        raise RuntimeError(f"{kind}: unexpected answer {r.text[:300]}")


def run(args) -> dict:
    """Every worker count in turn, each on a fresh server over the same data directory (the
    first start builds the index caches; its build time is reported as the start-up)."""
    quick = args.quick
    warm, seconds, max_req = (0.5, 2.0, 300) if quick else (2.0, 10.0, 2000)
    own_dir = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="icma-bench-svc-")) if own_dir else Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "server.log"
    prepare(data_dir, quick)
    texts = queries()
    load0 = os.getloadavg()
    extra_env = dict(kv.split("=", 1) for kv in args.env)
    configs, quiet, first_start = [], None, None
    try:
        for workers in args.workers:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            t_start = time.perf_counter()
            proc, corpora = start_server(url, port, workers, data_dir, log_path, extra_env)
            try:
                startup = time.perf_counter() - t_start
                first_start = first_start or startup
                print(f"{workers} worker(s) ready in {startup:.1f} s (pid {proc.pid}); "
                      + ", ".join(f"{n}: {corpora[n]['size']:,} records, "
                                  f"{[i['kind'] for i in corpora[n]['indexes']]}"
                                  for n in (GRAPH_CORPUS, BM25_CORPUS)), flush=True)
                quiet = wait_quiet(args.idle_wait) if quiet is None else quiet
                levels = measure(texts, port, url, proc, args.client, warm, seconds, max_req,
                                 workers)
            finally:
                stop_services([proc])
            configs.append({"workers": workers, "startup": startup, "levels": levels})
    finally:
        if own_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
    import torch

    return {"quick": quick, "commit": git_commit(), "client": args.client, "env": extra_env,
            "machine": machine(), "torch": torch.__version__, "cores": os.cpu_count(),
            "load_start": load0, "busy_before": quiet, "load_end": os.getloadavg(),
            "first_start": first_start, "configs": configs,
            "sizes": {n: corpora[n]["size"] for n in (GRAPH_CORPUS, BM25_CORPUS)},
            "n_queries": {k: len(v) for k, v in texts.items()},
            "warm": warm, "seconds": seconds, "max_requests": max_req,
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def measure(texts, port, url, proc, client, warm, seconds, max_req, workers) -> list[dict]:
    levels = []
    for kind in ("graph", "bm25"):
        path, bodies, k = bodies_for(kind, texts[kind])
        check_answers(url, kind, path, bodies[0], k)
        for c in CONCURRENCY:
            asyncio.run(run_level(kind, client, port, path, bodies, c, warm, 10**9,
                                  offset=len(bodies) // 2))
            cpu0, busy0 = tree_cpu_seconds(proc.pid), system_busy_seconds()
            x = asyncio.run(run_level(kind, client, port, path, bodies, c, seconds, max_req,
                                      offset=0))
            x["server_cpu"] = tree_cpu_seconds(proc.pid) - cpu0
            x["other_cpu"] = max(0.0, system_busy_seconds() - busy0 - x["server_cpu"]
                                 - x["client_cpu"])
            x["k"], x["path"] = k, path
            levels.append(x)
            print(f"w={workers} {kind:5s} c={c:2d}: {x['ok']:5d} ok, {x['errors']} errors, "
                  f"{x['rps']:7.1f} req/s, p50 {x.get('p50', float('nan')):6.2f} ms, "
                  f"p99 {x.get('p99', float('nan')):6.2f} ms, server handler p50 "
                  f"{x.get('server_p50') or float('nan'):.2f} ms; CPU server "
                  f"{x['server_cpu'] / x['elapsed']:.0%}, client "
                  f"{x['client_cpu'] / x['elapsed']:.0%}, other "
                  f"{x['other_cpu'] / x['elapsed']:.0%}", flush=True)
            if x["error_examples"]:
                print("   errors:", x["error_examples"], flush=True)
    return levels


# --- the report ------------------------------------------------------------------------------

def verdicts(levels: list[dict]) -> list[tuple[str, bool, str]]:
    at = {(x["kind"], x["concurrency"]): x for x in levels}
    out = []
    for kind in ("bm25", "graph"):
        x = at[(kind, TARGET_AT)]
        out.append((f"{kind}: >= {TARGETS[kind]:.0f} req/s at concurrency {TARGET_AT}",
                    x["rps"] >= TARGETS[kind], f"{x['rps']:.0f} req/s"))
    for kind in ("bm25", "graph"):
        x = at[(kind, TARGET_AT)]
        p99 = x.get("p99", float("inf"))
        out.append((f"{kind}: p99 <= {TARGET_P99_MS:.0f} ms at concurrency {TARGET_AT}",
                    p99 <= TARGET_P99_MS, f"{p99:.1f} ms"))
    errs = sum(x["errors"] for x in levels)
    out.append(("0 errors (every level)", errs == 0, f"{errs} errors"))
    return out


def _workers(n: int) -> str:
    return f"{n} worker" + ("s" if n > 1 else "")


def report(r: dict, stem: str) -> str:
    cfgs = r["configs"]
    table = [verdicts(c["levels"]) for c in cfgs]
    lines = [
        "# Retrieval service under load: latency and throughput at concurrency 1, 8, 32",
        "",
        "Service (`icma serve retrieval --workers N`) and load generator on the same 2-core "
        "machine, one configuration after the other in one run (see the protocol)."
        + (" **Quick run: every 9th train molecule, every 4th train caption, short levels.**"
           if r["quick"] else ""),
        "",
        "| target | " + " | ".join(_workers(c["workers"]) for c in cfgs) + " |",
        "| --- |" + " ---: |" * len(cfgs),
    ]
    for i, (name, _, _) in enumerate(table[0]):
        cells = [f"{t[i][2]} ({'met' if t[i][1] else '**NOT met**'})" for t in table]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Results", ""]
    titles = {"graph": f"Graph retrieval: `POST /v1/retrieve/molecules`, method graph, k 2, over "
                       f"{r['sizes'][GRAPH_CORPUS]:,} ChEBI-20 train molecules",
              "bm25": f"BM25: `POST /v1/retrieve/captions`, method bm25, k 4, over "
                      f"{r['sizes'][BM25_CORPUS]:,} PubChem324k-IUPAC train captions"}
    for kind in ("graph", "bm25"):
        lines += [f"### {titles[kind]}", "",
                  "| workers | concurrency | requests | errors | req/s | p50 ms | p90 ms | p99 ms "
                  "| max ms | handler p50 ms | server CPU | client CPU | other CPU |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
                  "| ---: | ---: |"]
        for c in cfgs:
            for x in c["levels"]:
                if x["kind"] != kind:
                    continue
                e = x["elapsed"]
                lines.append(
                    f"| {c['workers']} | {x['concurrency']} | {x['ok'] + x['errors']:,} | "
                    f"{x['errors']} | **{x['rps']:.1f}** | {x.get('p50', float('nan')):.2f} | "
                    f"{x.get('p90', float('nan')):.2f} | **{x.get('p99', float('nan')):.2f}** | "
                    f"{x.get('max', float('nan')):.1f} | "
                    f"{x.get('server_p50') or float('nan'):.2f} | "
                    f"{x['server_cpu'] / e:.0%} | {x['client_cpu'] / e:.0%} | "
                    f"{x['other_cpu'] / e:.0%} |")
        lines.append("")
    ex = [(c["workers"], x["kind"], x["concurrency"], x["error_examples"]) for c in cfgs
          for x in c["levels"] if x["error_examples"]]
    if ex:
        lines += ["Errors seen:", ""] + [f"- {w} workers, {k} c={n}: {e}"
                                         for w, k, n, e in ex] + [""]
    lines += [
        "Columns: requests = completed (200 + errors); req/s = 200 responses / elapsed; latency =",
        "client wall clock per request; handler p50 = the service's own `timings.total_ms` (the",
        "endpoint function, from validation to response model, without HTTP, JSON encoding,",
        "middleware or thread-pool hand-off); CPU = CPU seconds / elapsed seconds of the server",
        "processes and of the load generator (200% = both cores); other CPU = the rest of the",
        "machine's busy time over the level (kernel networking and interrupts, and any other",
        "work on this shared machine).",
        "",
        "## Reading the numbers",
        *reading(r),
        "",
        "## Protocol",
        "- Server: `python -m icma serve retrieval --workers N --log-level warning` (the product's "
        "command: uvicorn,",
        "  uvloop and httptools; with N > 1 a supervisor and N worker processes sharing one "
        "socket, see `icma/server/supervisor.py`)",
        "  in a separate process group on 127.0.0.1, an ephemeral port; ICMA_TORCH_THREADS=1,",
        "  ICMA_RETRIEVAL_KINDS=[graph, bm25], no API key"
        + (", and " + ", ".join(f"{k}={v}" for k, v in r["env"].items()) if r["env"] else "")
        + ". Its data directory holds the two corpora",
        "  as stored uploads (`<data_dir>/corpora/chebi20-train.tsv`, a copy of",
        "  `chebi20/partial/train_PARTIAL_cid_smiles_no_description.tsv`, no captions, so a graph",
        "  index only; `pubchem324k-iupac-train.tsv`, a copy of `pubchem324k-iupac/train.txt`, graph",
        "  and BM25 indexes). The first configuration's start "
        f"({r['first_start']:.0f} s until `/readyz` and `/v1/corpora` showed every",
        "  corpus ready) found an empty index cache and built them (plus the embedded ChEBI-20 "
        "corpus's) unless",
        "  `--data-dir` kept them from an earlier run; later ones load the cache. Load starts "
        "once every worker",
        "  reports every corpus ready: no index build runs during it.",
        f"- Queries: graph, the {r['n_queries']['graph']:,} ChEBI-20 test SMILES (`chebi20/test.txt`,"
        " valid ones);",
        f"  BM25, the {r['n_queries']['bm25']:,} PubChem324k-IUPAC test captions. One query per "
        "request, taken in",
        "  file order from the start at each level (the warm-up starts half-way through the file).",
        "  k: graph 2 (the service default; the ICMA 2-shot setting), BM25 4 (the service default).",
        "- Load: closed loop, N clients (N = concurrency), each with its own keep-alive connection,",
        "  requests back to back. Per endpoint and N: a warm-up of "
        f"{r['warm']:g} s (discarded, its own connections), then a run that stops",
        f"  issuing at {r['seconds']:g} s or {r['max_requests']:,} requests, whichever first; "
        "in-flight requests finish",
        f"  and count. Request timeout {REQUEST_TIMEOUT:g} s. Client: "
        + ("a minimal HTTP/1.1 client on asyncio streams (prepared request bytes; reads the status "
           "line, headers and Content-Length body; parses the JSON for the handler timing)."
           if r["client"] == "raw" else "httpx.AsyncClient with a pool of N connections."),
        "- **The load generator runs on the same 2-core machine as the server** (one Python",
        "  process, one core at most): every CPU second it spends is taken from the server, so",
        "  these numbers are a lower bound for a server with its cores to itself.",
        "",
        "## Machine",
        f"{r['machine']}; torch {r['torch']}; {r['when']}; commit {r['commit']}.",
        f"Load average (1/5/15 min) at start {' / '.join(f'{x:.2f}' for x in r['load_start'])}, "
        f"at end {' / '.join(f'{x:.2f}' for x in r['load_end'])}; other work used "
        f"{r['busy_before']:.0%} of a core in the second before the first level (the 'other CPU'",
        "column shows it per level).",
        "",
        f"![throughput and p99 vs concurrency]({stem}.png)",
        "",
    ]
    return "\n".join(lines)


def reading(r: dict) -> list[str]:
    """Observations that follow from this run's own numbers."""
    n = TARGET_AT
    out = []
    for c in r["configs"]:
        at = {(x["kind"], x["concurrency"]): x for x in c["levels"]}
        parts = []
        for kind in ("graph", "bm25"):
            x = at.get((kind, n))
            if x and x["rps"] > 0:
                parts.append(f"{kind} {x['rps']:.0f} req/s -> {n / x['rps'] * 1e3:.1f} ms "
                             f"(measured mean {x.get('mean', float('nan')):.1f} ms), "
                             f"{x['server_cpu'] / x['elapsed']:.0%} server CPU, "
                             f"{x['server_cpu'] / max(x['ok'], 1) * 1e3:.2f} CPU ms a request")
        out.append(f"- {_workers(c['workers'])} at concurrency {n}: " + "; ".join(parts) + ".")
    out.append(f"- Closed loop: mean latency = concurrency / throughput (Little's law), so at "
               f"concurrency {n} a p99 of {TARGET_P99_MS:.0f} ms needs more than "
               f"{n / TARGET_P99_MS * 1e3:.0f} req/s even if every request took the same time.")
    at = {(x["kind"], x["concurrency"]): x for x in r["configs"][0]["levels"]}
    parts = []
    for kind in ("graph", "bm25"):
        x = at.get((kind, 1))
        if x and x.get("server_p50") is not None:
            parts.append(f"{kind} {x['p50']:.2f} ms at the client, {x['server_p50']:.2f} ms in "
                         "the handler")
    out.append(f"- Cost of the HTTP layer, one request at a time (p50, "
               f"{_workers(r['configs'][0]['workers'])}): " + "; ".join(parts) +
               ". The difference is uvicorn, the middleware, request validation, JSON encoding "
               "and the client.")
    out.append("- One Python process runs Python code on one core at a time (the GIL): a single "
               "worker uses about one core whatever the concurrency (beyond 100% is native code "
               "that releases the GIL). Worker processes put both cores to work: the supervisor "
               "deals connections out to them in turn as they are opened (here 4 and 4 at "
               "concurrency 8), and a keep-alive connection stays with its worker.")
    out.append("- The 'other CPU' column sees only this machine's processes; contention on the "
               "host under this virtual machine is invisible and moves the numbers between runs: "
               "compare configurations within one run, not across days.")
    return out


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    styles = ["--", "-", ":", "-."]
    for j, cfg in enumerate(r["configs"]):
        ls = styles[j % len(styles)]
        for i, kind in enumerate(("graph", "bm25")):
            xs = [x for x in cfg["levels"] if x["kind"] == kind]
            c = [x["concurrency"] for x in xs]
            label = {"graph": "graph (k 2)", "bm25": "BM25 (k 4)"}[kind] + \
                f", {_workers(cfg['workers'])}"
            ax1.plot(c, [x["rps"] for x in xs], "o" + ls, color=f"C{i}", label=label)
            ax2.plot(c, [x.get("p99", np.nan) for x in xs], "o" + ls, color=f"C{i}",
                     label=f"{label} p99")
    for i, kind in enumerate(("graph", "bm25")):
        ax1.axhline(TARGETS[kind], color=f"C{i}", ls=":", lw=1)
        ax1.text(CONCURRENCY[-1], TARGETS[kind], f"{kind} target at c={TARGET_AT}", fontsize=7,
                 ha="right", va="bottom", color=f"C{i}")
    ax2.axhline(TARGET_P99_MS, color="k", ls=":", lw=1)
    ax2.text(1, TARGET_P99_MS, f"p99 target (c={TARGET_AT})", fontsize=7, va="bottom")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(CONCURRENCY)
        ax.set_xticklabels([str(c) for c in CONCURRENCY])
        ax.set_xlabel("concurrency (closed-loop clients)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ax1.set_ylabel("requests / s")
    ax1.set_ylim(bottom=0)
    ax1.set_title("throughput", fontsize=9)
    ax2.set_yscale("log")
    ax2.set_ylabel("p99 latency (ms, log scale)")
    ax2.set_title("p99 latency", fontsize=9)
    fig.suptitle(f"retrieval service, server + load generator on {r['cores']} cores"
                 + (" (quick)" if r["quick"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smaller corpora, 0.5 s warm-up, 2 s or 300 requests a level")
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw",
                    help="load generator HTTP client (default: a minimal asyncio one)")
    ap.add_argument("--workers", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2],
                    help="worker process counts to measure, one after the other (default 1,2)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the server (repeatable), e.g. "
                         "OPENBLAS_NUM_THREADS=1")
    ap.add_argument("--data-dir", default=None,
                    help="keep corpora and index caches here (default: a temporary directory, "
                         "removed afterwards)")
    ap.add_argument("--idle-wait", type=float, default=120.0,
                    help="before measuring, wait up to this many seconds for other work on the "
                         "machine to stop")
    ap.add_argument("--out", default=None, help="results stem (default: retrieval_service)")
    args = ap.parse_args(argv)
    r = run(args)
    stem = args.out or ("retrieval_service" + ("-quick" if args.quick else ""))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.md").write_text(report(r, stem))
    plot(r, RESULTS / f"{stem}.png")
    print(f"wrote {RESULTS / stem}.md and .png")
    for cfg in r["configs"]:
        for name, ok, _ in verdicts(cfg["levels"]):
            if not ok:
                print(f"WARNING: {_workers(cfg['workers'])}: target not met: {name}",
                      file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
