"""The named corpora a retrieval service holds, with their indexes, built in the background.

The embedded ChEBI-20 corpus is always there; uploaded corpora are kept as TSV files in
``<data_dir>/corpora/`` and come back after a restart. Indexes are cached in
``<data_dir>/indexes/`` (see ``icma.retrieval.cache``), so only the first start builds them.

Several worker processes may share the data directory (``icma serve --workers``). The folder of
corpus files is what they agree on: an upload is published there with an exclusive link (two
workers cannot both take one name), and each worker's builder thread looks for files it does not
hold every few seconds and loads them (their indexes come from the cache the uploading worker
builds). Until then that worker answers 503 "loading" (with Retry-After) for the corpus, never
404.

One rule decides what a stored corpus is, for uploads and for the files read back at start-up
(``_servable``), and an upload is kept only in a form that reads back as exactly what was
accepted (``icma.core.corpus.tsv_bytes``): nothing is accepted and then lost on a restart.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from icma.retrieval.batching import LoopBatcher, SearchBatcher
from icma.core.corpus import EMBEDDED_NAME, Corpus, embedded_corpus, parse_corpus_text, \
    read_corpus, tsv_bytes
from icma.core.errors import ConflictError, CorpusError, IcmaError, InputError, NotFoundError, \
    UnavailableError, public_message
from icma.core.names import check_name, is_name
from icma.core.tempfiles import sweep
from icma.retrieval import build_index, index_class
from icma.retrieval.base import Index
from icma.retrieval.cache import TEMP_PATTERNS as INDEX_TEMPS, cached_index
from icma.core.settings import Settings

log = logging.getLogger(__name__)
#: How often an idle builder looks for corpora that other workers added (seconds).
DISCOVER_SECONDS = 2.0
#: Temporaries of ``_publish`` (and of earlier versions, which wrote ``....tmp.part``).
CORPUS_TEMPS = ("corpora/.*.tmp*",)


class UnknownCorpusError(NotFoundError):
    """No corpus of that name (404)."""


class CorpusNotReadyError(UnavailableError):
    """The corpus exists but its indexes are queued, building, or loading in this worker: 503
    with Retry-After, since waiting fixes it (the worker's jobs wait and retry)."""


class CorpusFailedError(ConflictError):
    """The corpus's index build failed: 409, not transient (retrying will not fix it; the log
    says why, and a restart or a new upload builds again)."""


class CorpusConflictError(ConflictError):
    """A corpus of that name exists already, or the store is full (409)."""


@dataclass
class Entry:
    name: str
    corpus: Corpus
    kinds: list[str]
    origin: str  # "embedded" or "upload"
    indexes: dict[str, Index] = field(default_factory=dict)
    batchers: dict[tuple[str, str], SearchBatcher | LoopBatcher] = field(default_factory=dict)
    state: str = "queued"  # queued -> building -> ready | failed
    building: str | None = None
    error: str | None = None
    started: float | None = None
    finished: float | None = None

    def describe(self) -> dict:
        info = {
            "name": self.name, "origin": self.origin, "size": len(self.corpus),
            "has_captions": self.corpus.has_captions, "sha256": self.corpus.checksum,
            "state": self.state,
            "progress": {"indexes_done": len(self.indexes), "indexes_total": len(self.kinds),
                         "building": self.building},
            "indexes": [{"kind": k, **_public_params(ix)} for k, ix in self.indexes.items()],
        }
        if self.error:
            info["error"] = self.error
        if self.finished and self.started:
            info["build_seconds"] = round(self.finished - self.started, 3)
        return info


def _public_params(index: Index) -> dict:
    p = index.params
    keep = ("encoder", "arch", "encoder_sha256", "faiss", "k1", "b", "epsilon", "model", "seed")
    return {k: p[k] for k in keep if p.get(k) is not None}


class CorpusStore:
    def __init__(self, data_dir: Path, kinds: list[str], default: str = "chebi20-embedded",
                 max_uploads: int = 16, *, settings: Settings):
        """``settings`` build and load the indexes that take them (graph: its encoder)."""
        for k in kinds:
            index_class(k)  # unknown kinds fail at start-up, not on the first request
        self.data_dir = Path(data_dir)
        self.settings = settings
        self.kinds = [k for k in kinds if k != "random"]
        self.default = default
        self.max_uploads = max_uploads
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._queue: list[str] = []
        self._wake = threading.Condition(self._lock)
        self._worker: threading.Thread | None = None
        self._unreadable: dict[str, float] = {}  # stored files that failed to load, by mtime

    # --- start-up ----------------------------------------------------------------------------
    def start(self, background: bool = True) -> None:
        """Register the embedded corpus and every stored upload; build (or load) their indexes.
        Temporaries of interrupted uploads and index saves are removed first."""
        sweep(self.data_dir, CORPUS_TEMPS + INDEX_TEMPS)
        emb = embedded_corpus()
        self._register(Entry(emb.name, emb, self._kinds_for(emb), "embedded"))
        self._discover()
        if background:
            self._worker = threading.Thread(target=self._run, name="icma-index-builder",
                                            daemon=True)
            self._worker.start()
        else:
            while self._queue:
                self._build(self._queue.pop(0))

    def _kinds_for(self, corpus: Corpus) -> list[str]:
        caption_kinds = {"bm25", "sentence"}
        return [k for k in self.kinds if corpus.has_captions or k not in caption_kinds]

    def _register(self, entry: Entry) -> None:
        with self._lock:
            self._entries[entry.name] = entry
            self._queue.append(entry.name)
            self._wake.notify()

    @property
    def _folder(self) -> Path:
        return self.data_dir / "corpora"

    def _discover(self) -> None:
        """Load stored corpus files this store does not hold yet (at start-up, and files that
        other workers publish later)."""
        for path in sorted(self._folder.glob("*.tsv")):
            name = path.stem
            if name in self._entries:
                continue
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue  # gone since the listing
            if self._unreadable.get(name) == mtime:
                continue  # reported once already; a new file under the name is tried again
            try:
                corpus, _ = read_corpus(path, name=name)
                _servable(corpus)
            except (IcmaError, OSError) as exc:
                log.error("skipping stored corpus %s: %s", path, exc)
                self._unreadable[name] = mtime
                continue
            with self._lock:
                if name not in self._entries:
                    self._entries[name] = Entry(name, corpus, self._kinds_for(corpus), "upload")
                    self._queue.append(name)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._wake.wait(timeout=DISCOVER_SECONDS)
                name = self._queue.pop(0) if self._queue else None
            if name is None:
                try:
                    self._discover()
                except Exception:  # the builder must outlive a bad directory listing
                    log.exception("looking for new corpora in %s failed", self._folder)
                continue
            self._build(name)

    def _build(self, name: str) -> None:
        entry = self._entries[name]
        entry.state, entry.started = "building", time.time()
        try:
            for kind in entry.kinds:
                entry.building = kind
                log.info("corpus %s: %s index (%d records)", name, kind, len(entry.corpus))
                entry.indexes[kind] = cached_index(kind, entry.corpus, self.data_dir,
                                                   settings=self.settings)
            _freeze_heap()
            entry.state = "ready"
        except Exception as exc:  # a failed build must show in /v1/corpora, not kill the thread
            log.exception("corpus %s: index build failed", name)
            entry.state = "failed"
            entry.error = public_message(str(exc), {"<data_dir>": self.data_dir})
        finally:
            entry.building, entry.finished = None, time.time()

    # --- queries -----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        e = self._entries.get(self.default)
        return e is not None and e.state == "ready"

    @property
    def failed(self) -> bool:
        """The default corpus's build failed (waiting will not make the service ready)."""
        e = self._entries.get(self.default)
        return e is not None and e.state == "failed"

    def describe(self) -> list[dict]:
        return [e.describe() for e in list(self._entries.values())]

    def index(self, corpus: str | None, kind: str) -> Index:
        name = corpus or self.default
        entry = self._entries.get(name)
        if entry is None and is_name(name) and name not in self._unreadable and \
                (self._folder / f"{name}.tsv").exists():
            raise CorpusNotReadyError(f"corpus {name!r} was added through another worker and is "
                                      "still loading in this one; retry in a few seconds",
                                      field="corpus")
        if entry is None:
            known = ", ".join(sorted(self._entries)) or "none"
            raise UnknownCorpusError(f"unknown corpus {name!r} (loaded: {known})", field="corpus")
        if kind == "random":
            return self._random(entry)
        if kind not in entry.kinds:
            offered = ", ".join(entry.kinds + ["random"])
            raise InputError(f"corpus {name!r} has no {kind!r} index (it offers {offered})",
                             field="method")
        index = entry.indexes.get(kind)
        if index is None and entry.state == "failed":
            raise CorpusFailedError(f"corpus {name!r}: building its indexes failed "
                                    f"({entry.error}); the service's log has the details",
                                    field="corpus")
        if index is None:
            raise CorpusNotReadyError(f"corpus {name!r}: the {kind} index is still building "
                                      f"({entry.state}); retry shortly", field="corpus")
        return index

    def searcher(self, corpus: str | None, kind: str) -> SearchBatcher:
        """The index of ``kind`` over ``corpus`` behind a batcher that coalesces concurrent
        searches from threads (see icma.retrieval.batching)."""
        return self._batcher(corpus, kind, SearchBatcher)  # type: ignore[return-value]

    def loop_searcher(self, corpus: str | None, kind: str) -> LoopBatcher:
        """The same for small requests answered on the event loop."""
        return self._batcher(corpus, kind, LoopBatcher)  # type: ignore[return-value]

    def _batcher(self, corpus: str | None, kind: str, cls):
        index = self.index(corpus, kind)
        entry = self._entries[corpus or self.default]
        with self._lock:
            b = entry.batchers.get((cls.__name__, kind))
            if b is None or b.index is not index:
                b = entry.batchers[(cls.__name__, kind)] = cls(index)
        return b

    def _random(self, entry: Entry) -> Index:
        key = "random"
        if key not in entry.indexes:
            entry.indexes[key] = build_index("random", entry.corpus, seed=0)
        return entry.indexes[key]

    # --- uploads -----------------------------------------------------------------------------
    def add(self, name: str, text: str, fmt: str = "tsv") -> Entry:
        """Validate an uploaded corpus, store it, and queue its indexes. Nothing is kept when the
        text is not a usable corpus."""
        check_name(name, field="name", what="corpus name")
        try:  # every problem of the text is the uploaded file's (the name was checked above)
            corpus, report = parse_corpus_text(text, fmt=fmt, name=name,
                                               max_heavy_atoms=self.settings.max_heavy_atoms)
            _servable(corpus)
            data = tsv_bytes(corpus)  # exactly what a restart will read back
        except CorpusError as exc:
            raise exc.at("file") from None
        with self._lock:
            folder = self._folder
            if name in self._entries or (folder / f"{name}.tsv").exists():
                raise CorpusConflictError(f"corpus {name!r} exists already", field="name")
            uploads = len(list(folder.glob("*.tsv")))  # every worker's, not only this one's
            if uploads >= self.max_uploads:
                raise CorpusConflictError(f"the service holds {uploads} uploaded corpora, its "
                                          "limit; raise ICMA_MAX_CORPORA", field="name")
            _publish(data, folder / f"{name}.tsv")
            entry = Entry(name, corpus, self._kinds_for(corpus), "upload")
            entry.report = report.summary()  # type: ignore[attr-defined]
            self._entries[name] = entry
            self._queue.append(name)
            self._wake.notify()
        if self._worker is None:  # synchronous mode (no background thread)
            self._build(self._queue.pop(0))
        return entry


def held_corpus(name: str, data_dir: Path) -> Path | None:
    """The stored file of the corpus named ``name`` that the retrieval service holds in
    ``data_dir``, or None (also for anything that is not a name: it never leaves the folder)."""
    path = Path(data_dir) / "corpora" / f"{name}.tsv"
    return path if is_name(name) and path.is_file() else None


def corpus_source(spec: str, data_dir: Path, field: str = "corpus", *,
                  files: bool = True) -> Path | None:
    """Where a corpus named by a user lives: None for ``embedded``, else (``files``: the
    operator's command line) the TSV/JSONL file, or the stored file of a corpus the retrieval
    service holds in ``data_dir``. An InputError naming ``field`` when it is none of these
    (nothing is read)."""
    if spec in ("embedded", EMBEDDED_NAME):
        return None
    if files and Path(spec).expanduser().is_file():
        return Path(spec).expanduser()
    stored = held_corpus(spec, data_dir)
    if stored is not None:
        return stored
    if not files:
        raise InputError("not 'embedded' nor the name of a corpus the retrieval service holds",
                         field=field)
    raise InputError(f"{spec!r} is neither a corpus file nor a corpus of the retrieval "
                     f"service (in {Path(data_dir) / 'corpora'}) nor 'embedded'", field=field)


def open_corpus(spec: str, data_dir: Path, field: str = "corpus",
                captions: bool = True, *, files: bool = True) -> Corpus:
    """The corpus ``corpus_source`` finds, read (a stored corpus under its name: its messages
    never show the data folder)."""
    source = corpus_source(spec, data_dir, field, files=files)
    try:
        if source is None:
            corpus = embedded_corpus()
        elif source == held_corpus(spec, data_dir):
            corpus = parse_corpus_text(source.read_text(encoding="utf-8"), name=spec)[0]
        else:
            corpus = read_corpus(source)[0]
    except IcmaError as exc:  # the reader's own message, under the caller's field
        raise InputError(exc.message, field=field) from None
    return usable_corpus(corpus, spec, field, captions)


def usable_corpus(corpus: Corpus, spec: str, field: str, captions: bool = True) -> Corpus:
    """``corpus`` itself; empty corpora, and corpora without captions where captions are
    needed, are errors naming ``field``."""
    if len(corpus) == 0:
        raise InputError(f"{spec} holds no usable records", field=field)
    if captions and not corpus.has_captions:
        raise InputError(f"{spec} has no captions (a description column is needed)",
                         field=field)
    return corpus


def _freeze_heap() -> None:
    """Take the loaded corpora and indexes out of the garbage collector's sight.

    They are hundreds of thousands of long-lived objects (records, token lists, vocabularies:
    about 310,000 with the two benchmark corpora), and CPython's full collections, which stop every
    thread, walk them all: about 0.1 s each in a development run, landing in the latency tail. Frozen objects are never scanned; one collection first so that the
    garbage of the build is not frozen with them. Once per corpus loaded.
    """
    gc.collect()
    gc.freeze()


def _servable(corpus: Corpus) -> None:
    """What a stored corpus must be, for an upload and for a file read back at start-up alike:
    its records are the examples of ICMA prompts, which pair each molecule with its caption."""
    if not corpus.has_captions:
        raise CorpusError(f"corpus {corpus.name!r} has no description column: the service's "
                          "corpora give examples for prompts, which need a caption for each "
                          "molecule (header 'CID<TAB>SMILES<TAB>description')", field="corpus")


def _publish(data: bytes, path: Path) -> None:
    """Write the corpus file complete under a private name, then link it into place: the link
    fails if another process took the name first, and no reader ever sees half a file. The
    private file goes whatever happens (a start-up sweep removes one a killed process left)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise CorpusConflictError(f"corpus {path.stem!r} exists already",
                                      field="name") from None
    finally:
        tmp.unlink(missing_ok=True)
