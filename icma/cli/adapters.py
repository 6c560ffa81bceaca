"""``icma adapters ship``: a tuned adapter from the registry into the shipped defaults."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    ad = sub.add_parser("adapters", help="the shipped default adapters")
    actions = ad.add_subparsers(dest="action", metavar="ACTION", required=True)
    ship = actions.add_parser(
        "ship", help="copy a tuned adapter into the shipped adapters (bfloat16) as its task's "
                     "default",
        description="Copy adapter NAME from the registry (ICMA_ADAPTERS_DIR) into the shipped "
                    "adapters (default ICMA_SHIPPED_ADAPTERS_DIR: the package's "
                    "icma/data/adapters), weights in bfloat16, marked as the default for its "
                    "task.")
    ship.add_argument("name")
    ship.add_argument("--to", type=Path, help="default ICMA_SHIPPED_ADAPTERS_DIR")
    ship.add_argument("--no-default", action="store_true",
                      help="ship it without making it its task's default")
    ship.set_defaults(func=cmd_ship)


def cmd_ship(args) -> int:
    from icma.core.errors import InputError
    from icma.core.settings import get_settings
    from icma.generation.adapters import AdapterRegistry, ship_adapter

    settings = get_settings()
    dest = args.to or settings.shipped_adapters_dir
    if dest is None:
        raise InputError("no shipped adapters folder: pass --to DIR", field="--to")
    info = AdapterRegistry(settings.adapters_path()).get(args.name)
    target = ship_adapter(info, dest, default=not args.no_default)
    print(f"{info.name} ({info.task}) -> {target}"
          + ("" if args.no_default else f", the default for {info.task}"))
    return 0
