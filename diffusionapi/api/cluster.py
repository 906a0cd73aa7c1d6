"""GET /cluster: the workers behind this API (one, in-process, with the embedded backend)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

router = APIRouter()


class ClusterWorkerInfo(BaseModel):
    name: str
    alive: bool
    device: str | None = None
    host: str | None = None
    models: list[str] = []
    loaded_model: str | None = None
    current_job: str | None = None
    jobs_done: int = 0
    heartbeat_age: float  # seconds since its last heartbeat (Redis clock); dead after dead_after_sec


class ClusterResponse(BaseModel):
    backend: str  # embedded | celery
    workers: list[ClusterWorkerInfo]
    queued: int
    running: int
    dead_after_sec: float


@router.get("/cluster", response_model=ClusterResponse)
async def cluster(request: Request) -> ClusterResponse:
    jobs = request.app.state.jobs
    view = getattr(jobs.backend, "cluster_view", None)  # a cluster's own view of its workers
    if view is not None:
        return ClusterResponse(**await run_in_threadpool(view))
    # Embedded: the worker thread of this process is the whole cluster.
    from .jobs import caller_of

    running = jobs.current_job()
    entries = await run_in_threadpool(jobs.listing)  # counts only: every key's
    return ClusterResponse(
        backend="embedded", queued=sum(1 for e in entries if e.state == "queued"), running=1 if running else 0,
        dead_after_sec=0.0,
        workers=[ClusterWorkerInfo(name="embedded", alive=True, device=request.app.state.settings.device,
                                   current_job=jobs.current_job(caller_of(request)), heartbeat_age=0.0)])
