from __future__ import annotations

import uuid

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from ..jobs import QueueFull
from ..resolve import RequestError, resolve_request
from ..schemas import ErrorResponse, QueueListResponse, QueueStatusResponse, Txt2ImgRequest, Txt2ImgResponse

router = APIRouter()

_ERRORS = {404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}


def error(status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"status": "error", "error": message, **extra}, status_code=status, headers=headers)


def _valid_job_id(job_id: str) -> bool:
    try:
        return str(uuid.UUID(job_id)) == job_id
    except ValueError:
        return False


@router.post("/txt2img", response_model=Txt2ImgResponse, response_model_exclude_none=True,
             responses={**_ERRORS, 503: {"model": ErrorResponse}, 413: {"model": ErrorResponse}})
def txt2img(body: Txt2ImgRequest, request: Request):
    state = request.app.state
    try:
        spec = resolve_request(body, state.registry, state.settings, model_given="model" in body.model_fields_set)
    except RequestError as e:
        return error(e.status, str(e), detail=[{"loc": ["body", *e.field.split(".")], "msg": e.message}])
    job_id = str(uuid.uuid4())
    try:
        state.jobs.submit(job_id, spec.request.model_dump(mode="json"))
    except QueueFull:
        return error(503, f"the queue is full ({state.settings.max_queued_jobs} jobs); retry later",
                     headers={"Retry-After": "10"})
    except OSError as e:  # the job could not be made durable, so it is not accepted
        return error(503, f"cannot record the job in the queue directory: {e.strerror or e}",
                     headers={"Retry-After": "30"})
    return Txt2ImgResponse(job_id=job_id, ignored_fields=sorted(body.model_extra) or None)


@router.get("/queue", response_model=QueueListResponse)
async def queue_list(request: Request):
    return QueueListResponse(jobs=await run_in_threadpool(request.app.state.jobs.listing))


@router.get("/queue/{job_id}", response_model=QueueStatusResponse, response_model_exclude_none=False,
            responses=_ERRORS)
async def queue_status(job_id: str, request: Request,
                       wait: float = Query(0, ge=0, le=60, description="long-poll: seconds to wait for the job to finish")):
    # async + one small file read: polling must never wait for a threadpool slot.
    if not _valid_job_id(job_id):
        return error(404, f"no job {job_id!r} (job ids are UUIDs)")
    jobs = request.app.state.jobs
    if wait:
        await jobs.wait_final(job_id, wait)
    resp = jobs.status(job_id)
    if resp is None:
        return error(404, f"no job {job_id!r}: unknown, or its final result was already read")
    return JSONResponse(resp)


@router.delete("/queue/{job_id}", responses={**_ERRORS, 409: {"model": ErrorResponse}})
async def queue_cancel(job_id: str, request: Request):
    if not _valid_job_id(job_id):
        return error(404, f"no job {job_id!r} (job ids are UUIDs)")
    outcome = request.app.state.jobs.cancel(job_id)
    if outcome is None:
        return error(404, f"no job {job_id!r}")
    if outcome in ("cancelled", "cancelling"):
        return {"status": "success", "job_id": job_id, "state": outcome}
    return error(409, f"job {job_id} is already {outcome}", state=outcome)
