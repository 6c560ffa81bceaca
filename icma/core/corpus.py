"""Molecule-caption corpora: read, validate, write, and the embedded default corpus.

A corpus is an ordered list of records (CID, SMILES as written, RDKit canonical SMILES,
description). Order matters: retrieval breaks score ties by corpus position, as ICMA did.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

from icma.core import chem
from icma.core.errors import CorpusError, InputError
from icma.core.jsontext import JsonTextError, parse_json
from icma.core.settings import PACKAGE_DATA

OnInvalid = Literal["skip", "keep", "fail"]
EMBEDDED_DIR = PACKAGE_DATA / "chebi20"
EMBEDDED_NAME = "chebi20-embedded"


@dataclass(frozen=True)
class Record:
    cid: str
    smiles: str  # exactly as written in the source file (ChEBI-20's doubled backslashes kept)
    canonical: str | None  # RDKit canonical SMILES; None when the SMILES did not parse
    description: str = ""


@dataclass
class LoadReport:
    """What reading a corpus file found. Line numbers count the header as line 1."""

    path: str
    rows: int = 0
    kept: int = 0
    malformed: list[tuple[int, str]] = field(default_factory=list)
    invalid_smiles: list[tuple[int, str, str]] = field(default_factory=list)  # line, cid, reason
    empty_descriptions: list[tuple[int, str]] = field(default_factory=list)
    duplicate_cids: list[tuple[int, str, int]] = field(default_factory=list)  # line, cid, first

    def summary(self) -> str:
        parts = [f"{self.path}: {self.rows} rows, {self.kept} kept"]
        if self.malformed:
            parts.append(f"{len(self.malformed)} malformed")
        if self.invalid_smiles:
            parts.append(f"{len(self.invalid_smiles)} invalid SMILES")
        if self.empty_descriptions:
            parts.append(f"{len(self.empty_descriptions)} empty descriptions")
        if self.duplicate_cids:
            parts.append(f"{len(self.duplicate_cids)} duplicate CIDs")
        return ", ".join(parts)

    def details(self, limit: int = 10) -> list[str]:
        lines = [f"line {n}: malformed: {why}" for n, why in self.malformed[:limit]]
        lines += [f"line {n}: CID {c}: {why}" for n, c, why in self.invalid_smiles[:limit]]
        lines += [f"line {n}: CID {c}: empty description" for n, c in self.empty_descriptions[:limit]]
        lines += [
            f"line {n}: CID {c} repeats line {first}" for n, c, first in self.duplicate_cids[:limit]
        ]
        return lines


class Corpus:
    """An immutable, ordered set of records with column views for the indexes."""

    def __init__(self, records: Iterable[Record], name: str = "corpus", has_captions: bool = True):
        self.records: list[Record] = list(records)
        self.name = name
        self.has_captions = has_captions
        self.cids = [r.cid for r in self.records]
        self.smiles = [r.smiles for r in self.records]
        self.canonical = [r.canonical for r in self.records]
        self.descriptions = [r.description for r in self.records]
        self._checksum: str | None = None
        self._by_cid: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Record:
        return self.records[i]

    @property
    def checksum(self) -> str:
        """sha256 of the records' content and order: what a saved index is bound to."""
        if self._checksum is None:
            h = hashlib.sha256()
            for r in self.records:
                h.update(f"{r.cid}\t{r.smiles}\t{r.description}\n".encode("utf-8"))
            self._checksum = h.hexdigest()
        return self._checksum

    def position(self, cid: str) -> int:
        """Row of the first record with this CID."""
        if self._by_cid is None:
            self._by_cid = {}
            for i, c in enumerate(self.cids):
                self._by_cid.setdefault(c, i)
        try:
            return self._by_cid[cid]
        except KeyError:
            raise InputError(f"CID {cid!r} is not in corpus {self.name!r}", field="cid") from None

    def subset(self, rows: Iterable[int], name: str | None = None) -> "Corpus":
        return Corpus([self.records[i] for i in rows], name or self.name, self.has_captions)

    # The saved form keeps the canonical SMILES so that loading an index needs no RDKit pass.
    def save(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"name": self.name, "has_captions": self.has_captions}) + "\n")
            for r in self.records:
                f.write(json.dumps([r.cid, r.smiles, r.canonical, r.description], ensure_ascii=False))
                f.write("\n")

    @classmethod
    def load_saved(cls, path: Path) -> "Corpus":
        with open(path, encoding="utf-8") as f:
            head = json.loads(f.readline())
            records = [Record(*json.loads(line)) for line in f]
        return cls(records, head["name"], head["has_captions"])


# --- reading -----------------------------------------------------------------------------------

def read_corpus(
    path: str | Path,
    *,
    name: str | None = None,
    on_invalid: OnInvalid = "skip",
    strict: bool = False,
) -> tuple[Corpus, LoadReport]:
    """Read a TSV (header ``CID SMILES [description]``, any case) or JSONL corpus.

    Invalid SMILES: ``skip`` (default, counted in the report), ``keep`` (canonical is None; for
    caption-only use such as BM25, where dropping rows would change the index), or ``fail``.
    ``strict`` turns every problem (malformed row, invalid SMILES, empty description) into an error.
    Duplicate CIDs are kept and reported: ICMA's data has them.
    """
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"no such file: {path}", field="corpus")
    if path.is_dir():
        raise CorpusError(f"is a directory, not a corpus file: {path}", field="corpus")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                          field="corpus") from None
    if strict:
        on_invalid = "fail"
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows, has_captions, report = _jsonl_rows(text, str(path))
    else:
        rows, has_captions, report = tsv_rows(text, str(path))
    corpus = _build(rows, has_captions, report, on_invalid, strict, name or path.stem)
    return corpus, report


def parse_corpus_text(text: str, *, fmt: str = "tsv", name: str = "upload",
                      on_invalid: OnInvalid = "skip", strict: bool = False,
                      max_heavy_atoms: int | None = None) -> tuple[Corpus, LoadReport]:
    """The same as read_corpus, for text already in memory (uploads). ``max_heavy_atoms``
    counts larger molecules as invalid SMILES after a cheap parse, before the sanitisation that
    costs seconds for thousands of atoms (what a service takes from a client is bounded)."""
    if fmt == "jsonl":
        rows, has_captions, report = _jsonl_rows(text, name)
    elif fmt == "tsv":
        rows, has_captions, report = tsv_rows(text, name)
    else:
        raise InputError(f"unknown corpus format {fmt!r}; use tsv or jsonl", field="format")
    return _build(rows, has_captions, report, "fail" if strict else on_invalid, strict, name,
                  max_heavy_atoms), report


def tsv_rows(text: str, where: str):
    """(rows: (line, CID, SMILES, description), whether there is a description column, report)
    of a corpus TSV; nothing checked but its shape (job uploads read their items from here)."""
    report = LoadReport(path=where)
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise CorpusError(f"{where}: empty file, expected a header 'CID<TAB>SMILES<TAB>description'",
                          field="corpus")
    header = [h.strip() for h in lines[0].split("\t")]
    lower = [h.lower() for h in header]
    missing = [c for c in ("cid", "smiles") if c not in lower]
    if missing:
        raise CorpusError(
            f"{where}: header {header!r} lacks column(s) {missing}; expected "
            "'CID<TAB>SMILES<TAB>description' (tab-separated)",
            field="corpus",
        )
    i_cid, i_smi = lower.index("cid"), lower.index("smiles")
    i_desc = lower.index("description") if "description" in lower else None
    rows = []
    # csv with QUOTE_NONE: descriptions contain quotes that must stay literal text.
    reader = csv.reader(io.StringIO("\n".join(lines[1:])), delimiter="\t", quoting=csv.QUOTE_NONE)
    for offset, fields in enumerate(reader):
        line = offset + 2
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue
        report.rows += 1
        if len(fields) != len(header):
            report.malformed.append((line, f"{len(fields)} fields, header has {len(header)}"))
            continue
        desc = fields[i_desc] if i_desc is not None else ""
        rows.append((line, fields[i_cid].strip(), fields[i_smi].strip(), desc.strip()))
    return rows, i_desc is not None, report


def _jsonl_rows(text: str, where: str):
    report = LoadReport(path=where)
    rows = []
    has_captions = None
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        report.rows += 1
        try:
            obj = parse_json(raw)  # (a lone surrogate or deep nesting once made a 500)
        except JsonTextError as exc:
            report.malformed.append((n, str(exc)))
            continue
        if not isinstance(obj, dict):
            report.malformed.append((n, "not a JSON object"))
            continue
        keys = {k.lower(): k for k in obj}
        if "cid" not in keys or "smiles" not in keys:
            report.malformed.append((n, "object lacks 'cid' or 'smiles'"))
            continue
        if has_captions is None:
            has_captions = "description" in keys
        desc = obj.get(keys.get("description", ""), "") or ""
        rows.append((n, str(obj[keys["cid"]]).strip(), str(obj[keys["smiles"]]).strip(),
                     str(desc).strip()))
    if report.rows == 0:
        raise CorpusError(f"{where}: empty file, expected JSON lines with cid, smiles, description",
                          field="corpus")
    return rows, bool(has_captions), report


def _build(rows, has_captions, report: LoadReport, on_invalid: OnInvalid, strict: bool, name: str,
           max_heavy_atoms: int | None = None):
    first_line: dict[str, int] = {}
    records = []
    for line, cid, smiles, desc in rows:
        if not cid:
            report.malformed.append((line, "empty CID"))
            continue
        if has_captions and not desc:
            report.empty_descriptions.append((line, cid))
            continue
        canonical, why = chem.try_canonical(smiles, max_heavy_atoms)
        if canonical is None:
            report.invalid_smiles.append((line, cid, why or "invalid"))
            if on_invalid == "fail":
                raise CorpusError(f"{report.path}: line {line}: CID {cid}: {why}", field="smiles")
            if on_invalid == "skip":
                continue
        if cid in first_line:
            report.duplicate_cids.append((line, cid, first_line[cid]))
        else:
            first_line[cid] = line
        records.append(Record(cid, smiles, canonical, desc))
    if strict and (report.malformed or report.empty_descriptions):
        raise CorpusError("; ".join([report.summary()] + report.details(5)), field="corpus")
    report.kept = len(records)
    if not records:
        raise CorpusError(f"{report.summary()}: no usable rows" +
                          ("".join("; " + d for d in report.details(3))), field="corpus")
    return Corpus(records, name=name, has_captions=has_captions)


def write_corpus(corpus: Corpus, path: str | Path) -> None:
    """Write as TSV (``.tsv``/``.txt``; without a description column when the corpus has no
    captions, so that it reads back as it was) or JSONL, with the original SMILES text."""
    path = Path(path)
    text = _jsonl_text(corpus) if path.suffix.lower() in (".jsonl", ".ndjson") else \
        _tsv_text(corpus)
    write_atomically(path, text.encode("utf-8"))


def write_atomically(path: Path, data: bytes) -> None:
    """``data`` into ``path`` through ``path.part``: never a half-written file under the name,
    and no ``.part`` left behind when the write fails (disk full, an interrupted process
    leaves one that the services' start-up sweep removes)."""
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def tsv_bytes(corpus: Corpus) -> bytes:
    """The corpus as ``write_corpus`` writes it as TSV, checked to read back as the same
    records with the same reader (``read_corpus``). A CorpusError naming the first record that
    would not (a tab or line break in a field, text that is not proper Unicode): a corpus kept
    as a file must not change, or vanish, when it is read again."""
    text = _tsv_text(corpus)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        for i, r in enumerate(corpus.records):
            for what, value in (("CID", r.cid), ("SMILES", r.smiles),
                                ("description", r.description)):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise CorpusError(f"record {i + 1} (CID {r.cid!r}): its {what} is not "
                                      "proper Unicode text (a lone surrogate)",
                                      field="corpus") from None
        raise
    rows, has_captions, _ = tsv_rows(text, "stored")
    want = [(i + 2, r.cid, r.smiles, r.description if corpus.has_captions else "")
            for i, r in enumerate(corpus.records)]
    if has_captions == corpus.has_captions and rows == want:
        return data
    i = next((i for i, (a, b) in enumerate(zip(rows, want)) if a != b), min(len(rows), len(want)))
    r = corpus.records[min(i, len(corpus) - 1)]
    fields = (r.cid, r.smiles, r.description)
    why = "a tab" if any("\t" in f for f in fields) else "a line break" if any(
        len((f + ".").splitlines()) > 1 for f in fields) else "text"
    raise CorpusError(f"record {i + 1} (CID {r.cid!r}) holds {why} that a TSV file cannot keep, "
                      "so it would not read back the same; remove it from its fields",
                      field="corpus")


def _tsv_text(corpus: Corpus) -> str:
    if not corpus.has_captions:
        return "CID\tSMILES\n" + "".join(f"{r.cid}\t{r.smiles}\n" for r in corpus.records)
    return "CID\tSMILES\tdescription\n" + "".join(f"{r.cid}\t{r.smiles}\t{r.description}\n"
                                                for r in corpus.records)


def _jsonl_text(corpus: Corpus) -> str:
    def obj(r: Record) -> dict:
        o = {"cid": r.cid, "smiles": r.smiles}
        return {**o, "description": r.description} if corpus.has_captions else o

    return "".join(json.dumps(obj(r), ensure_ascii=False) + "\n" for r in corpus.records)


def embedded_corpus() -> Corpus:
    """ChEBI-20 validation + test (MolT5; CC BY 4.0), shipped in the package."""
    parts = []
    for split in ("validation", "test"):
        c, _ = read_corpus(EMBEDDED_DIR / f"{split}.txt", on_invalid="skip")
        parts.extend(c.records)
    return Corpus(parts, name=EMBEDDED_NAME)
