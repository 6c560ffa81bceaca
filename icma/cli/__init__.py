"""The ``icma`` command line. Every user error ends in one line naming the problem, exit code 2.

Each command group lives in its own module (``index``, ``data``, ``serve``, ``translate``,
``tune``, ``adapters``, ``evaluate``, ``demo``) with its sub-parser (``add_parser``) and its
``cmd_*`` functions; here they are put together, and errors become exit codes.
"""

from __future__ import annotations

import argparse
import logging
import sys

from icma import __version__
from icma.cli import adapters, data, demo, evaluate, index, serve, translate, tune
from icma.core.errors import IcmaError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except IcmaError as exc:
        print(f"icma: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("icma: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `icma retrieve ... | head`
        return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="icma", description="ICMA molecule <-> caption translation")
    p.add_argument("--version", action="version", version=f"icma {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress and decisions")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    # `icma --help` lists the commands in the order they are added here.
    index.add_parser(sub)
    data.add_parser(sub)
    serve.add_parser(sub)
    translate.add_parser(sub)
    tune.add_parser(sub)
    adapters.add_parser(sub)
    serve.add_openapi_parser(sub)
    evaluate.add_parser(sub)
    demo.add_parser(sub)
    return p


if __name__ == "__main__":
    sys.exit(main())
