"""BM25 caption retrieval that gives exactly rank_bm25 0.2.2's ``BM25Okapi`` scores, fast.

ICMA's cap2mol retrieval ran ``BM25Okapi(k1=1.5, b=0.75, epsilon=0.25)`` over the training
captions with its own tokenisation (``icma_tokenize``). rank_bm25 rescans every document's term
dictionary for every query token (tens of milliseconds a query on 12k captions). Here the
per-(document, term) weights

    W[d, t] = idf[t] * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl[d] / avgdl))

are computed once, at build time, into a sparse column-major (CSC) matrix, and a query's score
vector is the sum of the columns of its tokens (a repeated token counts each time, an unknown
token adds 0); the columns of the few very frequent terms are also kept dense, which is faster
to add than to scatter. Every operation, including the order in which a query's terms are added,
mirrors rank_bm25's arithmetic, so the scores equal rank_bm25's bit for bit, not only to rounding:
documents that tie there tie here, and the ranking (ties broken by corpus row, earlier first)
reproduces ICMA's neighbour files.
"""

from __future__ import annotations

import json
import math
import re
from numbers import Real
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import scipy.sparse as sp

from icma.core.corpus import Corpus
from icma.core.errors import IndexMismatchError, InputError
from icma.retrieval.base import Index

MATRIX_FILE = "bm25_weights.npz"
VOCAB_FILE = "bm25_vocab.json"
DENSE_FRACTION = 32  # a term in at least 1/32 of the documents also gets a dense column
MAX_DENSE_COLUMNS = 512
SAMPLE_PER_K = 64  # top-k threshold from a 1-in-(n / 64k) sample of the scores
DENSE_BYTES = 256 * 2**20

_SEPARATORS = str.maketrans({"-": " ", ",": " ", "(": " ", ")": " ", ".": None})
_SPACES = re.compile(" {2,}")


def icma_tokenize(text: str) -> list[str]:
    """ICMA's BM25 tokenisation, the same for queries and documents.

    ``-`` ``,`` ``(`` ``)`` become a space, ``.`` is deleted, runs of spaces collapse to one, and
    the text is split on single spaces. No lower-casing, no stemming, and no stripping: a caption
    that starts or ends with a separator (``(2S)-2-amino...``) yields an empty-string token, as
    ICMA's own ``str.split(' ')`` did; dropping it changes scores and neighbours.
    """
    return _SPACES.sub(" ", text.translate(_SEPARATORS)).split(" ")


def _check_param(name: str, value, low: float, high: float | None = None,
                 low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InputError(f"{name} must be a number, got {type(value).__name__}", field=name)
    value = float(value)
    below = value <= low if low_open else value < low
    if not math.isfinite(value) or below or (high is not None and value > high):
        if high is not None:
            span = f"between {low:g} and {high:g}"
        else:
            span = f"greater than {low:g}" if low_open else f"at least {low:g}"
        raise InputError(f"{name} must be {span}, got {value!r}", field=name)
    return value


class BM25Index(Index):
    """BM25 (rank_bm25's BM25Okapi variant) over the corpus captions; queries are captions."""

    kind: ClassVar = "bm25"
    modality: ClassVar = "caption"

    def __init__(self, corpus: Corpus, weights: sp.csc_matrix, vocab: list[str],
                 params: dict | None = None):
        super().__init__(corpus, params)
        weights = sp.csc_matrix(weights)
        weights.sort_indices()  # rows ascending within each column (order of the scatter-adds)
        self.weights = weights
        self.vocab = vocab
        self._ids = {w: i for i, w in enumerate(vocab)}
        self._indptr = weights.indptr.tolist()
        self._rows = weights.indices.astype(np.intp, copy=False)
        self._data = weights.data
        # Frequent terms (in at least 1/DENSE_FRACTION of the documents) also get a dense
        # column: adding N contiguous floats beats scattering more than about N/16 of them.
        # The added values are the same (plus exact zeros), so the scores do not change by a
        # bit. The block is derived at load time, never saved.
        n_docs, n_terms = weights.shape
        df = np.diff(weights.indptr)
        max_cols = min(MAX_DENSE_COLUMNS, DENSE_BYTES // max(8 * n_docs, 1))
        frequent = np.flatnonzero(df * DENSE_FRACTION >= n_docs)
        frequent = frequent[np.argsort(-df[frequent], kind="stable")][:max_cols]
        self._slot = [-1] * n_terms
        self._dense = np.zeros((len(frequent), n_docs), dtype=np.float64)
        for j, t in enumerate(frequent.tolist()):
            self._slot[t] = j
            lo, hi = weights.indptr[t], weights.indptr[t + 1]
            self._dense[j, self._rows[lo:hi]] = self._data[lo:hi]

    # --- building ------------------------------------------------------------------------------
    @classmethod
    def build(cls, corpus: Corpus, k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25,
              **unknown) -> "BM25Index":
        """Index the captions of ``corpus``. Defaults are rank_bm25's, which ICMA used."""
        if unknown:
            raise InputError(f"unknown parameter(s) {sorted(unknown)} for a bm25 index "
                             "(it takes k1, b, epsilon)", field="params")
        # k1 = 0 makes rank_bm25 divide 0 by 0 (NaN scores) when b = 1: not a BM25 to reproduce.
        k1 = _check_param("k1", k1, 0.0, low_open=True)
        b = _check_param("b", b, 0.0, 1.0)
        epsilon = _check_param("epsilon", epsilon, 0.0)
        if len(corpus) == 0:
            raise InputError("cannot build a bm25 index over an empty corpus", field="corpus")
        if not corpus.has_captions:
            raise InputError(f"corpus {corpus.name!r} has no captions; a bm25 index searches "
                             "captions", field="corpus")

        # Vocabulary in order of first occurrence: rank_bm25 fills its document-frequency dict
        # in that order, and its average idf is summed in it.
        ids: dict[str, int] = {}
        indptr = [0]
        cols: list[int] = []
        tfs: list[int] = []
        doc_len = np.empty(len(corpus), dtype=np.int64)
        for d, text in enumerate(corpus.descriptions):
            tokens = icma_tokenize(text)
            doc_len[d] = len(tokens)
            counts: dict[int, int] = {}
            for tok in tokens:
                t = ids.setdefault(tok, len(ids))
                counts[t] = counts.get(t, 0) + 1
            cols.extend(counts)
            tfs.extend(counts.values())
            indptr.append(len(cols))
        n_docs, n_terms = len(corpus), len(ids)
        col = np.asarray(cols, dtype=np.int64)
        tf = np.asarray(tfs, dtype=np.int64)
        row = np.repeat(np.arange(n_docs), np.diff(np.asarray(indptr)))

        # idf exactly as BM25Okapi._calc_idf: Python floats, summed in vocabulary order.
        df = np.bincount(col, minlength=n_terms).tolist()
        idf = [math.log(n_docs - f + 0.5) - math.log(f + 0.5) for f in df]
        average_idf = sum(idf) / n_terms
        eps = epsilon * average_idf
        idf_arr = np.array([eps if v < 0 else v for v in idf], dtype=np.float64)

        # The per-document factor with BM25Okapi.get_scores's exact operation order.
        avgdl = int(doc_len.sum()) / n_docs
        norm = k1 * (1 - b + b * doc_len / avgdl)
        weight = idf_arr[col] * (tf * (k1 + 1) / (tf + norm[row]))
        weights = sp.csc_matrix((weight, (row, col)), shape=(n_docs, n_terms))
        return cls(corpus, weights, list(ids), {"k1": k1, "b": b, "epsilon": epsilon})

    # --- scoring -------------------------------------------------------------------------------
    def _check_query(self, qi: int, text) -> list[int]:
        if not isinstance(text, str):
            raise InputError(f"query {qi} must be a caption string, got {type(text).__name__}",
                             field="caption")
        if not text.strip():
            raise InputError(f"query {qi} is an empty caption", field="caption")
        ids = self._ids
        # Unknown tokens add 0 in rank_bm25; query order is kept (it is the order of the sums).
        return [t for t in (ids.get(tok) for tok in icma_tokenize(text)) if t is not None]

    def _score_into(self, terms: list[int], out: np.ndarray) -> None:
        """out[:] = the query's score vector (out must be zeroed)."""
        indptr, rows, data = self._indptr, self._rows, self._data
        slot, dense = self._slot, self._dense
        for t in terms:
            j = slot[t]
            if j >= 0:
                np.add(out, dense[j], out=out)
            else:
                lo, hi = indptr[t], indptr[t + 1]
                out[rows[lo:hi]] += data[lo:hi]  # rows are unique within a column

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """Dense (n_queries, n_docs) scores, equal to ``BM25Okapi.get_scores`` for each query."""
        terms = [self._check_query(qi, q) for qi, q in enumerate(queries)]
        out = np.zeros((len(queries), len(self.corpus)), dtype=np.float64)
        for qi, t in enumerate(terms):
            self._score_into(t, out[qi])
        return out

    def _topk(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        terms = [self._check_query(qi, q) for qi, q in enumerate(queries)]
        n = len(self.corpus)
        k = min(k, n)
        out_s = np.empty((len(queries), k), dtype=np.float64)
        out_r = np.empty((len(queries), k), dtype=np.int64)
        buf = np.zeros(n, dtype=np.float64)
        for qi, t in enumerate(terms):
            if qi:
                buf.fill(0.0)
            self._score_into(t, buf)
            rows = _top_rows(buf, k)
            out_r[qi] = rows
            out_s[qi] = buf[rows]
        return out_s, out_r

    # --- persistence ---------------------------------------------------------------------------
    def _save_data(self, directory: Path) -> None:
        sp.save_npz(directory / MATRIX_FILE, self.weights, compressed=False)
        (directory / VOCAB_FILE).write_text(json.dumps(self.vocab, ensure_ascii=False),
                                            encoding="utf-8")

    @classmethod
    def _load_data(cls, directory: Path, corpus: Corpus, manifest: dict) -> "BM25Index":
        # A damaged file raises whatever scipy or json raise: load_index makes it a mismatch.
        weights = sp.load_npz(directory / MATRIX_FILE)
        vocab = json.loads((directory / VOCAB_FILE).read_text(encoding="utf-8"))
        if weights.shape != (len(corpus), len(vocab)):
            raise IndexMismatchError(
                f"{directory}: bm25 matrix is {weights.shape[0]} x {weights.shape[1]}, expected "
                f"{len(corpus)} documents x {len(vocab)} terms; the directory was modified",
                field="index")
        return cls(corpus, weights, vocab, manifest.get("params"))


def _top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k highest scores, best first, ties by row (earlier first).

    The same result as ``icma.retrieval.base.ranked`` on one row, about four times faster. The
    k-th highest score of an evenly strided sample is at most the true k-th highest, so every
    row scoring at least that threshold holds the whole top k and all rows tied with its last
    member; a stable sort of those few candidates (already in row order) ranks them exactly.
    """
    n = scores.shape[0]
    if k >= n:
        return np.argsort(-scores, kind="stable")
    stride = n // (SAMPLE_PER_K * k)
    if stride >= 2:
        sample = scores[::stride]
        threshold = np.partition(sample, sample.shape[0] - k)[sample.shape[0] - k]
    else:
        threshold = np.partition(scores, n - k)[n - k]
    cand = np.flatnonzero(scores >= threshold)
    return cand[np.argsort(-scores[cand], kind="stable")[:k]]
