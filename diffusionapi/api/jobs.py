"""Native routes that submit, watch, cancel and collect jobs. Thin: they translate the native
wire types to and from the job service (jobs/service.py), which does the work; a ServiceError
raised there becomes the native error body in one place (main.py's exception handler)."""
from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from ..auth.caller import OPEN, Caller
from ..errors import NotFound, ServiceError, error_body
from ..errors import IDEMPOTENCY_HEADER
from ..jobs.service import JobService, valid_job_id
from ..jobs.views import final_response, status_response
from ..schemas import (EditRequest, ErrorResponse, Img2ImgRequest, QueueListEntry, QueueListResponse, QueueStatusResponse,
                       Txt2ImgRequest, Txt2ImgResponse, UpscaleRequest)

router = APIRouter()

_ERRORS = {404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}
_SUBMIT_ERRORS = {**_ERRORS, 503: {"model": ErrorResponse}, 413: {"model": ErrorResponse}}


def job_service(request: Request) -> JobService:
    return request.app.state.jobs


def caller_of(request: Request) -> Caller:
    """Who calls (set by the guard middleware from the credentials, main.py)."""
    return request.scope.get("state", {}).get("caller", OPEN)


def error(status: int, message: str, headers: dict | None = None, **extra):
    """A native error answer for the few cases a route decides itself."""
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(message, **extra), status_code=status, headers=headers)


def idempotency_key_of(request: Request) -> str | None:
    """The submit's Idempotency-Key header (#32): every dialect's submit passes it to the job
    service, with the caller (the same key from another caller is another key)."""
    return request.headers.get(IDEMPOTENCY_HEADER)


def _submit(request: Request, kind: str, body) -> Txt2ImgResponse:
    submitted = job_service(request).submit(kind, body, caller_of(request), idempotency_key=idempotency_key_of(request))
    return Txt2ImgResponse(job_id=submitted.job_id, ignored_fields=sorted(body.model_extra or ()) or None)


@router.post("/txt2img", response_model=Txt2ImgResponse, response_model_exclude_none=True, responses=_SUBMIT_ERRORS)
def txt2img(body: Txt2ImgRequest, request: Request):
    return _submit(request, "txt2img", body)


@router.post("/img2img", response_model=Txt2ImgResponse, response_model_exclude_none=True, responses=_SUBMIT_ERRORS)
def img2img(body: Img2ImgRequest, request: Request):
    """txt2img from an init image; with ``mask``, inpainting. Images are decoded and checked
    before the job is recorded."""
    return _submit(request, "img2img", body)


@router.post("/edit", response_model=Txt2ImgResponse, response_model_exclude_none=True, responses=_SUBMIT_ERRORS)
def edit(body: EditRequest, request: Request):
    """Instruction editing: change ``reference_images`` (one or several) as the prompt says, on an
    editing model (flux1-kontext). Queued like any job: /queue/{id}, events, previews, webhooks."""
    return _submit(request, "edit", body)


@router.post("/upscale", response_model=Txt2ImgResponse, response_model_exclude_none=True, responses=_SUBMIT_ERRORS)
def upscale(body: UpscaleRequest, request: Request):
    """Upscale one image (queued like any job): an upscaler file, or "Lanczos" / "Nearest"."""
    return _submit(request, "upscale", body)


@router.get("/queue", response_model=QueueListResponse)
async def queue_list(request: Request):
    jobs, caller = job_service(request), caller_of(request)
    entries = await run_in_threadpool(jobs.listing, caller)
    return QueueListResponse(jobs=[QueueListEntry(job_id=e.job_id, state=e.state, current_phase=e.current_phase,
                                                  progress=e.progress, queue_position=e.queue_position,
                                                  owner=e.owner)
                                   for e in entries],
                             webhooks=await run_in_threadpool(jobs.webhook_deliveries, caller),
                             others=None if caller.is_admin else await run_in_threadpool(jobs.others_count, caller))


@router.get("/queue/{job_id}", response_model=QueueStatusResponse, response_model_exclude_unset=True,
            responses={**_ERRORS, 410: {"model": ErrorResponse}})
async def queue_status(job_id: str, request: Request,
                       wait: float = Query(0, ge=0, le=60, description="long-poll: seconds to wait for the job to finish")):
    # async + one small file read: polling must never wait for a threadpool slot. Only the
    # final read (image files, base64) goes to a thread.
    if not valid_job_id(job_id):
        raise NotFound(f"no job {job_id!r} (job ids are UUIDs)")
    jobs, caller = job_service(request), caller_of(request)
    if wait:
        await jobs.wait_final(job_id, wait, caller)
    st = jobs.status(job_id, caller)
    if st is not None and not st.is_final:
        return status_response(job_id, st, jobs.position(job_id, caller))
    final = await run_in_threadpool(jobs.take_final, job_id, caller) if st is not None else None
    if final is None:
        gone = jobs.expired(job_id)  # removed unread by retention (retention.py)
        if gone:
            raise ServiceError(f"job {job_id} expired before its result was read: {gone}", status=410)
        raise NotFound(f"no job {job_id!r}: unknown, or its final result was already read")
    return await run_in_threadpool(final_response, job_id, final)


@router.delete("/queue/{job_id}", responses={**_ERRORS, 409: {"model": ErrorResponse}})
async def queue_cancel(job_id: str, request: Request):
    if not valid_job_id(job_id):
        raise NotFound(f"no job {job_id!r} (job ids are UUIDs)")
    outcome = job_service(request).cancel(job_id, caller_of(request))
    return {"status": "success", "job_id": job_id, "state": outcome}


@router.get("/usage", responses={404: {"model": ErrorResponse}})
async def usage(request: Request, key: str | None = Query(None, description="admins: one key's usage (default: all)")):
    """What keys used, by UTC day and model: jobs, images, denoising steps, GPU seconds
    (docs/tenants.md). A user gets its own key's; an admin every key's, or ``key``'s."""
    return {"status": "success",
            "usage": await run_in_threadpool(job_service(request).usage, caller_of(request), key)}
