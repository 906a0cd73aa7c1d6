"""Probes, served without the API key (playground.PUBLIC_PATHS) and cheap enough to call every
few seconds.

- ``GET /healthz``: the process answers (Kubernetes liveness). Nothing else is checked: a
  restart cures none of what /readyz reports.
- ``GET /readyz``: this node can take jobs (readiness): the backend's checks (embedded: the
  worker thread alive and not wedged, the queue directory writable; Celery API node: Redis, the
  broker, at least one live worker) and at least one model installed. 200 or 503 with
  ``{"status", "checks": {name: null | "why not"}}``.
"""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/healthz", include_in_schema=False)
async def healthz():
    return {"status": "ok"}


def _checks(app) -> dict[str, str | None]:
    checks = dict(app.state.jobs.readiness())
    try:
        checks["models"] = None if app.state.registry.models() else "no model installed"
    except Exception as e:  # noqa: BLE001 - a catalog that cannot be read is a failed check
        checks["models"] = f"cannot list models: {e}"
    return checks


@router.get("/readyz", include_in_schema=False)
async def readyz(request: Request):
    checks = await run_in_threadpool(_checks, request.app)
    failed = sorted(k for k, v in checks.items() if v is not None)
    body = {"status": "ready" if not failed else "not ready", "failed": failed, "checks": checks}
    return JSONResponse(body, status_code=503 if failed else 200)
