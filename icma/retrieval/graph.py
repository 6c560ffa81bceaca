"""Graph retrieval: GNN molecule embeddings, cosine similarity with FAISS (ICMA's Mole-BERT route).

Every molecule is embedded from its RDKit canonical SMILES, so that a structure has one embedding
however it is written: the encoders read raw chiral tags (CW/CCW, relative to the order in which
a SMILES lists an atom's neighbours) and bond directions (the ``/`` and ``\\`` marks, which sit on
whichever bonds a SMILES puts them). A query without ``@``, ``/`` or ``\\`` has neither, so it is
embedded as parsed (its features are those of its canonical form; only the atom order, hence float
rounding, differs), which saves a SMILES round trip. The corpus embeds each distinct structure
once, so identical structures score exactly the same, and ties are broken by corpus row (earlier
first) like every index here.

Search: exact indexes on the CPU score small query batches (fewer than 20) with one torch matrix
product over the stored embeddings, which follows the configured torch threads (NumPy's OpenBLAS
keeps its own pool, whose threads spin on both cores for a 1 ms product). Measured with one
thread over 26k x 300 (2026-11-21): one query 1.1 ms (FAISS's per-row loop: 1.9 ms); for 2-4
queries ``Q @ E.T`` is fastest (1.1-2.2 ms), from 5 up ``E @ Q.T`` (2.4 ms for 8, against 3.3 ms,
and 6.0 ms for NumPy's sgemm), so the batches a service coalesces from concurrent requests cost
less than their queries one by one. Larger batches, IVF indexes and GPUs go through FAISS.
Candidates (k + a margin) are re-scored in float64, sorted by (-score, row), and fetched again
with a wider margin when the k-th score ties with the last candidate's.

Saved data: ``graph.faiss`` (the FAISS index) and ``embeddings.npy`` (the L2-normalised float32
embeddings, corpus order); the manifest's params name the encoder and its sha256, which a load
checks: an index is meaningless under another encoder.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np
import torch
from rdkit import Chem

from icma.core import chem
from icma.core.corpus import Corpus
from icma.retrieval.encoders import Encoder, load_encoder
from icma.core.errors import CheckpointError, IndexMismatchError, InputError
from icma.retrieval.base import Index
from icma.core.settings import Settings

FAISS_FILE = "graph.faiss"
EMBEDDINGS_FILE = "embeddings.npy"
#: Extra results fetched beyond k so that ties at the cut are seen and re-sorted by row.
TIE_MARGIN = 16
#: FAISS scores are float32 sums in an unspecified order: scores this close may be equal.
SCORE_EPS = 1e-5
#: Below this many queries an exact CPU index is searched with BLAS (see above), and FAISS, when
#: it is used, single-threaded: an OpenMP team costs more than it saves for a few queries.
_SMALL_BATCH = 20
#: Up to this many queries the product is taken query-major (see the module docstring).
_ROW_MAJOR_QUERIES = 4
#: SMILES marks of stereo features whose encoding depends on how the SMILES is written.
_WRITTEN_STEREO = re.compile(r"[@/\\]")

class GraphIndex(Index):
    """Cosine similarity of GNN embeddings: exact (FAISS IndexFlatIP) or IVF (IndexIVFFlat)."""

    kind = "graph"
    modality = "molecule"
    takes_settings = True

    def __init__(self, corpus: Corpus, params: dict, encoder: Encoder, index: faiss.Index,
                 embeddings: np.ndarray, gpu: bool = False):
        super().__init__(corpus, params)
        self.encoder = encoder
        self.faiss_index = index  # on the CPU: what is saved
        self.embeddings = embeddings  # (n, dim) float32, L2-normalised, corpus order
        self._embeddings_t = torch.from_numpy(embeddings)  # the same memory, for the scan
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = int(params.get("nprobe") or 1)
        self._searcher = _maybe_gpu(index, gpu)

    # --- building ----------------------------------------------------------------------------
    @classmethod
    def build(cls, corpus: Corpus, encoder: Encoder | str | Path | None = None,
              arch: str | None = None, ivf_nlist: int | None = None, nprobe: int = 8,
              batch_size: int | None = None, progress: bool | None = None,
              gpu: bool = False, *, settings: Settings) -> "GraphIndex":
        """Embed every record and index the embeddings.

        ``encoder``: an Encoder, a shipped name or a checkpoint path (default: the settings').
        ``settings`` load it (see ``load_encoder``), and their faiss_gpu can ask for ``gpu``.
        ``ivf_nlist``: use an inverted-file index with this many lists (approximate; trained on
        the corpus) and search ``nprobe`` of them; None (default) searches exhaustively.
        ``gpu``: search on the GPUs when faiss-gpu sees any (not saved with the index).
        """
        if len(corpus) == 0:
            raise InputError("cannot build a graph index over an empty corpus", field="corpus")
        ivf_nlist = _check_int(ivf_nlist, "ivf_nlist", 1, len(corpus), optional=True)
        nprobe = _check_int(nprobe, "nprobe", 1, None)
        bad = [i for i, c in enumerate(corpus.canonical) if c is None]
        if bad:
            i = bad[0]
            raise InputError(
                f"{len(bad)} record(s) of corpus {corpus.name!r} have SMILES that RDKit cannot "
                f"parse (first: row {i}, CID {corpus.cids[i]}: {corpus.smiles[i][:80]!r}), so they "
                "cannot be embedded; load the corpus with invalid SMILES skipped "
                "(on_invalid='skip', the default) to build a graph index", field="corpus")
        enc = (encoder if isinstance(encoder, Encoder)
               else load_encoder(encoder, arch, settings=settings))
        if isinstance(encoder, Encoder) and arch is not None and arch != enc.arch:
            raise InputError(f"arch {arch!r} given with a {enc.arch} encoder", field="arch")

        # One embedding per distinct structure: duplicates get bit-identical vectors (exact ties).
        first: dict[str, int] = {}
        inverse = np.fromiter((first.setdefault(c, len(first)) for c in corpus.canonical),
                              dtype=np.int64, count=len(corpus))
        unique = enc.embed_smiles(list(first), batch_size=batch_size, progress=progress)
        embeddings = _normalise(unique)[inverse]

        if ivf_nlist is None:
            index = faiss.IndexFlatIP(enc.dim)
        else:
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(enc.dim), enc.dim, ivf_nlist,
                                       faiss.METRIC_INNER_PRODUCT)
            index.train(embeddings)
        index.add(embeddings)
        params = {
            "encoder": enc.name, "arch": enc.arch, "encoder_sha256": enc.sha256, "dim": enc.dim,
            "embedded": "canonical SMILES", "metric": "cosine",
            "faiss": "IndexFlatIP" if ivf_nlist is None else "IndexIVFFlat",
            "ivf_nlist": ivf_nlist, "nprobe": nprobe if ivf_nlist is not None else None,
        }
        return cls(corpus, params, enc, index, embeddings, gpu=gpu or settings.faiss_gpu)

    # --- searching ---------------------------------------------------------------------------
    def embed_queries(self, queries: Sequence[str]) -> np.ndarray:
        """L2-normalised embeddings (n, dim) of query SMILES (InputError names a bad one)."""
        mols = []
        for i, q in enumerate(queries):
            mol = chem.parse_smiles(q, field=f"queries[{i}]")
            if _WRITTEN_STEREO.search(q):  # embed the canonical writing (see the module docstring)
                mol = chem.parse_smiles(Chem.MolToSmiles(mol), field=f"queries[{i}]")
            mols.append(mol)
        return _normalise(self.encoder.embed_mols(mols, progress=False))

    def _topk(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        q = self.embed_queries(queries)
        n = len(self.corpus)
        k = min(k, n)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        pending = np.arange(len(queries))
        fetch = min(n, k + TIE_MARGIN)
        while pending.size:
            found_s, found_r = self._candidates(q[pending], fetch)
            retry = []
            for j, qi in enumerate(pending):
                valid = found_r[j] >= 0
                r = found_r[j][valid]
                # Re-score the candidates in float64 (the same for identical rows, unlike blocked
                # float32 sums) and sort by (-score, row).
                s = np.einsum("ij,j->i", self.embeddings[r].astype(np.float64),
                              q[qi].astype(np.float64)).astype(np.float32)
                order = np.lexsort((r, -s))
                s, r = s[order], r[order]
                # Every slot filled and the k-th score as low as the lowest candidate's: rows tied
                # with the k-th may lie beyond the fetch. Fetch more.
                if fetch < n and len(r) == fetch and \
                        s[k - 1] <= found_s[j][valid].min() + SCORE_EPS:
                    retry.append(qi)
                    continue
                m = min(k, len(r))
                scores[qi, :m], rows[qi, :m] = s[:m], r[:m]
            pending = np.asarray(retry, dtype=np.int64)
            fetch = min(n, fetch * 2)
        return scores, rows

    def _candidates(self, q: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and rows (nq, fetch) of the best candidates, in no particular order; rows -1
        (FAISS's padding) where an approximate index found fewer."""
        n = len(self.embeddings)
        if len(q) < _SMALL_BATCH and self._searcher is self.faiss_index and \
                isinstance(self.faiss_index, faiss.IndexFlat):
            with torch.no_grad():
                qt = torch.from_numpy(q)
                if len(q) <= _ROW_MAJOR_QUERIES:
                    all_scores = (qt @ self._embeddings_t.T).numpy()
                else:  # (n, nq) then transposed: one pass over the embeddings serves every query
                    all_scores = (self._embeddings_t @ qt.T).T.numpy()
            if fetch >= n:
                rows = np.broadcast_to(np.arange(n), all_scores.shape)
            else:
                rows = np.argpartition(-all_scores, fetch - 1, axis=1)[:, :fetch]
            return np.take_along_axis(all_scores, rows, axis=1), rows
        with _faiss_threads(len(q)):
            return self._searcher.search(q, fetch)

    # --- persistence -------------------------------------------------------------------------
    def _save_data(self, directory: Path) -> None:
        faiss.write_index(self.faiss_index, str(directory / FAISS_FILE))
        np.save(directory / EMBEDDINGS_FILE, self.embeddings)

    @classmethod
    def load(cls, directory: str | Path, *, settings: Settings,
             encoder: Encoder | str | Path | None = None,
             corpus: Corpus | None = None) -> "GraphIndex":
        """``load_index(directory, kind="graph")`` with an encoder to use instead of loading the
        one the manifest names (it must be the same checkpoint: same sha256)."""
        from icma.retrieval import load_index  # noqa: PLC0415  (the package imports this module)

        if encoder is not None and not isinstance(encoder, Encoder):
            encoder = load_encoder(encoder, settings=settings)
        return load_index(directory, kind="graph", corpus=corpus,  # type: ignore[return-value]
                          settings=settings, encoder=encoder)

    @classmethod
    def _load_data(cls, directory: Path, corpus: Corpus, manifest: dict, *, settings: Settings,
                   encoder: Encoder | None = None) -> "GraphIndex":
        params = dict(manifest.get("params") or {})
        try:
            name, arch, sha = params["encoder"], params["arch"], params["encoder_sha256"]
            dim = int(params["dim"])
        except (KeyError, TypeError, ValueError):
            raise IndexMismatchError(
                f"{directory}: manifest params lack the encoder's name, arch, sha256 or dim; "
                "rebuild the index", field="index") from None
        if encoder is None:
            try:
                encoder = load_encoder(name, arch, settings=settings)
            except (CheckpointError, InputError) as exc:
                raise IndexMismatchError(
                    f"{directory} was built with encoder {name!r} (sha256 {sha[:12]}), which "
                    f"cannot be loaded here ({exc}); pass that checkpoint as the encoder",
                    field="index") from None
        if encoder.sha256 != sha or encoder.arch != arch:
            raise IndexMismatchError(
                f"{directory} was built with encoder {name!r} ({arch}, sha256 {sha[:12]}), not "
                f"with {encoder.name!r} ({encoder.arch}, sha256 {encoder.sha256[:12]}): "
                "embeddings of another encoder are not comparable; rebuild the index",
                field="index")
        # A damaged file raises whatever numpy or FAISS raise: load_index makes it a mismatch.
        embeddings = np.load(directory / EMBEDDINGS_FILE, allow_pickle=False)
        index = faiss.read_index(str(directory / FAISS_FILE))
        n = len(corpus)
        if (embeddings.dtype != np.float32 or embeddings.shape != (n, dim) or index.ntotal != n
                or index.d != dim or dim != encoder.dim):
            raise IndexMismatchError(
                f"{directory}: index data ({index.ntotal} vectors of {index.d}, embeddings "
                f"{embeddings.shape}) do not fit {n} records of dimension {dim}; rebuild it",
                field="index")
        return cls(corpus, params, encoder, index, embeddings, gpu=settings.faiss_gpu)


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1  # a zero vector stays zero (scores 0) rather than NaN
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def _check_int(value, name: str, lo: int, hi: int | None, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer, got {value!r}", field=name)
    if value < lo or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise InputError(f"{name} must be {bounds}, got {value}", field=name)
    return int(value)


@contextlib.contextmanager
def _faiss_threads(n_queries: int):
    if n_queries >= _SMALL_BATCH:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _maybe_gpu(index: faiss.Index, wanted: bool) -> faiss.Index:
    """The index copied to every GPU when asked (build param ``gpu`` or a ``faiss_gpu`` setting)
    and faiss-gpu sees one; otherwise the CPU index itself."""
    if wanted and hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_all_gpus(index)
    return index
