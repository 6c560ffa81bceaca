"""Job inputs: read from an uploaded or local file (JSON lines or a corpus TSV), and the limits
every item must keep however it came in."""

from __future__ import annotations

from icma.core.errors import CorpusError, InputError
from icma.core.jsontext import JsonTextError, parse_json
from icma.core.prompts import MAX_CHARS
from icma.core.tasks import spec
from icma.jobs.store import Item

#: Longest item id.
MAX_ID_CHARS = 256


def check_item(task: str, item: Item) -> Item:
    """``item`` when its texts fit: the input as long as the task's translate endpoint takes
    it (SMILES for mol2cap, a caption for cap2mol), the reference as long as the other side's,
    the id ``MAX_ID_CHARS``. Otherwise an InputError naming ``input``, ``id`` or
    ``reference``: the job is refused, since the store would keep what could never be
    translated (130k unbounded items once made a 110 MB database)."""
    s = spec(task)
    for name, value, limit in (("input", item.input, MAX_CHARS[s.query]),
                               ("id", item.id, MAX_ID_CHARS),
                               ("reference", item.reference, MAX_CHARS[s.answer])):
        if value is not None and len(value) > limit:
            raise InputError(f"longer than {limit} characters ({len(value)})", field=name)
    return item


def parse_items(task: str, text: str, fmt: str, where: str = "file") -> list[Item]:
    """Items from an uploaded file. ``jsonl``: one object per line, ``{"input", "id",
    "reference"}`` or a corpus record ``{"cid", "smiles", "description"}``, or a bare JSON
    string. ``tsv``: a corpus file (``CID SMILES description`` header): the input is the SMILES
    for mol2cap and the description for cap2mol, the other side is the reference. A malformed
    line, or one over ``check_item``'s limits, refuses the whole file: the error names
    ``where`` and its message the line; a bad value (an invalid SMILES, an empty caption) is
    that item's error when the job runs."""
    if fmt == "jsonl":
        items = []
        for n, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                obj = parse_json(raw)
            except JsonTextError as exc:
                raise InputError(f"line {n}: {exc}", field=where) from None
            items.append(_checked(task, _item(task, obj, n, where), f"line {n}", where))
    elif fmt == "tsv":
        from icma.core.corpus import tsv_rows

        try:
            rows, _, report = tsv_rows(text, where)
        except CorpusError as exc:  # (a missing header): the upload is the bad field
            raise exc.at(where) from None
        if report.malformed:
            line, why = report.malformed[0]
            raise InputError(f"line {line}: {why}", field=where)
        items = []
        for line, cid, smiles, description in rows:
            if not cid:
                raise InputError(f"line {line}: empty CID", field=where)
            item = Item(smiles, cid, description or None) if task == "mol2cap" else \
                Item(description, cid, smiles or None)
            items.append(_checked(task, item, f"line {line}", where))
    else:
        raise InputError(f"unknown input format {fmt!r}; use jsonl or tsv", field="format")
    if not items:
        raise InputError("no items in the file", field=where)
    return items


def parquet_items(task: str, data: bytes, where: str = "file") -> list[Item]:
    """Items from a Parquet file whose rows are what a JSONL line holds (columns ``input``,
    ``id``, ``reference``, or a corpus's ``cid``, ``smiles``, ``description``); the same
    checks as ``parse_items``, rows counted from 1."""
    import io

    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("reading Parquet needs pyarrow: pip install 'icma[ray]'",
                         field="format") from None
    try:
        rows = pq.read_table(io.BytesIO(data)).to_pylist()
    except Exception as exc:  # pyarrow's errors share no base class worth naming
        raise InputError(f"not a readable Parquet file ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})",
                         field=where) from None
    items = [_checked(task, _item(task, row, n, where, "row"), f"row {n}", where)
             for n, row in enumerate(rows, start=1)]
    if not items:
        raise InputError("no items in the file", field=where)
    return items


def _checked(task: str, item: Item, line: str, where: str) -> Item:
    try:
        return check_item(task, item)
    except InputError as exc:
        raise InputError(f"{line}: {exc.field} {exc.message}", field=where) from None


def _item(task: str, obj, n: int, where: str, unit: str = "line") -> Item:
    if isinstance(obj, str):
        return Item(obj)
    if not isinstance(obj, dict):
        raise InputError(f"{unit} {n}: expected a JSON object or string", field=where)
    keys = {k.lower(): k for k in obj}
    if "input" in keys:
        value, ref = obj[keys["input"]], obj.get(keys.get("reference", ""), None)
    elif task == "mol2cap" and "smiles" in keys:
        value, ref = obj[keys["smiles"]], obj.get(keys.get("description", ""), None)
    elif task == "cap2mol" and "description" in keys:
        value, ref = obj[keys["description"]], obj.get(keys.get("smiles", ""), None)
    else:
        side = "smiles" if task == "mol2cap" else "description"
        raise InputError(f"{unit} {n}: needs 'input' (or '{side}')", field=where)
    ident = obj.get(keys.get("id", keys.get("cid", "")), None)
    if not isinstance(value, str):
        raise InputError(f"{unit} {n}: 'input' must be a string", field=where)
    if not isinstance(ident, (str, int, type(None))) or isinstance(ident, bool):
        raise InputError(f"{unit} {n}: 'id' must be a string or an integer", field=where)
    if not isinstance(ref, (str, type(None))):
        raise InputError(f"{unit} {n}: 'reference' must be a string", field=where)
    return Item(value, None if ident is None else str(ident),
                None if ref in (None, "") else ref)
