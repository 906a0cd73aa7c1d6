"""OpenAI's Images API at `/v1`: a dialect over the job service (jobs/service.py), so that any
OpenAI-speaking client (the `openai` SDKs, Open WebUI's image editing, LibreChat, gateways)
generates and edits here unchanged. docs/openai.md tables what maps to what.

It is mounted as an app of its own so that everything under `/v1` -- unknown paths and
methods included -- answers in OpenAI's error shape; main.py's guard (API key, body size)
covers it like every other path and asks :func:`is_openai_path` for the shape of its refusals.
"""
from __future__ import annotations

from .errors import error_body, param_of, service_error_body, too_large_body, unauthorized_body  # noqa: F401 - main.py's guard
from .results import PREFIX as RESULTS_PREFIX

PREFIX = "/v1"
# Endpoints whose bodies carry images: they get DIFFUSIONAPI_MAX_IMAGE_BODY_BYTES.
IMAGE_BODY_PATHS = ("/v1/images/edits", "/v1/images/variations")


def is_openai_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def is_public(path: str) -> bool:
    """Result URLs need no API key: their unguessable name is the credential (results.py)."""
    return path.startswith(RESULTS_PREFIX)


def install(app, settings, registry) -> None:
    from dataclasses import dataclass
    from pathlib import Path

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .errors import OpenAIError
    from .results import ResultFiles
    from .routes import error_response, router

    @dataclass
    class State:
        jobs: object
        settings: object
        registry: object
        results: ResultFiles

    sub = FastAPI(title="DiffusionAPI: OpenAI Images API", docs_url=None, redoc_url=None, openapi_url=None)
    sub.state.openai = State(app.state.jobs, settings, registry,
                             ResultFiles(Path(settings.outputs_dir) / "openai-results", settings.results_ttl_sec,
                                         app.state.jobs.shared_blobs()))

    @sub.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(OpenAIError(exc.status_code, str(exc.detail), code=code,
                                          headers=getattr(exc, "headers", None)))

    @sub.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        err = exc.errors()[0]
        param = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path")) or None
        return error_response(OpenAIError(400, str(err.get("msg")), param=param))

    sub.include_router(router)
    app.mount(PREFIX, sub)
