"""Where a tuning run may read its corpora and its base model from.

The command line (``icma tune``) is the operator at the machine: it names local files and
folders. A tune job comes from a client over HTTP, and a client never makes the server read a
path it chose: it names data the server holds (``embedded``, a corpus of the retrieval service,
a file uploaded with the job) and, as the base model, the shipped default or a folder of the
models directory (``ICMA_MODELS_DIR``) by name; hub ids only where the operator allows
downloads. Anything else gets one message that neither echoes the value nor depends on whether
such a path exists (``/root/.ssh/id_rsa`` and ``/nonexistent`` read the same).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from icma.core.corpus import EMBEDDED_NAME, Corpus, parse_corpus_text
from icma.core.errors import InputError
from icma.core.names import RULE, is_name
from icma.generation.models import DEFAULT_LLM, DOWNLOADS_SETTING, is_hub_id, resolve_model
from icma.retrieval.store import corpus_source, held_corpus, open_corpus, usable_corpus

#: A job option's value for a corpus uploaded with the job (never a valid name, so a client
#: cannot write it into a JSON job: only the upload endpoint sets it).
UPLOADED = "@upload"
CORPUS_FIELDS = ("train", "contexts", "eval")
UPLOAD_FORMATS = {".tsv": "tsv", ".jsonl": "jsonl"}


def uploads_root(data_dir: Path) -> Path:
    """Tune jobs' uploaded corpora, a folder per job. Hidden: run folders beside it are named
    after adapters, and a name never starts with a dot."""
    return Path(data_dir) / "tuning" / ".uploads"


def uploads_dir(data_dir: Path, job_id: str) -> Path:
    return uploads_root(data_dir) / job_id


def upload_corpus_name(job_id: str, field: str) -> str:
    """The corpus name of an uploaded file (its index cache folder too): it starts with a dot,
    so it is never a corpus of the retrieval service and is hidden in ``indexes/``."""
    return f".upload-{job_id}-{field}"


def remove_uploads(data_dir: Path, job_id: str) -> None:
    """A finished job's uploaded corpora and the indexes built over them."""
    shutil.rmtree(uploads_dir(data_dir, job_id), ignore_errors=True)
    for folder in (Path(data_dir) / "indexes").glob(upload_corpus_name(job_id, "*")):
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class Sources:
    """The rule a run's inputs are resolved by. ``data_dir`` holds the retrieval service's
    corpora (``corpora/<name>.tsv``); ``convert_dir`` is where the shipped model is converted.
    ``local``: the command line, paths allowed. Otherwise (a job) ``models_dir`` is the
    allow-list of base models and ``uploads`` the job's uploaded files, if any."""

    data_dir: Path
    convert_dir: Path
    local: bool = True
    allow_downloads: bool = False
    models_dir: Path | None = None
    uploads: Path | None = None
    job_id: str | None = None

    @classmethod
    def for_job(cls, data_dir: Path, convert_dir: Path, models_dir: Path,
                allow_downloads: bool, job_id: str | None = None) -> "Sources":
        """A tune job's rule; with ``job_id``, the job's uploaded corpora resolve too."""
        return cls(Path(data_dir), Path(convert_dir), local=False,
                   allow_downloads=allow_downloads, models_dir=Path(models_dir),
                   uploads=uploads_dir(data_dir, job_id) if job_id else None, job_id=job_id)

    # --- corpora ---------------------------------------------------------------------------

    def check_corpus(self, spec: str, field: str) -> None:
        """Refuse (InputError naming ``field``) a corpus this rule does not allow; reads nothing."""
        if spec == UPLOADED and not self.local:
            self._upload(field)
        elif self.local:
            corpus_source(spec, self.data_dir, field)
        else:
            self._held(spec, field)

    def open_corpus(self, spec: str, field: str) -> Corpus:
        if spec == UPLOADED and not self.local:
            path = self._upload(field)
            corpus, _ = parse_corpus_text(path.read_text(encoding="utf-8"),
                                          fmt=UPLOAD_FORMATS[path.suffix],
                                          name=upload_corpus_name(self.job_id or "", field))
            return usable_corpus(corpus, spec, field)
        if not self.local:
            self._held(spec, field)
        return open_corpus(spec, self.data_dir, field, files=self.local)

    def _held(self, spec: str, field: str) -> None:
        if spec in ("embedded", EMBEDDED_NAME) or held_corpus(spec, self.data_dir) is not None:
            return
        if is_name(spec):
            raise InputError(f"the retrieval service holds no corpus named {spec!r} (GET "
                             f"/v1/corpora lists them)", field=field)
        raise InputError(
            "a tune job names 'embedded' or a corpus the retrieval service holds (" + RULE
            + "), or uploads the file with POST /v1/jobs/upload; paths are not accepted",
            field=field) from None

    def _upload(self, field: str) -> Path:
        found = [self.uploads / f"{field}{ext}" for ext in UPLOAD_FORMATS] \
            if self.uploads else []
        found = [p for p in found if p.is_file()]
        if not found:
            raise InputError(f"{UPLOADED!r} stands for a file uploaded with the job "
                             f"(POST /v1/jobs/upload, file field {field!r}); none is",
                             field=field)
        return found[0]

    # --- the base model --------------------------------------------------------------------

    def base_model(self, spec: str, *, convert: bool = True) -> str:
        """The base model's folder (or hub id), InputError naming ``base_model`` otherwise.
        ``convert=False`` checks the shipped default without converting it (a minute)."""
        try:
            if self.local or spec == DEFAULT_LLM:
                return resolve_model(spec, self.convert_dir, convert=convert,
                                     allow_downloads=self.allow_downloads)
        except InputError as exc:
            raise exc.at("base_model") from None
        folder = self.models_dir / spec if is_name(spec) else None
        if folder is not None and (folder / "config.json").is_file():
            return str(folder)
        if self.allow_downloads and is_hub_id(spec):
            return spec
        hub = ", or a model hub id" if self.allow_downloads else \
            f" (hub ids need {DOWNLOADS_SETTING}=true on the server)"
        raise InputError(f"a tune job's base model is {DEFAULT_LLM!r} or the name of a model "
                         f"folder in the server's models directory (ICMA_MODELS_DIR){hub}; "
                         f"paths are not accepted", field="base_model")

    def check(self, cfg) -> None:
        """The quick checks of a run's inputs, for refusing a tune job when it is submitted
        (the run checks everything again, in depth)."""
        self.base_model(cfg.base_model, convert=False)
        for field in CORPUS_FIELDS:
            if getattr(cfg, field) is not None:
                self.check_corpus(getattr(cfg, field), field)

