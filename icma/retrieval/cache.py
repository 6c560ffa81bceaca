"""Indexes over named corpora, built once and kept in the data directory."""

from __future__ import annotations

import logging
from pathlib import Path

from icma.corpus import Corpus, embedded_corpus
from icma.errors import IndexMismatchError
from icma.retrieval import build_index, load_index
from icma.retrieval.base import Index
from icma.settings import get_settings

log = logging.getLogger(__name__)


def cached_index(kind: str, corpus: Corpus | None = None, data_dir: str | Path | None = None,
                 **params) -> Index:
    """Load ``kind`` over ``corpus`` (default: the embedded one) from the data directory, or
    build and save it there. A stale cache (another corpus, encoder or format) is rebuilt."""
    corpus = corpus or embedded_corpus()
    root = Path(data_dir or get_settings().data_dir) / "indexes"
    suffix = f"-{params['encoder']}" if params.get("encoder") else ""
    directory = root / f"{corpus.name}-{kind}{Path(suffix).name}"
    if (directory / "manifest.json").exists():
        try:
            return load_index(directory, kind=kind, corpus=corpus)
        except IndexMismatchError as exc:
            log.warning("rebuilding %s: %s", directory, exc)
    log.info("building the %s index over %s (%d records) in %s", kind, corpus.name, len(corpus),
             directory)
    index = build_index(kind, corpus, **params)
    index.save(directory)
    return index
