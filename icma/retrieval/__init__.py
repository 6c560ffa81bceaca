"""Retrieval indexes behind one interface: build from a corpus, save, load, search.

Kinds: ``graph`` (GNN embeddings, FAISS cosine), ``morgan`` and ``rdkit`` (fingerprint Tanimoto),
``bm25`` (captions, exactly rank_bm25's BM25Okapi), ``sentence`` (caption embeddings, cosine),
``random`` (seeded).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from icma.core.corpus import Corpus
from icma.core.errors import IcmaError, IndexMismatchError, InputError
from icma.core.settings import Settings
from icma.retrieval.base import (  # noqa: F401  (re-exported)
    CORPUS_FILE,
    FORMAT_VERSION,
    MANIFEST,
    Exclusion,
    ExclusionRule,
    Hit,
    Index,
    verify_files,
)

# kind -> (module, class); imported on first use so that BM25 users never load torch, etc.
KINDS = {
    "graph": ("icma.retrieval.graph", "GraphIndex"),
    "morgan": ("icma.retrieval.fingerprint", "MorganIndex"),
    "rdkit": ("icma.retrieval.fingerprint", "RDKitPathIndex"),
    "bm25": ("icma.retrieval.bm25", "BM25Index"),
    "random": ("icma.retrieval.randomized", "RandomIndex"),
    "sentence": ("icma.retrieval.sentence", "SentenceIndex"),
}


def index_class(kind: str) -> type[Index]:
    if kind not in KINDS:
        raise InputError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}",
                         field="kind")
    module, name = KINDS[kind]
    return getattr(importlib.import_module(module), name)


def build_index(kind: str, corpus: Corpus, *, settings: Settings | None = None,
                **params) -> Index:
    """Build an index of ``kind`` over ``corpus``; params are kind-specific (see each class).
    ``settings`` are needed by the kinds that take them (graph) and ignored by the others."""
    cls = index_class(kind)
    return cls.build(corpus, **_settings_for(cls, settings), **params)


def _settings_for(cls: type[Index], settings: Settings | None) -> dict:
    if not cls.takes_settings:
        return {}
    if settings is None:
        raise TypeError(f"a {cls.kind} index is built and loaded with settings=")
    return {"settings": settings}


def read_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise IndexMismatchError(f"no index directory at {directory}", field="index")
    if not path.exists():
        raise IndexMismatchError(
            f"{directory} has no {MANIFEST}: not an icma index, or its save did not finish",
            field="index")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IndexMismatchError(f"{path} is not valid JSON ({exc.msg})", field="index") from None


def load_index(directory: str | Path, *, kind: str | None = None,
               corpus: Corpus | None = None, settings: Settings | None = None,
               **options) -> Index:
    """Load a saved index, checking its manifest.

    ``kind``: fail unless the index is of this kind. ``corpus``: fail unless the index was built
    over exactly this corpus (same records, same order). The stored corpus is always checked
    against the checksum in the manifest, so an edited directory is caught too. ``options`` go to
    the kind's loader (a graph index takes ``encoder``, which must be the one it was built with).
    ``settings`` are needed by the kinds that take them (graph) and ignored by the others.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexMismatchError(
            f"{directory}: index format {manifest.get('format_version')}, this icma reads "
            f"{FORMAT_VERSION}; rebuild it with 'icma index build'", field="index")
    found = manifest.get("kind")
    if kind is not None and found != kind:
        raise IndexMismatchError(f"{directory} holds a {found!r} index, not {kind!r}", field="index")
    if "files" in manifest:  # saves before the file list load unverified (their data is
        verify_files(directory, manifest["files"])  # still checked by reading it, below)
    try:
        stored = Corpus.load_saved(directory / CORPUS_FILE)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IndexMismatchError(f"{directory}: its {CORPUS_FILE} cannot be read "
                                 f"({type(exc).__name__})", field="index") from None
    want = manifest["corpus"]["sha256"]
    if stored.checksum != want:
        raise IndexMismatchError(
            f"{directory}: stored corpus checksum {stored.checksum[:12]} does not match the "
            f"manifest's {want[:12]}; the directory was modified", field="index")
    if corpus is not None and corpus.checksum != want:
        raise IndexMismatchError(
            f"{directory} was built over corpus {manifest['corpus']['name']!r} "
            f"({manifest['corpus']['size']} records, sha256 {want[:12]}), not over "
            f"{corpus.name!r} ({len(corpus)} records, sha256 {corpus.checksum[:12]})",
            field="index")
    cls = index_class(found)
    try:
        return cls._load_data(directory, stored, manifest, **_settings_for(cls, settings),
                              **options)
    except IcmaError:
        raise
    except Exception as exc:  # a damaged data file: numpy, scipy, zipfile and FAISS raise
        raise IndexMismatchError(  # many kinds of error; each means "rebuild it"
            f"{directory}: its data cannot be read ({type(exc).__name__}: {exc})",
            field="index") from None
