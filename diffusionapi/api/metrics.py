"""GET /metrics: Prometheus' text format (diffusionapi/metrics.py defines what is in it)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from .. import metrics

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    # Off the loop: the queue gauges read the backend (a file, or Redis) at each scrape.
    body, content_type = await run_in_threadpool(metrics.exposition)
    return Response(body, media_type=content_type)
