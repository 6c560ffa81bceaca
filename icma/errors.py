"""Errors a user can cause and fix. The CLI prints them without a traceback; the services map
them to 4xx responses. Anything else escaping is a bug."""


class IcmaError(Exception):
    """Base class: bad input, a missing file, a mismatched index. The message names the problem."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{self.field}: {msg}" if self.field else msg


class InputError(IcmaError):
    """A value supplied by the user is invalid (bad SMILES, empty caption, k out of range...)."""


class CorpusError(IcmaError):
    """A corpus file is missing, unreadable or malformed."""


class IndexMismatchError(IcmaError):
    """A saved index does not belong to the corpus, encoder or kind it is loaded with."""


class CheckpointError(IcmaError):
    """An encoder checkpoint is corrupt or does not fit the requested architecture."""


class PromptTooLongError(InputError):
    """The query alone does not fit the token budget."""
