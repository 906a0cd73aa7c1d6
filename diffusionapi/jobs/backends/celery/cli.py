"""The `diffusionapi` command: the two roles of a cluster.

  diffusionapi api    [--host H] [--port P] [--workers N]        stateless HTTP node (Celery backend)
  diffusionapi worker [--device cuda:N] [--models a,b] [--name N] one process per GPU
  diffusionapi keys   add|list|revoke ...                        the API keys file (auth/cli.py)

Both read the same DIFFUSIONAPI_* settings (BROKER_URL, REDIS_URL, ...). ``api`` sets
DIFFUSIONAPI_BACKEND=celery unless it is set; an API node holds no job state, so uvicorn's
``--workers`` may be above 1 here (unlike the embedded backend).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def _api(args) -> int:
    import uvicorn

    os.environ.setdefault("DIFFUSIONAPI_BACKEND", "celery")
    uvicorn.run("diffusionapi.main:app", host=args.host, port=args.port, workers=args.workers,
                log_level=args.log_level, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
                http="diffusionapi.security.connguard:GuardedAuto")  # deadlines and connection caps
    return 0


def _worker(args) -> int:
    from ....config import Settings
    from .worker import serve

    if args.device:
        os.environ["DIFFUSIONAPI_DEVICE"] = args.device
    settings = Settings()
    engine_factory = None
    if args.sleep_engine is not None:
        from .sleep_engine import SleepEngine

        seconds, hold = args.sleep_engine, args.sleep_hold
        engine_factory = lambda: SleepEngine(seconds, hold_dir=hold)  # noqa: E731
    from ....logs import configure, log_settings

    # DIFFUSIONAPI_LOG_FORMAT / _LOG_LEVEL for our records (job lifecycle at INFO); --log-level
    # for Celery's and kombu's own.
    configure(settings.log_format, settings.log_level)
    logging.getLogger().setLevel(args.log_level.upper())
    log_settings(settings, "worker")
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    return serve(settings, name=args.name, models=models, engine_factory=engine_factory,
                 loglevel=args.log_level.upper())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:  # any backend's tool, dispatched before the cluster roles' parser
        from ....auth.cli import main as keys_main

        return keys_main(argv[1:])
    ap = argparse.ArgumentParser(prog="diffusionapi", description="DiffusionAPI cluster roles")
    sub = ap.add_subparsers(dest="role", required=True)
    api = sub.add_parser("api", help="an HTTP node (Celery backend)")
    api.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    api.add_argument("--port", type=int, default=int(os.environ.get("PORT", "7866")))
    api.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (stateless: any number)")
    api.add_argument("--ssl-certfile", default=os.environ.get("SSL_CERTFILE") or None)
    api.add_argument("--ssl-keyfile", default=os.environ.get("SSL_KEYFILE") or None)
    api.add_argument("--log-level", default="info")
    wk = sub.add_parser("worker", help="a GPU worker")
    wk.add_argument("--device", default=None, help="cuda:N, cuda, mps, cpu (default: DIFFUSIONAPI_DEVICE)")
    wk.add_argument("--models", default=None, help="comma-separated model names to serve (default: all installed); "
                                                   "the first is loaded at start and preferred")
    wk.add_argument("--name", default=None, help="worker name in /cluster (default host:device:pid)")
    wk.add_argument("--sleep-engine", type=float, default=None, metavar="SECONDS",
                    help="benchmarks: each job sleeps instead of generating")
    wk.add_argument("--sleep-hold", default=None, metavar="DIR",
                    help="tests, with --sleep-engine: a job whose prompt names a file in DIR runs while it exists")
    wk.add_argument("--log-level", default="warning")
    args = ap.parse_args(argv)
    return _api(args) if args.role == "api" else _worker(args)


if __name__ == "__main__":
    sys.exit(main())
