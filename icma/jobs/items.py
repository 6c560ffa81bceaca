"""Job inputs read from an uploaded or local file (JSON lines or a corpus TSV)."""

from __future__ import annotations

import json

from icma.core.errors import InputError
from icma.jobs.store import Item


def parse_items(task: str, text: str, fmt: str, where: str = "file",
                max_heavy_atoms: int | None = None) -> list[Item]:
    """Items from an uploaded file. ``jsonl``: one object per line, ``{"input", "id",
    "reference"}`` or a corpus record ``{"cid", "smiles", "description"}``, or a bare JSON
    string. ``tsv``: a corpus file (``CID SMILES description`` header): the input is the SMILES
    for mol2cap and the description for cap2mol, the other side is the reference. A malformed
    line refuses the whole file (naming the line); a bad value (an invalid SMILES, an empty
    caption) is that item's error when the job runs. ``max_heavy_atoms``: the TSV reader
    parses larger molecules only far enough to count them (they fail when the job runs)."""
    if fmt == "jsonl":
        items = []
        for n, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise InputError(f"line {n}: invalid JSON ({exc.msg})", field=where) from None
            items.append(_item(task, obj, f"{where} line {n}"))
    elif fmt == "tsv":
        from icma.core.corpus import parse_corpus_text

        corpus, report = parse_corpus_text(text, fmt="tsv", name=where, on_invalid="keep",
                                           max_heavy_atoms=max_heavy_atoms)
        if report.malformed:
            line, why = report.malformed[0]
            raise InputError(f"line {line}: {why}", field=where)
        smiles_side = task == "mol2cap"
        items = [Item(r.smiles if smiles_side else r.description, r.cid,
                      (r.description or None) if smiles_side else r.smiles)
                 for r in corpus.records]
    else:
        raise InputError(f"unknown input format {fmt!r}; use jsonl or tsv", field="format")
    if not items:
        raise InputError("no items in the file", field=where)
    return items


def _item(task: str, obj, where: str) -> Item:
    if isinstance(obj, str):
        return Item(obj)
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object or string", field="items")
    keys = {k.lower(): k for k in obj}
    if "input" in keys:
        value, ref = obj[keys["input"]], obj.get(keys.get("reference", ""), None)
    elif task == "mol2cap" and "smiles" in keys:
        value, ref = obj[keys["smiles"]], obj.get(keys.get("description", ""), None)
    elif task == "cap2mol" and "description" in keys:
        value, ref = obj[keys["description"]], obj.get(keys.get("smiles", ""), None)
    else:
        side = "smiles" if task == "mol2cap" else "description"
        raise InputError(f"{where}: needs 'input' (or '{side}')", field="items")
    ident = obj.get(keys.get("id", keys.get("cid", "")), None)
    if not isinstance(value, str):
        raise InputError(f"{where}: 'input' must be a string", field="items")
    return Item(value, None if ident is None else str(ident),
                None if ref in (None, "") else str(ref))


