"""AUTOMATIC1111-compatible API at `/sdapi/v1`: a dialect over the job service (jobs/service.py)."""
from __future__ import annotations


def install(app, settings, registry) -> None:
    from .routes import build_router
    from .service import SdapiState

    app.state.sdapi = SdapiState(app.state.jobs, settings, registry)
    app.include_router(build_router(app.state.sdapi))


def error_response(status: int, message: str, headers: dict | None = None):
    """A1111's error body, for what FastAPI refuses before a route runs (401, 404, 405)."""
    from .routes import _error

    return _error(status, message, headers=headers)
