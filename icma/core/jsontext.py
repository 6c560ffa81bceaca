"""JSON text from clients, parsed once at the edge with the limits the rest of the code assumes.

Request bodies (``icma.server.http``), JSON-lines uploads (``icma.jobs.items``,
``icma.core.corpus``) and JSON form fields all come through ``parse_json``, which refuses what
Python's ``json`` module lets through but nothing after it can handle:

- a lone surrogate (``"\\ud800"``): valid JSON text, but no Unicode character, so it cannot be
  written as UTF-8 (to SQLite, RDKit, a file, a response) and used to surface as a 500;
- nesting deeper than ``MAX_DEPTH`` (a line of 1,000 ``[`` raised RecursionError);
- NaN, Infinity and numbers too large for a float (``1e400``), which are not JSON numbers;
- bytes that are not UTF-8 (``json.loads`` reads bytes with ``surrogatepass``).

Every refusal says where: ``JsonTextError.field`` is the value's path (``items[2].input``).
"""

from __future__ import annotations

import json
import math
from typing import Iterable

#: Deepest nesting of arrays and objects accepted. The services' deepest request is 3 levels
#: (``{"options": {"retrieval": {"random_walk": {...}}}}``); 32 leaves room and stays far from
#: Python's recursion limit in everything that walks the value afterwards.
MAX_DEPTH = 32


class JsonTextError(ValueError):
    """Why a JSON text was refused. ``syntax``: the text as a whole is not acceptable JSON (not
    UTF-8, malformed, too deep); otherwise one value in it is bad, at ``path`` (keys and list
    indices from the top)."""

    def __init__(self, reason: str, path: tuple = (), *, syntax: bool = False):
        super().__init__(reason)
        self.reason, self.path, self.syntax = reason, path, syntax

    @property
    def field(self) -> str:
        """The path as errors name fields: ``items[2].input`` ("" for the top level)."""
        return field_path(self.path)

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}" if self.field else self.reason


def field_path(parts: Iterable[str | int]) -> str:
    """Keys and list indices as one field name: ``("items", 2, "input")`` -> ``items[2].input``."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def parse_json(text: str | bytes, *, max_depth: int = MAX_DEPTH) -> object:
    """The value of a JSON text, or JsonTextError saying what is wrong and where."""
    raw_ok = False  # text decoded here holds no surrogate of its own
    if isinstance(text, (bytes, bytearray)):
        try:
            text, raw_ok = bytes(text).decode("utf-8"), True
        except UnicodeDecodeError as exc:
            raise JsonTextError(f"not UTF-8 text (byte {exc.start})", syntax=True) from None
    odd_numbers: list[str] = []

    def number(literal: str) -> float:  # (NaN and Infinity come here too)
        value = float(literal)
        if not math.isfinite(value):
            odd_numbers.append(literal)
        return value

    try:
        value = json.loads(text, parse_float=number, parse_constant=number)
    except json.JSONDecodeError as exc:
        raise JsonTextError(f"not valid JSON: {exc.msg} (line {exc.lineno}, column "
                            f"{exc.colno})", syntax=True) from None
    except RecursionError:  # json's C scanner gives up near Python's recursion limit
        raise JsonTextError(f"nested deeper than {max_depth} levels", syntax=True) from None
    except ValueError as exc:  # an integer of more than 4,300 digits
        raise JsonTextError(f"not valid JSON: {exc}", syntax=True) from None
    # Walking every value costs several times the parse, so only a text that may hold a
    # problem is walked (to find and name it): a lone surrogate needs a \u escape (or was in
    # the text already), deep nesting more brackets than the limit.
    if odd_numbers or "\\u" in text or not (raw_ok or _is_utf8(text)) or \
            (text.count("[") + text.count("{") > max_depth and not _shallow(value, max_depth)):
        _check_value(value, max_depth)
    return value


def _is_utf8(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _shallow(value: object, max_depth: int) -> bool:
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > max_depth:
            return False
        children = v.values() if isinstance(v, dict) else v
        stack.extend((c, depth + 1) for c in children  # type: ignore[union-attr]
                     if isinstance(c, (dict, list)))
    return True


def _check_value(value: object, max_depth: int) -> None:
    """Refuse lone surrogates (in keys too), non-finite numbers and nesting deeper than
    ``max_depth`` in a parsed JSON value, naming the first one's path. Iterative: depth costs
    no Python stack."""
    stack: list[tuple[object, tuple, int]] = [(value, (), 0)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, str):
            _check_text(v, path)
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise JsonTextError(f"not a finite number ({v!r}; JSON has no NaN or Infinity)",
                                    path)
        elif isinstance(v, (dict, list)):
            if depth >= max_depth:
                raise JsonTextError(f"nested deeper than {max_depth} levels", syntax=True)
            if isinstance(v, dict):
                for k in v:
                    _check_text(k, path, key=True)
                children = [(x, path + (k,), depth + 1) for k, x in v.items()]
            else:
                children = [(x, path + (i,), depth + 1) for i, x in enumerate(v)]
            stack.extend(reversed(children))  # the first bad value in text order is reported


def _check_text(s: str, path: tuple, key: bool = False) -> None:
    if s.isascii():
        return
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        # Never echo the string itself: a response holding it could not be encoded either.
        what = "a key is " if key else ""
        raise JsonTextError(f"{what}not valid Unicode: a lone surrogate "
                            f"{ascii(s[exc.start])[1:-1]} at character {exc.start} (write "
                            "characters as UTF-8, or as a \\ud8xx\\udcxx pair)", path) from None
