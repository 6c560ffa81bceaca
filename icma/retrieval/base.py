"""The one interface every retrieval index implements, exclusion rules, and the saved manifest.

An index is built from a corpus, answers ``search(queries, k, exclusions)`` with ranked hits
(best first), and saves to a directory holding the corpus, the index data and a manifest. Ties
in score are broken by corpus position (earlier first): that is what reproduces ICMA's files.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Sequence

import numpy as np

from icma import __version__
from icma.core.corpus import Corpus, Record
from icma.core.errors import IndexMismatchError, InputError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CORPUS_FILE = "corpus.jsonl"
MAX_K = 1000

Modality = Literal["molecule", "caption"]


@dataclass(frozen=True)
class Hit:
    row: int  # position in the index's corpus
    cid: str
    score: float


@dataclass(frozen=True)
class Exclusion:
    """Candidates a query must not get back.

    ``cids``: never return these CIDs (the query's own record when building training contexts).
    ``canonical_smiles``: also drop every candidate with this structure (RDKit canonical form).
    ``caption``: also drop every candidate whose description is exactly this text.
    """

    cids: frozenset[str] = frozenset()
    canonical_smiles: str | None = None
    caption: str | None = None

    def __bool__(self) -> bool:
        return bool(self.cids) or self.canonical_smiles is not None or self.caption is not None


@dataclass(frozen=True)
class ExclusionRule:
    """How to derive an Exclusion from a query record (training contexts, leave-one-out)."""

    self_cid: bool = True
    same_structure: bool = False
    same_caption: bool = False

    def for_record(self, record: Record) -> Exclusion:
        return Exclusion(
            cids=frozenset([record.cid]) if self.self_cid else frozenset(),
            canonical_smiles=record.canonical if self.same_structure else None,
            caption=record.description if self.same_caption else None,
        )


class Index(ABC):
    """Base class. Subclasses implement ``_topk`` (exclusion-free) and their own save/load data."""

    kind: ClassVar[str]
    modality: ClassVar[Modality]  # what a query is: a SMILES or a caption
    #: Whether ``build`` and ``_load_data`` need ``settings=`` (the graph index loads its
    #: encoder with them); ``build_index`` and ``load_index`` pass them on to those kinds only.
    takes_settings: ClassVar[bool] = False

    def __init__(self, corpus: Corpus, params: dict | None = None):
        self.corpus = corpus
        self.params: dict = dict(params or {})

    @classmethod
    @abstractmethod
    def build(cls, corpus: Corpus, **params) -> "Index":
        """Build over a corpus. Raise InputError for unknown or invalid params."""

    # --- searching ---------------------------------------------------------------------------
    @abstractmethod
    def _topk(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores (n, k') and rows (n, k'), best first, ties by row; k' = min(k, len(corpus)).

        Raise InputError (naming the query) for a query the index cannot use.
        """

    def search(
        self,
        queries: Sequence[str],
        k: int,
        exclusions: Sequence[Exclusion | None] | None = None,
    ) -> list[list[Hit]]:
        """Top-k hits per query, best first, with each query's exclusions applied before the cut.

        Fewer than k hits come back only when the corpus holds fewer eligible records.
        """
        if isinstance(queries, str):
            raise InputError("queries must be a list of strings, not one string", field="queries")
        check_k(k)
        if exclusions is not None and len(exclusions) != len(queries):
            raise InputError(
                f"{len(exclusions)} exclusions for {len(queries)} queries", field="exclusions"
            )
        if not queries:
            return []
        n = len(self.corpus)
        excl = list(exclusions) if exclusions is not None else [None] * len(queries)
        # Over-fetch by the number of rows each query can exclude, so one pass nearly always
        # suffices; double and retry for the rare query whose exclusions outrun the margin.
        extra = max(self._excluded_bound(e) for e in excl)
        fetch = min(n, k + extra)
        results: list[list[Hit] | None] = [None] * len(queries)
        pending = list(range(len(queries)))
        while pending:
            scores, rows = self._topk([queries[i] for i in pending], fetch)
            retry = []
            for j, qi in enumerate(pending):
                hits = self._filter(scores[j], rows[j], excl[qi], k)
                if len(hits) < k and fetch < n:
                    retry.append(qi)
                else:
                    results[qi] = hits
            pending = retry
            fetch = min(n, fetch * 2)
        return results  # type: ignore[return-value]

    def _excluded_bound(self, e: Exclusion | None) -> int:
        if not e:
            return 0
        bound = len(e.cids) * 2  # a CID may repeat (ICMA's data has duplicates)
        if e.canonical_smiles is not None or e.caption is not None:
            bound += 8
        return bound

    def _filter(self, scores: np.ndarray, rows: np.ndarray, e: Exclusion | None, k: int) -> list[Hit]:
        c = self.corpus
        hits = []
        for s, r in zip(scores.tolist(), rows.tolist()):
            if r < 0:  # FAISS pads with -1 when it has fewer results
                continue
            if e:
                if c.cids[r] in e.cids:
                    continue
                if e.canonical_smiles is not None and c.canonical[r] == e.canonical_smiles:
                    continue
                if e.caption is not None and c.descriptions[r] == e.caption:
                    continue
            hits.append(Hit(row=r, cid=c.cids[r], score=float(s)))
            if len(hits) == k:
                break
        return hits

    def query_text(self, record: Record) -> str:
        """The text of a corpus record that this index takes as a query."""
        return record.smiles if self.modality == "molecule" else record.description

    # --- persistence -------------------------------------------------------------------------
    def manifest(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "modality": self.modality,
            "corpus": {"name": self.corpus.name, "size": len(self.corpus),
                       "sha256": self.corpus.checksum},
            "params": self.params,
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def save(self, directory: str | Path) -> Path:
        """Save into ``directory``. The manifest goes last and lists every file with its size
        and sha256 (``verify_files`` checks them at load): a directory without one is an
        unfinished save, and a damaged file is found before it is read."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST).unlink(missing_ok=True)  # an older save here is void from now on
        self.corpus.save(directory / CORPUS_FILE)
        self._save_data(directory)
        manifest = self.manifest()
        manifest["files"] = {p.name: file_record(p) for p in sorted(directory.iterdir())
                             if p.is_file() and not p.name.startswith(MANIFEST)}
        tmp = directory / (MANIFEST + ".part")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.replace(directory / MANIFEST)
        return directory

    @abstractmethod
    def _save_data(self, directory: Path) -> None: ...

    @classmethod
    @abstractmethod
    def _load_data(cls, directory: Path, corpus: Corpus, manifest: dict) -> "Index": ...


def file_record(path: Path) -> dict:
    """What the manifest keeps of a saved file: its size and sha256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def verify_files(directory: Path, files: dict) -> None:
    """IndexMismatchError naming the first file of the manifest's list that is missing, or
    differs in size or content from what was saved (truncated, overwritten, replaced)."""
    for name, want in files.items():
        path = directory / Path(name).name
        try:
            size = path.stat().st_size
        except OSError:
            raise IndexMismatchError(f"{directory}: {name} is missing", field="index") from None
        if size != want.get("size") or file_record(path)["sha256"] != want.get("sha256"):
            raise IndexMismatchError(f"{directory}: {name} is damaged (its size or sha256 "
                                     "differs from the saved one)", field="index")


def check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InputError(f"k must be an integer, got {type(k).__name__}", field="k")
    if not 1 <= k <= MAX_K:
        raise InputError(f"k must be between 1 and {MAX_K}, got {k}", field="k")


def ranked(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row of a dense score matrix, best first, ties by column (stable)."""
    scores = np.atleast_2d(scores)
    n = scores.shape[1]
    k = min(k, n)
    if k < n:
        # argpartition finds a candidate set; widen it to every column tied with the k-th score
        # so the stable sort below sees all ties and keeps the earliest rows.
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(scores, part, axis=1).min(axis=1, keepdims=True)
        out_s = np.empty((scores.shape[0], k), dtype=scores.dtype)
        out_r = np.empty((scores.shape[0], k), dtype=np.int64)
        for i in range(scores.shape[0]):
            cand = np.flatnonzero(scores[i] >= kth[i])
            order = cand[np.argsort(-scores[i, cand], kind="stable")][:k]
            out_r[i] = order
            out_s[i] = scores[i, order]
        return out_s, out_r
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, axis=1), order


def _versions() -> dict:
    import faiss  # noqa: PLC0415  (imported lazily: heavy, and only the manifest needs the name)
    import rdkit
    import torch

    return {"icma": __version__, "python": platform.python_version(), "rdkit": rdkit.__version__,
            "faiss": faiss.__version__, "torch": torch.__version__, "numpy": np.__version__}

