"""App factory. The lifespan starts the job backend (recovery + worker) and stops it."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .auth.caller import OPEN
from .config import Settings, get_settings
from .errors import ServiceError, error_body, error_response
from .api import openai
from .jobs.service import JobService
from .playground import is_public

log = logging.getLogger("diffusionapi")

# Endpoints whose bodies carry images get DIFFUSIONAPI_MAX_IMAGE_BODY_BYTES instead of MAX_BODY_BYTES.
IMAGE_BODY_PATHS = ("/img2img", "/edit", "/upscale", "/sdapi/v1/img2img", "/sdapi/v1/extra-single-image",
                    "/sdapi/v1/png-info", "/png-info", "/sdapi/v1/txt2img", "/controlnet/detect",
                    *openai.IMAGE_BODY_PATHS)
SDAPI_PREFIX = "/sdapi/"  # A1111's dialect: its own error shape (and Basic auth challenges)


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
    """Request body cap and the one credential check for every route of both dialects
    (auth/keys.py), as a plain ASGI layer (cheap on every call)."""

    def __init__(self, app, settings: Settings, auth=None):
        self.app = app
        self.max_body = settings.max_body_bytes
        self.max_image_body = max(settings.max_image_body_bytes, settings.max_body_bytes)
        from .auth.keys import Authenticator

        self.auth = auth or Authenticator(settings)  # named keys, the one API key, API_AUTH users
        self.has_key = bool(settings.api_key or settings.api_keys_file)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw_headers = scope.get("headers") or []
        path = scope["path"]
        in_openai = openai.is_openai_path(path)  # the /v1 dialect answers in OpenAI's error shape
        # Who is calling (auth/keys.py): the routes pass scope["state"]["caller"] to the job service.
        if self.auth.enabled and not is_public(path) and not openai.is_public(path) \
                and scope.get("method") != "OPTIONS":
            caller = self.auth.authenticate(raw_headers)
            if caller is None:
                if path.startswith(SDAPI_PREFIX):  # A1111 clients answer a Basic challenge
                    msg = "Incorrect username or password"
                    return await _send_json(send, 401, {"status": "error", "error": msg, "detail": msg},
                                            extra=[(b"www-authenticate", b"Basic")])
                return await _send_json(send, 401, openai.unauthorized_body() if in_openai else
                                        error_body("missing or wrong credentials "
                                                   "(Authorization: Bearer <key>, X-API-Key, or Basic)"),
                                        extra=[(b"www-authenticate", b"Bearer" if self.has_key else b"Basic")])
            refused = _spend_request(scope, caller)
            if refused is not None:
                return await _send_service_error(send, path, refused)
        else:
            caller = OPEN
        scope.setdefault("state", {})["caller"] = caller
        headers = dict(raw_headers)
        limit = self.max_image_body if path in IMAGE_BODY_PATHS else self.max_body
        too_large = openai.too_large_body(limit) if in_openai else error_body(f"request body larger than {limit} bytes")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                return await _send_json(send, 400, openai.error_body("bad Content-Length") if in_openai
                                        else error_body("bad Content-Length"))
            if too_big:
                return await _send_json(send, 413, too_large)
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
                    await _send_json(send, 413, too_large)
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(message):
            if not answered:
                await send(message)

        await self.app(scope, capped_receive, guarded_send)


def _spend_request(scope, caller):
    """One request of the key's requests_per_minute (jobs/quotas.py); the RateLimited if spent."""
    from .errors import RateLimited

    ledger = getattr(getattr(scope.get("app"), "state", None), "backend", None)
    ledger = getattr(ledger, "ledger", None)
    if ledger is None:
        return None
    try:
        ledger.take_request(caller)
    except RateLimited as e:
        return e
    return None


async def _send_service_error(send, path: str, e: ServiceError):
    """A refusal made before any route ran, in the shape of the dialect the path belongs to."""
    extra = [(k.lower().encode(), str(v).encode()) for k, v in e.headers.items()]
    if path.startswith(SDAPI_PREFIX):
        body = {"error": type(e).__name__, "detail": str(e), "body": "", "errors": str(e), "status": "error"}
    elif openai.is_openai_path(path):
        body = openai.service_error_body(e)
    else:
        body = error_body(e.message, e.field, **e.extra)
    return await _send_json(send, e.status, body, extra=extra)


def _body_error_shape(path: str, e) -> dict:
    """A body no field can take (security/jsonbody.py), in the dialect's error shape."""
    from .security import jsonbody

    if path.startswith(SDAPI_PREFIX):
        return jsonbody.sdapi_error_body(str(e))
    if openai.is_openai_path(path):
        return openai.error_body(str(e), param=openai.param_of(jsonbody.field_name(e.loc)) if e.loc else None)
    return jsonbody.native_error_body(e)


async def _send_json(send, status: int, body: dict, extra=()):
    import json

    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": data})


def _reload_keys_on_sighup(authenticator) -> None:
    """``kill -HUP <pid>`` reads the keys file again (a changed file is also noticed by itself)."""
    import asyncio
    import signal

    if authenticator.keys is None or not hasattr(signal, "SIGHUP"):
        return
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, authenticator.reload)
    except (RuntimeError, NotImplementedError, ValueError):  # not the main thread (tests), or no signals
        pass


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
    from . import logs, metrics
    from .registry import Registry

    logs.configure(settings.log_format, settings.log_level)

    registry = Registry(settings)
    backend = make_backend(settings, registry, engine_factory)
    registry = getattr(backend, "catalog", registry)  # a cluster's API node sees the workers' catalog

    from .auth.keys import Authenticator

    authenticator = Authenticator(settings)  # an unreadable keys file stops the start here

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        logs.log_settings(settings, f"DiffusionAPI {__version__} ({settings.backend} backend)")
        _reload_keys_on_sighup(authenticator)
        backend.start()
        metrics.LIVE.queue_source = backend.queue_stats
        if settings.backend == "embedded":  # an API node writes no files
            from .retention import disk_free

            metrics.LIVE.disk_source = lambda: disk_free(settings)
        log.info("DiffusionAPI %s: %d models installed", __version__, len(registry.models()))
        try:
            yield
        finally:
            if metrics.LIVE.queue_source == backend.queue_stats:
                metrics.LIVE.queue_source = None
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

    async def _unavailable(request, exc: Exception):
        # A part the backend needs (Redis, the broker) is unreachable: a client retries later (#32).
        return JSONResponse(error_body(f"the job backend is unavailable: {exc}"), status_code=503,
                            headers={"Retry-After": "5"})

    for exc_type in backend.unavailable_errors:
        app.add_exception_handler(exc_type, _unavailable)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": openapi.allowed_methods(app, request.scope)}
        if request.url.path.startswith(SDAPI_PREFIX):  # A1111's body (`detail`), e.g. its 401
            return sdapi.error_response(exc.status_code, str(exc.detail), headers=headers)
        return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code, headers=headers)

    from . import openapi, playground
    from .api import catalog, cluster, health, jobs as jobs_api, metrics as metrics_api, models_admin, pnginfo, sdapi

    app.include_router(health.router)
    app.include_router(metrics_api.router)
    app.include_router(catalog.router)
    app.include_router(models_admin.router)
    app.include_router(jobs_api.router)
    from .api import events as events_api

    app.include_router(events_api.router)
    app.include_router(pnginfo.router)
    app.include_router(cluster.router)
    from .api import controlnet as controlnet_api
    from .api.sdapi import controlnet as controlnet_a1111

    app.include_router(controlnet_api.router)
    app.include_router(controlnet_a1111.router, include_in_schema=False)
    sdapi.install(app, settings, registry)
    openai.install(app, settings, registry)
    playground.install(app)
    openapi.install(app, settings, is_public=is_public)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    from .security.jsonbody import JSONBodyGuard

    app.add_middleware(JSONBodyGuard, sdapi_prefix=SDAPI_PREFIX,  # inside the size cap: bodies are bounded
                       error_shape=_body_error_shape)
    app.add_middleware(GuardMiddleware, settings=settings, auth=authenticator)
    from .api.observe import ObserveMiddleware

    app.add_middleware(ObserveMiddleware, settings=settings)  # outermost: sees the guard's answers too
    return app


def __getattr__(name: str):
    # `uvicorn diffusionapi.main:app` builds the app on first access, after env is read.
    if name == "app":
        global app
        app = create_app()
        return app
    raise AttributeError(name)
