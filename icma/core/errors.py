"""Errors a user can cause and fix. Each class knows the HTTP status and code it becomes, so the
services map any of them in one line (``icma.server.http``) and the CLI prints them as one line
(``icma: error: <field>: <message>``) without a traceback. Anything else escaping is a bug.

The field is an attribute, never text to parse back out of the message: ``exc.at("options."
+ exc.field)`` re-homes an error under a request's nesting.
"""

from __future__ import annotations

import copy
from pathlib import Path


class IcmaError(Exception):
    """Base class: bad input, a missing file, a mismatched index. The message names the problem,
    ``field`` the input it concerns (``smiles[3]``, ``options.n_shot``, ``--input``)."""

    status: int = 422
    code: str = "invalid_input"
    #: Seconds a client should wait before trying again; set on transient errors (429, 503).
    retry_after: int | None = None

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def at(self, field: str | None) -> "IcmaError":
        """The same error about another field (a copy; the class and status are kept)."""
        other = copy.copy(self)
        other.field = field
        return other


class InputError(IcmaError):
    """A value supplied by the user is invalid (bad SMILES, empty caption, k out of range...)."""


class PromptTooLongError(InputError):
    """The query alone does not fit the token budget."""

    code = "too_long"


class CorpusError(IcmaError):
    """A corpus file is missing, unreadable or malformed."""


class IndexMismatchError(IcmaError):
    """A saved index does not belong to the corpus, encoder or kind it is loaded with."""


class CheckpointError(IcmaError):
    """An encoder checkpoint is corrupt or does not fit the requested architecture."""


class NotFoundError(IcmaError):
    """A named thing (corpus, adapter, job) does not exist."""

    status, code = 404, "not_found"


class ForbiddenError(IcmaError):
    """The service is set up to refuse this request (corpus uploads without an API key)."""

    status, code = 403, "forbidden"


class ConflictError(IcmaError):
    """The thing exists but its state does not allow the request (not ready, name taken)."""

    status, code = 409, "conflict"


class QueueFullError(IcmaError):
    """Too much work queued already; try again later."""

    status, code, retry_after = 429, "queue_full", 5


class StorageError(IcmaError):
    """State the service keeps is damaged (a corrupt job database): an operator must repair or
    restore it. Neither the client's fault nor passing by itself, and not a bug either, so it is
    a 500 that says what is wrong instead of "internal error"."""

    status, code = 500, "storage_damaged"


class UnavailableError(IcmaError):
    """A dependency is down or still loading; try again later."""

    status, code, retry_after = 503, "unavailable", 5


def public_message(text: str, folders: dict[str, Path]) -> str:
    """``text`` for HTTP clients: the server's ``folders`` (and the home folder) replaced by
    their labels. Messages are written without paths; this catches what a library
    (transformers, the OS) put into one."""
    folders = {**folders, "~": Path.home()}
    for label, folder in sorted(folders.items(), key=lambda kv: -len(str(kv[1]))):
        for form in {str(folder), str(Path(folder).resolve())}:
            if len(form) > 1:
                text = text.replace(form, label)
    return text


class InternalError(IcmaError):
    """A bug met while translating one input of a batch job: that item's result line says
    "internal error" and the worker's log holds the traceback; the other items go on."""

    status, code = 500, "internal"
