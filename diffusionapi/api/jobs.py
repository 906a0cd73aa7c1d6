"""Routes that submit, watch, cancel and collect jobs. Thin: the backend does the work."""
from __future__ import annotations

import uuid

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from ..jobs import observe
from ..jobs.backends.base import BackendUnavailable, QueueFull
from ..jobs.resolve import RequestError, resolve_img2img, resolve_txt2img, resolve_upscale
from ..schemas import (ErrorResponse, Img2ImgRequest, QueueListEntry, QueueListResponse, QueueStatusResponse,
                       Txt2ImgRequest, Txt2ImgResponse, UpscaleRequest)
from ..jobs.views import final_response, status_response
from ..jobs.webhooks import check_webhook

router = APIRouter()

_ERRORS = {404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}


def error(status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"status": "error", "error": message, **extra}, status_code=status, headers=headers)


def request_error(e: RequestError) -> JSONResponse:
    return error(e.status, str(e), detail=[{"loc": ["body", *e.field.split(".")], "msg": e.message}])


def valid_job_id(job_id: str) -> bool:
    try:
        return str(uuid.UUID(job_id)) == job_id
    except ValueError:
        return False


def submit(request: Request, kind: str, echo: dict):
    """Queue a resolved job; the response for the submit routes (or an error response)."""
    state = request.app.state
    if echo.get("webhook") and not state.jobs.delivers_webhooks:
        refused = (f"the {state.settings.backend} queue backend does not deliver webhooks; "
                   "poll GET /queue/{id} or follow GET /queue/{id}/events")
        return error(422, refused, detail=[{"loc": ["body", "webhook"], "msg": refused}])
    refused = check_webhook(echo.get("webhook"), state.settings)
    if refused:
        return error(422, refused, detail=[{"loc": ["body", "webhook", "url"], "msg": refused}])
    try:
        job_id = state.jobs.submit(kind, echo)
    except QueueFull:
        message = f"the queue is full ({state.settings.max_queued_jobs} jobs); retry later"
        observe.refused(kind, 503, message)
        return error(503, message, headers={"Retry-After": "10"})
    except BackendUnavailable as e:  # the job could not be made durable, so it is not accepted
        observe.refused(kind, 503, str(e))
        return error(503, str(e), headers={"Retry-After": "30"})
    observe.submitted(job_id, kind, echo)
    return job_id


_SUBMIT_ERRORS = {**_ERRORS, 503: {"model": ErrorResponse}, 413: {"model": ErrorResponse}}


def _resolve_and_submit(request: Request, body, resolve):
    """The submit routes' one shape: resolve (a 4xx names the field), record + queue, answer the id."""
    state = request.app.state
    try:
        job = resolve(body, state.registry, state.settings)
    except RequestError as e:
        return request_error(e)
    job_id = submit(request, job.kind, job.payload)
    if isinstance(job_id, JSONResponse):
        return job_id
    return Txt2ImgResponse(job_id=job_id, ignored_fields=sorted(body.model_extra) or None)


@router.post("/txt2img", response_model=Txt2ImgResponse, response_model_exclude_none=True, responses=_SUBMIT_ERRORS)
def txt2img(body: Txt2ImgRequest, request: Request):
    return _resolve_and_submit(request, body, lambda b, registry, settings: resolve_txt2img(
        b, registry, settings, model_given="model" in b.model_fields_set))


@router.post("/img2img", response_model=Txt2ImgResponse, response_model_exclude_none=True, responses=_SUBMIT_ERRORS)
def img2img(body: Img2ImgRequest, request: Request):
    """txt2img from an init image; with ``mask``, inpainting. Images are decoded and checked
    before the job is recorded."""
    return _resolve_and_submit(request, body, lambda b, registry, settings: resolve_img2img(
        b, registry, settings, model_given="model" in b.model_fields_set))


@router.post("/upscale", response_model=Txt2ImgResponse, response_model_exclude_none=True, responses=_SUBMIT_ERRORS)
def upscale(body: UpscaleRequest, request: Request):
    """Upscale one image (queued like any job): an upscaler file, or "Lanczos" / "Nearest"."""
    return _resolve_and_submit(request, body, resolve_upscale)


@router.get("/queue", response_model=QueueListResponse)
async def queue_list(request: Request):
    entries = await run_in_threadpool(request.app.state.jobs.listing)
    return QueueListResponse(jobs=[QueueListEntry(job_id=e.job_id, state=e.state, current_phase=e.current_phase,
                                                  progress=e.progress, queue_position=e.queue_position)
                                   for e in entries],
                             webhooks=await run_in_threadpool(request.app.state.jobs.webhook_deliveries))


@router.get("/queue/{job_id}", response_model=QueueStatusResponse, response_model_exclude_unset=True,
            responses={**_ERRORS, 410: {"model": ErrorResponse}})
async def queue_status(job_id: str, request: Request,
                       wait: float = Query(0, ge=0, le=60, description="long-poll: seconds to wait for the job to finish")):
    # async + one small file read: polling must never wait for a threadpool slot. Only the
    # final read (image files, base64) goes to a thread.
    if not valid_job_id(job_id):
        return error(404, f"no job {job_id!r} (job ids are UUIDs)")
    jobs = request.app.state.jobs
    if wait:
        await jobs.wait_final(job_id, wait)
    st = jobs.status(job_id)
    if st is not None and not st.is_final:
        return status_response(job_id, st, jobs.position(job_id))
    final = await run_in_threadpool(jobs.take_final, job_id) if st is not None else None
    if final is None:
        gone = jobs.expired(job_id)  # removed unread by retention (retention.py)
        if gone:
            return error(410, f"job {job_id} expired before its result was read: {gone}")
        return error(404, f"no job {job_id!r}: unknown, or its final result was already read")
    return await run_in_threadpool(final_response, job_id, final)


@router.delete("/queue/{job_id}", responses={**_ERRORS, 409: {"model": ErrorResponse}})
async def queue_cancel(job_id: str, request: Request):
    if not valid_job_id(job_id):
        return error(404, f"no job {job_id!r} (job ids are UUIDs)")
    observe.cancel_requested(job_id)
    outcome = request.app.state.jobs.cancel(job_id)
    if outcome is None:
        return error(404, f"no job {job_id!r}")
    if outcome in ("cancelled", "cancelling"):
        return {"status": "success", "job_id": job_id, "state": outcome}
    return error(409, f"job {job_id} is already {outcome}", state=outcome)
