"""``icma serve retrieval|worker|all`` and ``icma openapi``: the services and their API document."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub) -> None:
    sv = sub.add_parser("serve", help="run a service")
    svsub = sv.add_subparsers(dest="service", metavar="SERVICE")
    rs = svsub.add_parser("retrieval", help="the retrieval microservice (FastAPI + uvicorn)")
    rs.add_argument("--host", default="127.0.0.1")
    rs.add_argument("--port", type=int, default=8001)
    rs.add_argument("--workers", type=int, default=None,
                    help="worker processes sharing the port (default ICMA_WORKERS, 1); one per "
                         "core uses every core")
    rs.add_argument("--log-level", default="info")
    rs.set_defaults(func=cmd_serve_retrieval)
    ws = svsub.add_parser("worker", help="the translation worker: /mol2cap, /cap2mol, jobs")
    ws.add_argument("--host", default="127.0.0.1")
    ws.add_argument("--port", type=int, default=8000)
    ws.add_argument("--retrieval-url", help="the retrieval service (default ICMA_RETRIEVAL_URL, "
                                            "http://127.0.0.1:8001)")
    _engine_flags(ws)
    ws.add_argument("--log-level", default="info")
    ws.set_defaults(func=cmd_serve_worker)
    sa = svsub.add_parser("all", help="both services, started in order, with example requests")
    sa.add_argument("--host", default="127.0.0.1")
    sa.add_argument("--retrieval-port", type=int, default=8001)
    sa.add_argument("--port", type=int, default=8000, help="the worker's port")
    _engine_flags(sa)
    sa.add_argument("--once", action="store_true",
                    help="stop after the example requests (a smoke test)")
    sa.set_defaults(func=cmd_serve_all)


def _engine_flags(parser) -> None:
    parser.add_argument("--engine", help=ENGINE_HELP)
    parser.add_argument("--model", help="LLM folder or hub id (ICMA_LLM_MODEL; default the "
                                        "shipped SmolLM2-135M-Instruct)")
    openai_flags(parser)


ENGINE_HELP = "transformers | vllm | openai | nearest-neighbour (ICMA_ENGINE)"


def openai_flags(parser) -> None:
    """The openai engine's server and model (its API key is read from ICMA_OPENAI_API_KEY
    only: a flag would show it in the process list)."""
    parser.add_argument("--openai-base-url", help="openai engine: the server's API root, e.g. "
                                                  "http://127.0.0.1:8002/v1 "
                                                  "(ICMA_OPENAI_BASE_URL)")
    parser.add_argument("--openai-model", help="openai engine: the model's name on the server "
                                               "(ICMA_OPENAI_MODEL)")


def with_engine_flags(settings, args, **more):
    """``settings`` with the engine flags ``args`` gave (an empty flag keeps the setting)."""
    return _with_flags(settings, **{"engine": args.engine, "llm_model": args.model,
                                    "openai_base_url": args.openai_base_url,
                                    "openai_model": args.openai_model, **more})


def add_openapi_parser(sub) -> None:
    oa = sub.add_parser("openapi", help="write the services' OpenAPI document")
    oa.add_argument("--out", type=Path, default=Path("openapi.yaml"))
    oa.set_defaults(func=cmd_openapi)


def cmd_serve_retrieval(args) -> int:
    from icma.server.supervisor import serve
    from icma.core.settings import get_settings

    settings = get_settings()
    _check_exposure(args.host, settings)
    workers = args.workers if args.workers is not None else settings.workers
    return serve("icma.services.retrieval.app:create_app", host=args.host, port=args.port,
                 workers=workers, log_level=args.log_level)


def cmd_serve_worker(args) -> int:
    from functools import partial

    from icma.core.settings import get_settings
    from icma.server.supervisor import serve
    from icma.workers.translator.app import create_app

    settings = with_engine_flags(get_settings(), args, retrieval_url=args.retrieval_url)
    _check_exposure(args.host, settings)
    _check_model(settings)
    # One process: the engine holds the model once, and its thread batches all requests.
    return serve(partial(create_app, settings), host=args.host, port=args.port, workers=1,
                 log_level=args.log_level)


def cmd_serve_all(args) -> int:
    from icma.core.settings import get_settings
    from icma.server.launcher import run_stack

    settings = with_engine_flags(get_settings(), args)
    _check_exposure(args.host, settings)
    _check_model(settings)
    return run_stack(settings, args.host, args.retrieval_port, args.port, once=args.once,
                     say=lambda m: print(m, flush=True))


def _check_exposure(host: str, settings) -> None:
    from icma.server.supervisor import check_exposure

    check_exposure(host, settings.api_key, settings.allow_remote_without_key)


def _check_model(settings) -> None:
    """The worker's model resolves (a hub id only where downloads are allowed) before anything
    starts; the shipped default is converted later, by the engine."""
    from icma.generation.models import resolve_model

    if settings.engine == "openai":
        from icma.generation.engines.openai import check_settings

        check_settings(settings)
    elif settings.engine != "nearest-neighbour":
        resolve_model(settings.llm_model, settings.data_dir, convert=False,
                      allow_downloads=settings.allow_model_downloads)


def _with_flags(settings, **flags):
    """A copy of ``settings`` with the flags that were given (an empty flag keeps the setting)."""
    return settings.model_copy(update={name: value for name, value in flags.items() if value})


def cmd_openapi(args) -> int:
    from icma.server.openapi import render
    from icma.services.retrieval.app import create_app as retrieval_app
    from icma.workers.translator.app import create_app as worker_app

    args.out.write_text(render(retrieval_app, worker_app), encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
