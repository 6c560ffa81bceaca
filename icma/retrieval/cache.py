"""Indexes over named corpora, built once and kept in the data directory.

Several processes may share a data directory (the workers of one service, or several
containers on one volume): a lock file per index makes the first one build and save it while the
others wait, then load what it saved, instead of each building its own and writing over the
others' files.
"""

from __future__ import annotations

import logging
from pathlib import Path

from icma.core.corpus import Corpus, embedded_corpus
from icma.core.errors import IndexMismatchError
from icma.core.filelock import locked
from icma.retrieval import build_index, load_index
from icma.retrieval.base import MANIFEST, Index
from icma.core.settings import Settings

log = logging.getLogger(__name__)
#: What an interrupted save leaves (globs under the data directory; see icma.core.tempfiles).
TEMP_PATTERNS = (f"indexes/*/{MANIFEST}.part",)


def cached_index(kind: str, corpus: Corpus | None, data_dir: str | Path, *,
                 settings: Settings | None = None, **params) -> Index:
    """Load ``kind`` over ``corpus`` (None: the embedded one) from ``<data_dir>/indexes``, or
    build and save it there. A stale cache (another corpus, encoder or format) or a damaged
    one (a file truncated or overwritten: see ``Index.save``) is rebuilt.
    ``settings`` go to the kinds that take them (see ``build_index``)."""
    corpus = corpus or embedded_corpus()
    root = Path(data_dir) / "indexes"
    suffix = f"-{params['encoder']}" if params.get("encoder") else ""
    directory = root / f"{corpus.name}-{kind}{Path(suffix).name}"
    with locked(directory.parent / ".locks" / directory.name):
        if (directory / "manifest.json").exists():
            try:
                return load_index(directory, kind=kind, corpus=corpus, settings=settings)
            except IndexMismatchError as exc:
                log.warning("rebuilding %s: %s", directory, exc)
        log.info("building the %s index over %s (%d records) in %s", kind, corpus.name,
                 len(corpus), directory)
        index = build_index(kind, corpus, settings=settings, **params)
        index.save(directory)
        return index
