"""What a drawing costs: RDKit's layout and SVG, and the shared-atoms (MCS) search, by size.

Molecules of the ChEBI-20 validation split in buckets of heavy atoms; per molecule the time of
one uncached drawing (``icma.core.depict``, 320 x 240), and per pair of molecules from the same
bucket the time of the MCS search under the worker's default time limit. The largest bucket
holds the split's largest molecules. This is what ``ICMA_DEPICT_MAX_HEAVY_ATOMS`` is set from:
a client may ask for any drawing, so one must stay cheap.

    .venv/bin/python benchmarks/bench_depict.py [--per-bucket 5]

Writes benchmarks/results/depict.md and depict.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, SHARED, facts_line, run_facts, write  # noqa: E402

ALL_ABOVE = 100  # heavy atoms: every molecule larger than this is drawn
BUCKETS = [(1, 25), (26, 50), (51, 100), (101, 150), (151, 200), (201, 300), (301, 1000)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-bucket", type=int, default=5)
    args = ap.parse_args()

    from rdkit import Chem

    from icma.core.chem import heavy_atoms
    from icma.core.corpus import read_corpus
    from icma.core.depict import _draw, shared_substructure
    from icma.core.settings import Settings

    timeout = Settings().depict_mcs_timeout_s
    corpus, _ = read_corpus(SHARED / "data/chebi20/validation.txt")
    sized = []
    for r in corpus.records:
        mol = Chem.MolFromSmiles(r.smiles)
        if mol is not None:
            sized.append((heavy_atoms(mol), Chem.MolToSmiles(mol)))
    sized.sort()
    facts = run_facts(os.getloadavg()[0])
    rows, points = [], []
    for lo, hi in BUCKETS:
        members = [s for s in sized if lo <= s[0] <= hi]
        # Large molecules are few and their cost varies most (ring systems): every one of them
        # is drawn. Small ones: a spread over the bucket, its largest always in.
        if lo > ALL_ABOVE:
            picked = members
        else:
            step = max(1, len(members) // args.per_bucket)
            picked = (members[::step][:args.per_bucket - 1] + members[-1:]) if members else []
        draws, mcs, complete = [], [], 0
        for atoms, smiles in picked:
            _draw.cache_clear()
            t = time.perf_counter()
            _draw(smiles, None, 320, 240, timeout)
            dt = time.perf_counter() - t
            draws.append(dt)
            points.append((atoms, dt))
        for (_, a), (_, b) in list(zip(picked, picked[1:]))[-args.per_bucket:]:
            t = time.perf_counter()
            *_, done = shared_substructure(Chem.MolFromSmiles(a), Chem.MolFromSmiles(b), timeout)
            mcs.append(time.perf_counter() - t)
            complete += done
        rows.append((lo, hi, len(members), [p[0] for p in picked], draws, mcs, complete))
        print(lo, hi, len(members), [round(d, 3) for d in draws], [round(m, 3) for m in mcs],
              flush=True)

    lines = ["# Drawing cost by molecule size", "",
             f"Produced by `benchmarks/bench_depict.py`. {facts_line(facts)} Every molecule over "
             f"{ALL_ABOVE} heavy atoms and a spread of {args.per_bucket} below, each drawn once, "
             f"uncached (RDKit layout + SVG, 320 x 240); MCS between neighbouring picks of a "
             f"bucket (at most --per-bucket pairs) with the worker's time limit of {timeout} s "
             "(`ICMA_DEPICT_MAX_HEAVY_ATOMS`, `ICMA_DEPICT_MCS_TIMEOUT_S`). ChEBI-20 "
             f"validation split, {len(sized)} molecules.", "",
             "| heavy atoms | molecules in split | drawn (their atoms) | drawing, median | drawing, "
             "max | MCS, median | MCS, max | MCS finished |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for lo, hi, n, atoms, draws, mcs, complete in rows:
        if not draws:
            continue
        med = sorted(draws)[len(draws) // 2]
        mmed = sorted(mcs)[len(mcs) // 2] if mcs else None
        drawn = "all" if lo > ALL_ABOVE else ", ".join(map(str, atoms))
        lines.append(f"| {lo}-{hi} | {n} | {drawn} | {med:.3f} s | "
                     f"{max(draws):.3f} s | " + (f"{mmed:.3f} s | {max(mcs):.3f} s | "
                                                 f"{complete} of {len(mcs)}" if mcs else
                                                 "| |") + " |")
    write("depict.md", "\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(*zip(*points))
    ax.set_yscale("log")
    ax.set_xlabel("heavy atoms")
    ax.set_ylabel("seconds per drawing (uncached)")
    ax.axvline(Settings().depict_max_heavy_atoms, color="k", linestyle="--",
               label="ICMA_DEPICT_MAX_HEAVY_ATOMS")
    ax.legend()
    ax.set_title("RDKit drawing time by molecule size")
    fig.tight_layout()
    fig.savefig(RESULTS / "depict.png", dpi=110)


if __name__ == "__main__":
    main()
