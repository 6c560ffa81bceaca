"""What a molecule query costs against its heavy-atom count: the data for ICMA_MAX_HEAVY_ATOMS.

Protocol.
(a) Library, one query at a time, one torch thread, in this process: for molecules of 10 to 4,000
heavy atoms in four shapes (alkane chains ``CCC...``, macrocycles ``C1CC...C1`` as in the report
that asked for the limit, para-polyphenyls ``c1ccc(cc1)-...`` and linear acenes, fused aromatic
rings up to the 99 ring labels SMILES has), each stage a query pays is timed on its own (fastest
of 5 runs after one warm-up: the machine is shared, and the minimum is the
cost): ``parse`` (RDKit ``MolFromSmiles`` without sanitising plus the
heavy-atom count: what a refused query costs), ``sanitise`` (``SanitizeMol``: ring perception,
aromaticity), ``canonical`` (``MolToSmiles``), ``morgan`` and ``rdkit`` (the fingerprints of the
two fingerprint indexes), ``featurise`` (``chem.featurize``) and ``gnn`` (the default encoder's
forward pass). The per-method query cost adds what ``POST /v1/retrieve/molecules`` runs for a
query: canonical SMILES (parse, sanitise, canonical), then the index parses the canonical form
again (parse, sanitise) and computes its fingerprint (morgan, rdkit) or its embedding (graph:
featurise + gnn); the search itself does not depend on the query's size. The same stages for the
50 largest molecules of ChEBI-20 (train, validation and test) are the realistic points.
(b) Sizes: heavy atoms (every atom but hydrogen, as the limit counts them) of every SMILES of
ChEBI-20 (train, validation, test), the embedded corpus (validation + test) and PubChem324k.
(c) Service: ``icma serve retrieval --workers 1`` (graph, morgan and rdkit indexes of the
embedded corpus, ICMA_TORCH_THREADS=1) started twice, once with the limit raised past 4,000
(what the service did before it had one) and once with the default. Per configuration: one
macrocycle query per request (``method`` graph, k 2) at each size the limit allows, client wall
clock, fastest of 3; then two requests of 8 queries of the largest size allowed (4,000 atoms, or
the limit), while another client asks ``/healthz`` every 20 ms (its slowest answer is reported);
RSS (``VmRSS`` of the service's processes) before the first and after the second request.

    .venv/bin/python benchmarks/bench_atoms.py [--no-service] [--data-dir DIR]

Writes ``benchmarks/results/atoms.md`` and ``atoms.png``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    REPO,
    RESULTS,
    SHARED,
    git_commit,
    machine,
    spawn_service,
    stop_services,
    write,
)

SIZES = [10, 25, 50, 100, 150, 200, 250, 300, 400, 500, 600, 750, 1000, 1500, 2000, 3000, 4000]
STAGES = ["parse", "sanitise", "canonical", "morgan", "rdkit", "featurise", "gnn"]
#: What one query of each method runs, stage by stage (see the protocol).
METHOD_STAGES = {
    "graph": ["parse", "sanitise", "canonical", "parse", "sanitise", "featurise", "gnn"],
    "morgan": ["parse", "sanitise", "canonical", "parse", "sanitise", "morgan"],
    "rdkit": ["parse", "sanitise", "canonical", "parse", "sanitise", "rdkit"],
}
TARGET_MS = 50.0
SERVICE_SIZES = [10, 50, 100, 250, 500, 600, 1000, 2000, 4000]


def _ring(i: int) -> str:
    return str(i) if i < 10 else f"%{i}"


def shapes() -> dict[str, callable]:
    """Name -> (heavy atoms -> SMILES of about that many heavy atoms, or None past its range)."""
    def acene(n):
        rings = max(2, round((n - 2) / 4))
        if rings > 98:
            return None
        mid = "".join(f"cc{_ring(i)}" for i in range(3, rings + 1))
        back = "".join(f"c{_ring(i)}c" for i in range(rings, 2, -1))
        return "c1ccc2" + mid + "cccc" + back + "c2c1"

    return {
        "chain": lambda n: "C" * n,
        "macrocycle": lambda n: "C1" + "C" * (n - 2) + "C1",
        "polyphenyl": lambda n: "-".join(["c1ccc(cc1)"] * (max(2, n // 6) - 1)) + "-c1ccccc1",
        "acene": acene,
    }


def stage_times(smiles: str, encoder, reps: int = 5) -> dict[str, float]:
    """Milliseconds of each stage for one SMILES: the fastest of ``reps`` runs after a warm-up
    (the machine is shared: the minimum is the cost, the rest is waiting for a core)."""
    from rdkit import Chem

    from icma.core import chem

    runs: dict[str, list[float]] = {s: [] for s in STAGES}
    clock = time.perf_counter
    for r in range(reps + 1):
        t0 = clock()
        mol = Chem.MolFromSmiles(smiles, sanitize=False)
        chem.heavy_atoms(mol)
        t1 = clock()
        Chem.SanitizeMol(mol)
        t2 = clock()
        Chem.MolToSmiles(mol)
        t3 = clock()
        chem.morgan_fp(mol)
        t4 = clock()
        chem.rdkit_path_fp(mol)
        t5 = clock()
        graph = chem.featurize(mol)
        t6 = clock()
        encoder.embed_graphs([graph])
        t7 = clock()
        if r:
            for s, a, b in zip(STAGES, (t0, t1, t2, t3, t4, t5, t6), (t1, t2, t3, t4, t5, t6, t7)):
                runs[s].append((b - a) * 1e3)
    return {s: min(v) for s, v in runs.items()}


def method_ms(t: dict[str, float]) -> dict[str, float]:
    return {m: sum(t[s] for s in stages) for m, stages in METHOD_STAGES.items()}


def heavy_counts(paths: list[Path]) -> np.ndarray:
    from rdkit import Chem

    from icma.core import chem

    out = []
    for path in paths:
        lines = path.read_text(encoding="utf-8").splitlines()
        col = [h.strip().lower() for h in lines[0].split("\t")].index("smiles")
        for line in lines[1:]:
            fields = line.split("\t")
            if len(fields) > col and fields[col].strip():
                mol = Chem.MolFromSmiles(fields[col].strip(), sanitize=False)
                if mol is not None:
                    out.append(chem.heavy_atoms(mol))
    return np.array(out)


def largest(paths: list[Path], n: int) -> list[tuple[int, str]]:
    from rdkit import Chem

    from icma.core import chem

    seen = {}
    for path in paths:
        lines = path.read_text(encoding="utf-8").splitlines()
        col = [h.strip().lower() for h in lines[0].split("\t")].index("smiles")
        for line in lines[1:]:
            fields = line.split("\t")
            if len(fields) > col:
                s = fields[col].strip()
                mol = Chem.MolFromSmiles(s, sanitize=False) if s else None
                if mol is not None:
                    seen[s] = chem.heavy_atoms(mol)
    return sorted(((a, s) for s, a in seen.items()), reverse=True)[:n]


# --- the service ----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(root_pid: int) -> float:
    """Resident memory of a process group's processes (the service and any workers), MB."""
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getpgid(int(d.name)) != root_pid:
                continue
            for line in (d / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ProcessLookupError):
            continue
    return total / 1024


def service_run(limit: int | None, default: int, data_dir: Path, label: str) -> dict:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, ICMA_DATA_DIR=str(data_dir), ICMA_TORCH_THREADS="1",
               ICMA_RETRIEVAL_KINDS='["graph","morgan","rdkit"]', ICMA_PROGRESS="false")
    if limit is not None:
        env["ICMA_MAX_HEAVY_ATOMS"] = str(limit)
    env.pop("ICMA_API_KEY", None)
    proc = spawn_service(["retrieval", "--host", "127.0.0.1", "--port", str(port), "--workers",
                          "1", "--log-level", "warning"], url, env=env, cwd=REPO, timeout=900)
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            effective = client.get("/healthz").json()
            ring = shapes()["macrocycle"]
            singles = {}
            for n in SERVICE_SIZES:
                body = {"smiles": ring(n), "k": 2, "method": "graph"}
                times, status = [], None
                for _ in range(3):
                    t0 = time.perf_counter()
                    r = client.post("/v1/retrieve/molecules", json=body)
                    times.append((time.perf_counter() - t0) * 1e3)
                    status = r.status_code
                singles[n] = (min(times), status)
            big = min(limit or default, 4000)  # the largest query the service takes
            rss_before = _rss_mb(proc.pid)
            stalls: list[float] = []
            stop = threading.Event()

            def poll():
                with httpx.Client(base_url=url, timeout=120) as c:
                    while not stop.is_set():
                        t0 = time.perf_counter()
                        c.get("/healthz")
                        stalls.append((time.perf_counter() - t0) * 1e3)
                        time.sleep(0.02)

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            batch = []
            for _ in range(2):
                t0 = time.perf_counter()
                r = client.post("/v1/retrieve/molecules",
                                json={"smiles": [ring(big)] * 8, "k": 2, "method": "graph"})
                batch.append(((time.perf_counter() - t0) * 1e3, r.status_code))
            stop.set()
            poller.join()
            rss_after = _rss_mb(proc.pid)
            return {"label": label, "limit": limit, "singles": singles, "big": big,
                    "batch": batch, "healthz_max_ms": max(stalls) if stalls else None,
                    "healthz_n": len(stalls), "rss_before": rss_before, "rss_after": rss_after,
                    "worker": effective.get("worker")}
    finally:
        stop_services([proc])


# --- report ---------------------------------------------------------------------------------------

def pick_limit(curves: dict[str, dict[int, dict[str, float]]]) -> int:
    """The largest size (from SIZES) at which every shape's slowest method stays under the target."""
    ok = 0
    for n in SIZES:
        worst = max(max(method_ms(t[n]).values()) for t in curves.values() if n in t)
        if worst > TARGET_MS:
            break
        ok = n
    return ok


def report(curves, real, dist, service, limit_default: int) -> str:
    lines = ["# Query cost against heavy atoms: the ICMA_MAX_HEAVY_ATOMS default", ""]
    pick = pick_limit(curves)
    lines += [
        f"Machine: {machine()}; commit {git_commit()}. One torch thread.", "",
        f"- **The slowest method's query stays under {TARGET_MS:g} ms up to {pick} heavy atoms** "
        f"in every shape measured (largest size of the grid that does); "
        f"the default limit is **{limit_default}**.",
    ]
    at = [(max(method_ms(t[n]).values()), shape, n) for shape, t in curves.items()
          for n in t if n <= limit_default]
    worst, wshape, wn = max(at)
    rworst = max((max(method_ms(t).values()), n) for n, _, t in real)
    lines += [
        f"- Up to the default: the slowest query measured is {worst:.1f} ms ({wshape}, {wn} "
        f"atoms); the largest ChEBI-20 molecules cost at most {rworst[0]:.1f} ms "
        f"({rworst[1]} atoms; the rdkit path fingerprint is the slowest method for them, see "
        "the table below). A lower default would refuse ChEBI-20's own "
        "molecules as queries; a 4,000-atom query costs seconds (below).",
    ]
    for name, d in dist.items():
        lines.append(f"- {name}: {d['n']:,} SMILES, heavy atoms median {d['p50']:.0f}, "
                     f"p99 {d['p99']:.0f}, p99.9 {d['p999']:.0f}, max {d['max']}; "
                     f"{d['over']} above {limit_default}.")
    lines += ["", "## Protocol", "", __doc__.split("Protocol.", 1)[1].split("    .venv")[0].strip(),
              "", "## Per-query cost by method (ms; fastest of 5)", ""]
    for shape, table in curves.items():
        lines += [f"### {shape}", "",
                  "| heavy atoms | " + " | ".join(STAGES) + " | graph query | morgan query | "
                  "rdkit query |", "| ---: " * (len(STAGES) + 4) + "|"]
        for n, t in table.items():
            m = method_ms(t)
            lines.append(f"| {n} | " + " | ".join(f"{t[s]:.2f}" for s in STAGES) + " | " +
                         " | ".join(f"**{m[k]:.1f}**" if m[k] > TARGET_MS else f"{m[k]:.1f}"
                                    for k in METHOD_STAGES) + " |")
        lines.append("")
    lines += ["### The largest ChEBI-20 molecules", "",
              "| heavy atoms | graph query | morgan query | rdkit query | SMILES |",
              "| ---: | ---: | ---: | ---: | --- |"]
    for n, s, t in real[:15]:
        m = method_ms(t)
        lines.append(f"| {n} | {m['graph']:.1f} | {m['morgan']:.1f} | {m['rdkit']:.1f} | "
                     f"`{s[:60]}{'...' if len(s) > 60 else ''}` |")
    lines.append("")
    if service:
        lines += ["## Through the service", "",
                  "`POST /v1/retrieve/molecules`, one macrocycle per request, graph, k 2 "
                  "(client wall clock, ms, fastest of 3; 422: refused by the limit):", "",
                  "| heavy atoms | " + " | ".join(r["label"] for r in service) + " |",
                  "| ---: " * (len(service) + 1) + "|"]
        for n in SERVICE_SIZES:
            cells = []
            for r in service:
                ms, status = r["singles"][n]
                cells.append(f"{ms:.1f}" + ("" if status == 200 else f" ({status})"))
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines += ["", "Two requests of 8 queries of the largest size allowed, /healthz polled "
                  "meanwhile:", "",
                  "| configuration | atoms per query | request 1 ms | request 2 ms | slowest "
                  "/healthz ms | RSS before MB | RSS after MB |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in service:
            (a, sa), (b, sb) = r["batch"]
            lines.append(f"| {r['label']} | {r['big']} | {a:.0f} ({sa}) | {b:.0f} ({sb}) | "
                         f"{r['healthz_max_ms']:.0f} | {r['rss_before']:.0f} | "
                         f"{r['rss_after']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(curves, real, limit_default: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, method in zip(axes, ["graph", "rdkit"]):
        for shape, table in curves.items():
            xs = list(table)
            ax.plot(xs, [method_ms(table[n])[method] for n in xs], marker="o", ms=3, label=shape)
        ax.scatter([n for n, _, _ in real], [method_ms(t)[method] for _, _, t in real], s=10,
                   c="k", label="largest ChEBI-20 molecules", zorder=3)
        ax.axhline(TARGET_MS, ls="--", c="grey", lw=1)
        ax.axvline(limit_default, ls=":", c="red", lw=1, label=f"limit {limit_default}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("heavy atoms")
        ax.set_ylabel("ms per query (one thread)")
        ax.set_title(f"{method} query: RDKit + {'featurise + GNN' if method == 'graph' else 'path fingerprint'}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-service", action="store_true", help="skip the service runs (c)")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="the service's data directory (kept: a second run reuses its indexes)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from icma.core.settings import Settings
    from icma.retrieval.encoders import load_encoder

    limit_default = Settings.model_fields["max_heavy_atoms"].default
    encoder = load_encoder(None, settings=Settings(torch_threads=1, progress=False))
    curves: dict[str, dict[int, dict[str, float]]] = {}
    for shape, make in shapes().items():
        curves[shape] = {}
        for n in SIZES:
            smiles = make(n)
            if smiles is None:
                continue
            from rdkit import Chem

            from icma.core import chem

            atoms = chem.heavy_atoms(Chem.MolFromSmiles(smiles, sanitize=False))
            curves[shape][atoms] = stage_times(smiles, encoder)
            print(shape, atoms, {k: round(v, 1) for k, v in method_ms(curves[shape][atoms]).items()},
                  flush=True)
    chebi = [SHARED / "data/chebi20/partial/train_PARTIAL_cid_smiles_no_description.tsv",
             SHARED / "data/chebi20/validation.txt", SHARED / "data/chebi20/test.txt"]
    chebi = [p for p in chebi if p.exists()]
    real = [(n, s, stage_times(s, encoder)) for n, s in largest(chebi, 50)]
    embedded = REPO / "icma/data/chebi20"
    sets = {"ChEBI-20 (train, validation, test)": chebi,
            "embedded corpus (ChEBI-20 validation + test)": [embedded / "validation.txt",
                                                              embedded / "test.txt"],
            "PubChem324k (test, validation)": [p for p in (SHARED / "data/pubchem324k/test.txt",
                                                           SHARED / "data/pubchem324k/validation.txt")
                                               if p.exists()]}
    dist = {}
    for name, paths in sets.items():
        if not paths:
            continue
        c = heavy_counts(paths)
        dist[name] = {"n": len(c), "p50": np.percentile(c, 50), "p99": np.percentile(c, 99),
                      "p999": np.percentile(c, 99.9), "max": int(c.max()),
                      "over": int((c > limit_default).sum())}
    service = []
    if not args.no_service:
        data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="icma-bench-atoms-"))
        try:
            service.append(service_run(5000, limit_default, data_dir, "limit raised to 5,000 (no limit)"))
            service.append(service_run(None, limit_default, data_dir, f"default limit ({limit_default})"))
        finally:
            if args.data_dir is None:
                shutil.rmtree(data_dir, ignore_errors=True)
    write("atoms.md", report(curves, real, dist, service, limit_default))
    plot(curves, real, limit_default, RESULTS / "atoms.png")


if __name__ == "__main__":
    main()
