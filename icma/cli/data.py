"""``icma corpus validate`` and ``icma download``: corpus files, checked or fetched."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub) -> None:
    # corpus
    c = sub.add_parser("corpus", help="check corpus files")
    csub = c.add_subparsers(dest="corpus_command", metavar="ACTION")
    v = csub.add_parser("validate", help="report malformed rows, bad SMILES, duplicate CIDs")
    v.add_argument("path", type=Path)
    v.add_argument("--strict", action="store_true", help="exit non-zero on any problem")
    v.set_defaults(func=cmd_corpus_validate)

    # download
    d = sub.add_parser("download", help="fetch the full public splits (needs internet)")
    d.add_argument("dataset", help="chebi20 | pubchem324k | pubchem324k-iupac")
    d.add_argument("--to", required=True, type=Path)
    d.add_argument("--base-url", help="mirror to fetch from instead of the public host")
    d.set_defaults(func=cmd_download)


def cmd_corpus_validate(args) -> int:
    from icma.core.corpus import read_corpus

    corpus, report = read_corpus(args.path, on_invalid="keep")
    print(report.summary())
    for line in report.details(20):
        print(f"  {line}")
    problems = (report.malformed or report.invalid_smiles or report.empty_descriptions
                or report.duplicate_cids)
    return 1 if args.strict and problems else 0


def cmd_download(args) -> int:
    from icma.evaluation.download import download

    download(args.dataset, args.to, base_url=args.base_url,
             log=lambda m: print(m, file=sys.stderr))
    print(f"{args.dataset} -> {args.to}")
    return 0
