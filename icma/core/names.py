"""Names clients give to things the server keeps as files: corpora, adapters, tuning runs, models.

One rule for all of them, checked with a full match (``re.match`` with ``$`` lets a trailing
newline through, which once created ``corpora/nl-test\\n.tsv``): 1-64 ASCII letters, digits,
'.', '_' or '-', starting with a letter or digit. Such a name never holds a path separator, never
starts with a dot, and is never '..', so ``folder / name`` stays inside ``folder``.
"""

from __future__ import annotations

import re

from icma.core.errors import InputError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def is_name(value: object) -> bool:
    return isinstance(value, str) and NAME.fullmatch(value) is not None


def check_name(value: object, *, field: str, what: str = "name") -> str:
    """``value`` when it is a valid name, else an InputError naming ``field`` (the value is
    shown with repr, so a stray newline or space is visible)."""
    if not is_name(value):
        shown = repr(value) if isinstance(value, str) and len(value) <= 80 else \
            f"a {type(value).__name__}" if not isinstance(value, str) else repr(value[:77] + "...")
        raise InputError(f"{what}s are {RULE}, got {shown}", field=field)
    return value  # type: ignore[return-value]
