"""App factory. The lifespan starts the job backend (recovery + worker) and stops it."""
from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .config import Settings, get_settings
from .errors import ServiceError, error_body, error_response
from .jobs.service import JobService
from .playground import is_public

log = logging.getLogger("diffusionapi")

# Endpoints whose bodies carry images get DIFFUSIONAPI_MAX_IMAGE_BODY_BYTES instead of MAX_BODY_BYTES.
IMAGE_BODY_PATHS = ("/img2img", "/upscale", "/sdapi/v1/img2img", "/sdapi/v1/extra-single-image",
                    "/sdapi/v1/png-info", "/png-info")
SDAPI_PREFIX = "/sdapi/"  # checks its own credentials (Basic or the API key): api/sdapi/auth.py


def _field(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def _validation_message(errors) -> str:
    msgs = []
    for e in errors:
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        msgs.append(f"{_field(e.get('loc', ()))}: {msg}")
    return "; ".join(msgs)


class GuardMiddleware:
    """Request body cap and optional API key, as a plain ASGI layer (cheap on every call)."""

    def __init__(self, app, settings: Settings):
        self.app = app
        self.max_body = settings.max_body_bytes
        self.max_image_body = max(settings.max_image_body_bytes, settings.max_body_bytes)
        self.key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.key is not None and not is_public(scope["path"]) and scope.get("method") != "OPTIONS" \
                and not scope["path"].startswith(SDAPI_PREFIX):
            auth = headers.get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
            if not hmac.compare_digest(given, self.key):
                return await _send_json(send, 401, error_body("missing or wrong API key "
                                                               "(Authorization: Bearer <key> or X-API-Key)"),
                                        extra=[(b"www-authenticate", b"Bearer")])
        limit = self.max_image_body if scope["path"] in IMAGE_BODY_PATHS else self.max_body
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                return await _send_json(send, 400, error_body("bad Content-Length"))
            if too_big:
                return await _send_json(send, 413, error_body(f"request body larger than {limit} bytes"))
            return await self.app(scope, receive, send)
        # No Content-Length (chunked): count as the body streams in; past the cap, answer
        # 413 ourselves and tell the app the client went away.
        seen = 0
        answered = False

        async def capped_receive():
            nonlocal seen, answered
            msg = await receive()
            if msg["type"] == "http.request" and not answered:
                seen += len(msg.get("body", b""))
                if seen > limit:
                    answered = True
                    await _send_json(send, 413, error_body(f"request body larger than {limit} bytes"))
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(message):
            if not answered:
                await send(message)

        await self.app(scope, capped_receive, guarded_send)


async def _send_json(send, status: int, body: dict, extra=()):
    import json

    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": data})


def make_backend(settings: Settings, registry, engine_factory=None):
    """The job backend the settings name; ``engine_factory`` builds the engine in the worker
    (tests pass a fake one)."""
    if settings.backend == "celery":  # an API node of a cluster: workers run the jobs
        from .jobs.backends.celery.backend import CeleryBackend

        return CeleryBackend(settings)
    from .jobs.backends.embedded import EmbeddedBackend

    def default_engine():
        from .engine.engine import Engine

        return Engine(settings)

    return EmbeddedBackend(settings, registry, engine_factory or default_engine)


def create_app(settings: Settings | None = None, *, engine_factory=None) -> FastAPI:
    settings = settings or get_settings()
    from .registry import Registry

    registry = Registry(settings)
    backend = make_backend(settings, registry, engine_factory)
    registry = getattr(backend, "catalog", registry)  # a cluster's API node sees the workers' catalog

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        backend.start()
        log.info("DiffusionAPI %s: %d models installed", __version__, len(registry.models()))
        try:
            yield
        finally:
            backend.stop()

    # /docs and /redoc are served by playground.install, with their assets (offline boxes have no CDN).
    app = FastAPI(title="DiffusionAPI", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.registry = registry
    app.state.backend = backend
    app.state.jobs = JobService(backend, registry, settings)  # what every dialect calls

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg")), "type": e.get("type")} for e in errors]
        return JSONResponse({**error_body(_validation_message(errors)), "detail": detail}, status_code=422)

    @app.exception_handler(ServiceError)
    async def _refused(request, exc: ServiceError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": openapi.allowed_methods(app, request.scope)}
        return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code, headers=headers)

    from . import openapi, playground
    from .api import catalog, cluster, jobs as jobs_api, pnginfo, sdapi

    app.include_router(catalog.router)
    app.include_router(jobs_api.router)
    from .api import events as events_api

    app.include_router(events_api.router)
    app.include_router(pnginfo.router)
    app.include_router(cluster.router)
    sdapi.install(app, settings, registry)
    playground.install(app)
    openapi.install(app, settings, is_public=is_public)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(GuardMiddleware, settings=settings)
    return app


def __getattr__(name: str):
    # `uvicorn diffusionapi.main:app` builds the app on first access, after env is read.
    if name == "app":
        global app
        app = create_app()
        return app
    raise AttributeError(name)
