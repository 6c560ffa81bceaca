"""Download the full public splits (train included) for users with internet access.

Files whose exact bytes are known are checked by sha256; the others (the train splits, which are
not available offline to pin) are checked by parsing them as corpora. Everything lands in a
staging folder first and is moved into place only when every file passed: a failed download
leaves the target as it was.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from icma.core.corpus import read_corpus
from icma.core.errors import IcmaError, InputError

_MOLT5 = "https://raw.githubusercontent.com/blender-nlp/MolT5/main/"
_ICMA = "https://raw.githubusercontent.com/phenixace/ICMA/974adf3cd9487c6ee4768c4d6317e11ab499e11d/"


@dataclass(frozen=True)
class Dataset:
    base_url: str
    files: dict[str, str]  # local name -> path under base_url
    sha256: dict[str, str] = field(default_factory=dict)  # local name -> known digest
    rows: dict[str, int] = field(default_factory=dict)  # local name -> published row count
    attribution: str = ""


DATASETS: dict[str, Dataset] = {
    "chebi20": Dataset(
        base_url=_MOLT5,
        files={s: f"ChEBI-20_data/{s}" for s in ("train.txt", "validation.txt", "test.txt")},
        sha256={
            "validation.txt": "f410b58e6825986577d01b4f0c14b59ed61c1343a15118ba584de4bbcea1508c",
            "test.txt": "91776254b54ef13ad701ede0ecdbd7bcd30c19a66e52aa34a6dac8d0e7306d72",
        },
        rows={"train.txt": 26407, "validation.txt": 3301, "test.txt": 3300},
        attribution="ChEBI-20 (MolT5, Edwards et al. 2022; blender-nlp/MolT5, BSD-3-Clause). "
                    "Descriptions from ChEBI, CC BY 4.0. Molecules from PubChem.",
    ),
    "pubchem324k": Dataset(
        base_url=_ICMA,
        files={s: f"data/PubChem324k/molcap/raw/{s}"
               for s in ("train.txt", "validation.txt", "test.txt")},
        sha256={
            "validation.txt": "03d3e8248c98954c50934fcebc07e266ac8885238a3322fc457dc210bc91f75f",
            "test.txt": "0bdf2de078a24c2fd772eb08c97fecf014ba9fcb1edb5fa4a0483f2da7de17db",
        },
        rows={"validation.txt": 1000, "test.txt": 2000},
        attribution="PubChem324k molecule-caption split as distributed by ICMA (phenixace/ICMA "
                    "@ 974adf3), derived from PubChem via MolCA. Cite PubChem, MolCA and ICMA.",
    ),
    "pubchem324k-iupac": Dataset(
        base_url=_ICMA,
        files={s: f"data/PubChem324k/iupac/raw/{s}"
               for s in ("train.txt", "validation.txt", "test.txt")},
        sha256={
            "train.txt": "22e605ad33d371b24fee213c4655f7391648ebe7d76c1e5a727fa21d41477fbb",
            "validation.txt": "53642bfb5875467a3ebcd788961b4a933a3ed40f45637f1e6ebeb0de87305fcb",
            "test.txt": "e216b4fd99dc23ab6f16d1643cced45e7663f20dae82d6c607b83b9a1731e347",
        },
        rows={"train.txt": 11856, "validation.txt": 982, "test.txt": 1985},
        attribution="PubChem324k IUPAC-name task as distributed by ICMA (phenixace/ICMA "
                    "@ 974adf3). Cite PubChem, MolCA and ICMA.",
    ),
}


class DownloadError(IcmaError):
    """A file could not be fetched or failed verification."""


def download(name: str, to: str | Path, *, base_url: str | None = None, timeout: float = 60.0,
             log=print) -> dict:
    """Fetch dataset ``name`` into ``to``; returns the record also written to ``SOURCES.json``.

    ``base_url`` replaces the public host (a mirror, or a local server in tests).
    """
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}",
                         field="dataset")
    ds = DATASETS[name]
    base = base_url or ds.base_url
    if not base.endswith("/"):
        base += "/"
    target = Path(to)
    if target.exists() and not target.is_dir():
        raise InputError(f"{target} exists and is not a directory", field="to")
    staging = target.parent / f".{target.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    record = {"dataset": name, "downloaded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "files": {}}
    try:
        for local, remote in ds.files.items():
            url = base + remote
            dest = staging / local
            log(f"fetching {url}")
            digest, size = _fetch(url, dest, timeout)
            expected = ds.sha256.get(local)
            if expected and digest != expected:
                raise DownloadError(f"{url}: sha256 {digest} does not match the published "
                                    f"file's {expected}; refusing to use it")
            corpus, report = read_corpus(dest, on_invalid="keep")
            rows = report.rows
            note = "sha256 verified" if expected else "format verified (no pinned checksum)"
            if ds.rows.get(local) not in (None, rows):
                note += f"; {rows} rows where the published split has {ds.rows[local]}"
            log(f"  {local}: {size} bytes, {rows} rows, {note}")
            record["files"][local] = {"url": url, "sha256": digest, "bytes": size, "rows": rows,
                                      "verified": "sha256" if expected else "format",
                                      "note": note}
        (staging / "SOURCES.json").write_text(json.dumps(record, indent=2) + "\n")
        (staging / "ATTRIBUTION.md").write_text(f"# {name}\n\n{ds.attribution}\n")
        target.mkdir(parents=True, exist_ok=True)
        for f in staging.iterdir():
            f.replace(target / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def _fetch(url: str, dest: Path, timeout: float) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as out:
            while chunk := resp.read(1 << 16):
                h.update(chunk)
                out.write(chunk)
                size += len(chunk)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"{url}: cannot connect ({reason})") from None
    return h.hexdigest(), size
