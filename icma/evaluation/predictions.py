"""Model outputs to score: MolT5's prediction TSV and our JSON lines, read into reference/prediction
pairs (every problem is an InputError naming the file and, where it applies, the line), and the
writer of those JSON lines: ``result_line``, used by jobs, ``icma translate`` and tuning
evaluation.

A line holds ``index``, ``id``, ``input``, ``reference`` (when given), ``prediction`` (``""``
when the item failed), for cap2mol ``valid``, ``canonical_smiles`` and ``candidates_tried``, the
examples' CIDs, ``finish_reason``, with consensus decoding ``consensus`` (the winner's source:
see ``icma.generation.consensus.Choice.summary``, and ``answers``, every sampled answer) and
``error`` (``null`` or
``{code, message, field}``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from icma.core.errors import IcmaError, InputError
from icma.core.tasks import TASKS, check_task
FORMATS = ("molt5", "jsonl")
JSONL_SUFFIXES = (".jsonl", ".ndjson")

#: MolT5's header for each task: input, reference, prediction.
MOLT5_COLUMNS = {
    "mol2cap": ("SMILES", "ground truth", "output"),
    "cap2mol": ("description", "ground truth", "output"),
}
MOLT5_FILE_NAMES = {"mol2cap": "smiles2caption", "cap2mol": "caption2smiles"}
CLS_PREFIX = "[CLS] "

FORMATS_HELP = """\
formats (guessed from the extension: .jsonl/.ndjson -> jsonl, anything else -> molt5):
  molt5  MolT5's prediction files: UTF-8, tab-separated, no quoting, a header row
           mol2cap: SMILES<TAB>ground truth<TAB>output
           cap2mol: description<TAB>ground truth<TAB>output
         a leading "[CLS] " is stripped from mol2cap captions, as MolT5 does.
  jsonl  one JSON object per line:
           {"reference": "...", "prediction": "...", "input": "...", "id": "..."}
         reference: the true caption (mol2cap) or SMILES (cap2mol), not empty;
         prediction: the model's caption or SMILES ("" for no output);
         input (the SMILES or caption given to the model) and id are optional; ids must be
         unique; other fields are ignored.
"""


@dataclass(frozen=True)
class PredictionRow:
    line: int  # 1-based line in the file
    reference: str
    prediction: str
    input: str | None = None
    id: str | None = None


@dataclass(frozen=True)
class Predictions:
    task: str
    format: str
    path: Path
    rows: tuple[PredictionRow, ...]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def references(self) -> list[str]:
        return [r.reference for r in self.rows]

    @property
    def predictions(self) -> list[str]:
        return [r.prediction for r in self.rows]


def guess_format(path: Path) -> str:
    return "jsonl" if Path(path).suffix.lower() in JSONL_SUFFIXES else "molt5"


def read_predictions(path: Path, task: str, fmt: str | None = None) -> Predictions:
    """Read a predictions file of ``fmt`` (guessed from the extension when None) for ``task``."""
    check_task(task)
    fmt = fmt or guess_format(path)
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; use {' or '.join(FORMATS)}", field="format")
    path = Path(path)
    text = read_text(path)
    rows = parse_molt5(text, task, path) if fmt == "molt5" else parse_jsonl(text, path)
    if not rows:
        raise InputError(f"{path}: no predictions in the file", field="predictions")
    return Predictions(task, fmt, path, tuple(rows))


def read_text(path: Path) -> str:
    """The file as text: UTF-8 (a BOM is allowed), line ends made ``\\n``, not empty."""
    if not path.exists():
        raise InputError(f"no such file: {path}", field="predictions")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a predictions file", field="predictions")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at "
                         f"offset {exc.start})", field="predictions") from None
    if not text.strip():
        raise InputError(f"{path}: empty file", field="predictions")
    # Universal newlines, as Python's text mode (and so MolT5's reader) sees them. str.splitlines
    # would also split on form feeds and Unicode separators that may sit inside a caption.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_molt5(text: str, task: str, path: Path) -> list[PredictionRow]:
    lines = text.split("\n")
    header = lines[0].split("\t")
    columns = _molt5_columns(header, task, path)
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line:  # blank lines (the final newline among them) carry no row, as csv skips them
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise InputError(f"{path}: line {number}: {len(fields)} tab-separated fields, the "
                             f"header has {len(header)}", field="predictions")
        source, reference, prediction = (fields[i] for i in columns)
        if task == "mol2cap":
            reference, prediction = _strip_cls(reference), _strip_cls(prediction)
        if not reference.strip():
            raise InputError(f"{path}: line {number}: empty ground truth", field="predictions")
        rows.append(PredictionRow(number, reference, prediction, input=source))
    return rows


def _molt5_columns(header: list[str], task: str, path: Path) -> tuple[int, int, int]:
    """Positions of the task's input, reference and prediction columns in a MolT5 header."""
    if header[0].lstrip().startswith("{"):
        raise InputError(f"{path}: line 1 is JSON, not MolT5's tab-separated header; use "
                         "--format jsonl", field="format")
    names = [h.strip().lower() for h in header]
    wanted = MOLT5_COLUMNS[task]
    missing = [w for w in wanted if w.lower() not in names]
    if missing:
        hint = ""
        other = next(t for t in TASKS if t != task)
        if all(w.lower() in names for w in MOLT5_COLUMNS[other]):
            hint = f" (this is a {other} file: MolT5's {MOLT5_FILE_NAMES[other]} format)"
        raise InputError(
            f"{path}: line 1: the header lacks column(s) {', '.join(repr(m) for m in missing)}"
            f"{hint}; a MolT5 {task} file starts with '{'<TAB>'.join(wanted)}', found "
            f"'{_clip('<TAB>'.join(header))}'", field="predictions")
    repeated = [w for w in wanted if names.count(w.lower()) > 1]
    if repeated:
        raise InputError(f"{path}: line 1: column {repeated[0]!r} appears twice in the header",
                         field="predictions")
    return tuple(names.index(w.lower()) for w in wanted)  # type: ignore[return-value]


def _strip_cls(text: str) -> str:
    return text[len(CLS_PREFIX):] if text.startswith(CLS_PREFIX) else text


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def parse_jsonl(text: str, path: Path) -> list[PredictionRow]:
    rows = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        row = _jsonl_row(line, number, path)
        if row.id is not None:
            if row.id in first_line:
                raise InputError(f"{path}: line {number}: id {row.id!r} repeats line "
                                 f"{first_line[row.id]}", field="predictions")
            first_line[row.id] = number
        rows.append(row)
    return rows


def _jsonl_row(line: str, number: int, path: Path) -> PredictionRow:
    where = f"{path}: line {number}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        hint = " (a MolT5 TSV? use --format molt5)" if number == 1 and "\t" in line else ""
        raise InputError(f"{where}: not JSON ({exc.msg}, column {exc.colno}){hint}",
                         field="predictions") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object with \"reference\" and \"prediction\", "
                         f"got {type(obj).__name__}", field="predictions")
    for key in ("reference", "prediction"):
        if key not in obj:
            raise InputError(f"{where}: no {key!r} field", field="predictions")
        if not isinstance(obj[key], str):
            raise InputError(f"{where}: {key!r} must be a string (\"\" for no output), got "
                             f"{_json_type(obj[key])}", field="predictions")
    if not obj["reference"].strip():
        raise InputError(f"{where}: empty 'reference'", field="predictions")
    source = obj.get("input")
    if source is not None and not isinstance(source, str):
        raise InputError(f"{where}: 'input' must be a string, got {_json_type(source)}",
                         field="predictions")
    ident = obj.get("id")
    if ident is not None and (isinstance(ident, bool) or not isinstance(ident, (str, int))):
        raise InputError(f"{where}: 'id' must be a string or an integer, got {_json_type(ident)}",
                         field="predictions")
    return PredictionRow(number, obj["reference"], obj["prediction"], input=source,
                         id=None if ident is None else str(ident))


def _json_type(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", list: "an array",
            dict: "an object", str: "a string"}.get(type(value), type(value).__name__)


# --- writing -------------------------------------------------------------------------------

def error_json(exc: IcmaError) -> dict:
    return {"code": exc.code, "message": exc.message, "field": exc.field}


def result_line(task: str, idx: int, input: str, *, id: str | None = None,
                reference: str | None = None, outcome=None, error: dict | None = None) -> dict:
    """One line of our JSON-lines format (what ``read_jsonl`` reads). ``outcome``: an
    ``icma.generation.pipeline.Outcome``; ``error``: what to say when there is none."""
    line: dict = {"index": idx, "id": id, "input": input}
    if reference is not None:
        line["reference"] = reference
    t = outcome.translation if outcome is not None else None
    if outcome is not None and outcome.error is not None:
        error = error_json(outcome.error)
    line["prediction"] = t.answer if t is not None else ""
    if task == "cap2mol":
        line["valid"] = bool(t and t.valid)
        line["canonical_smiles"] = t.canonical if t is not None else None
        line["candidates_tried"] = outcome.candidates_tried if outcome is not None else 0
    line["examples"] = [e.cid for e in t.examples] if t is not None else []
    line["finish_reason"] = t.finish_reason if t is not None else None
    if t is not None and t.consensus is not None:
        line["consensus"] = {**t.consensus.summary(), "answers": list(t.consensus.answers)}
    line["error"] = error
    return line
