"""Fingerprint Tanimoto indexes: real Morgan, and the RDKit path fingerprint MolReGPT called "Morgan".

Fingerprints are kept as packed bits in numpy, and Tanimoto is computed with a popcount over the
whole corpus at once: one vectorised pass, no per-molecule Python, and the arrays save as .npy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar, Sequence

import numpy as np
from rdkit import DataStructs

from icma.core import chem
from icma.core.corpus import Corpus
from icma.core.errors import InputError
from icma.retrieval.base import Index, ranked


def pack(fp: DataStructs.ExplicitBitVect) -> np.ndarray:
    """Bits of an RDKit bit vector as packed bytes (bit i of the vector = bit i of the array)."""
    bits = np.zeros(fp.GetNumBits(), dtype=np.uint8)
    DataStructs.ConvertToNumpyArray(fp, bits)
    return np.packbits(bits)


def fold(packed: np.ndarray, n_bits: int) -> np.ndarray:
    """Fold packed fingerprints (..., L/8) down to n_bits, as RDKit's FoldFingerprint does:
    bit i of the result is the OR of bits i, i + n_bits, i + 2 n_bits, ..."""
    width = packed.shape[-1]
    factor = width * 8 // n_bits
    if factor == 1:
        return packed
    return np.bitwise_or.reduce(packed.reshape(*packed.shape[:-1], factor, n_bits // 8), axis=-2)


def tanimoto_many(query: np.ndarray, table: np.ndarray, table_counts: np.ndarray) -> np.ndarray:
    """Tanimoto of one packed fingerprint against every row of a packed table of the same width."""
    inter = np.bitwise_count(table & query).sum(axis=1, dtype=np.int64)
    union = table_counts + int(np.bitwise_count(query).sum()) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        sim = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return sim


class FingerprintIndex(Index):
    modality: ClassVar = "molecule"
    fingerprint: ClassVar[Callable]

    def __init__(self, corpus: Corpus, fps: list[np.ndarray], params: dict | None = None):
        super().__init__(corpus, params)
        # Group rows by fingerprint width: fixed for Morgan, varying for the folded path
        # fingerprint (2048 down to 64 bits).
        widths = np.array([len(f) for f in fps])
        self._groups: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for w in sorted(set(widths.tolist()), reverse=True):
            rows = np.flatnonzero(widths == w)
            self._groups[w * 8] = (rows, np.stack([fps[i] for i in rows]))
        self._folded: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def build(cls, corpus: Corpus, **params) -> "FingerprintIndex":
        if params:
            raise InputError(f"unknown parameter(s) {sorted(params)} for a {cls.kind} index",
                             field="params")
        missing = [c for c, s in zip(corpus.cids, corpus.canonical) if s is None]
        if missing:
            raise InputError(
                f"{len(missing)} corpus rows have no valid SMILES (first CID {missing[0]}); load "
                "the corpus with invalid SMILES skipped to index molecules", field="corpus")
        fps = [pack(cls.fingerprint(chem.parse_smiles(s))) for s in corpus.canonical]
        return cls(corpus, fps)

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        out = np.empty((len(queries), len(self.corpus)), dtype=np.float64)
        for qi, smiles in enumerate(queries):
            q = pack(self.fingerprint(chem.parse_smiles(smiles, field=f"queries[{qi}]")))
            q_bits = len(q) * 8
            for bits, (rows, table) in self._groups.items():
                n_bits = min(bits, q_bits)  # the longer side is folded to the shorter
                t, counts = self._table(bits, n_bits, table)
                out[qi, rows] = tanimoto_many(fold(q, n_bits), t, counts)
        return out

    def _table(self, bits: int, n_bits: int, table: np.ndarray):
        key = (bits, n_bits)
        if key not in self._folded:
            t = fold(table, n_bits)
            self._folded[key] = (t, np.bitwise_count(t).sum(axis=1, dtype=np.int64))
        return self._folded[key]

    def _topk(self, queries: Sequence[str], k: int):
        return ranked(self.scores(queries), k)

    def _save_data(self, directory: Path) -> None:
        arrays = {}
        for bits, (rows, table) in self._groups.items():
            arrays[f"rows_{bits}"] = rows
            arrays[f"fps_{bits}"] = table
        np.savez(directory / "fingerprints.npz", **arrays)

    @classmethod
    def _load_data(cls, directory: Path, corpus: Corpus, manifest: dict) -> "FingerprintIndex":
        data = np.load(directory / "fingerprints.npz")
        fps: list[np.ndarray | None] = [None] * len(corpus)
        for key in data.files:
            if key.startswith("rows_"):
                bits = key[5:]
                for row, fp in zip(data[key], data[f"fps_{bits}"]):
                    fps[int(row)] = fp
        return cls(corpus, fps, manifest.get("params"))  # type: ignore[arg-type]


class MorganIndex(FingerprintIndex):
    """Morgan fingerprint (radius 2, 2048 bits), Tanimoto."""

    kind: ClassVar = "morgan"
    fingerprint: ClassVar = staticmethod(chem.morgan_fp)


class RDKitPathIndex(FingerprintIndex):
    """RDKit topological path fingerprint with MolReGPT's folding, Tanimoto (MolReGPT's "Morgan")."""

    kind: ClassVar = "rdkit"
    fingerprint: ClassVar = staticmethod(chem.rdkit_path_fp)
