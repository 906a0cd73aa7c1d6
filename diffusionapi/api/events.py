"""Live progress routes: the job's event stream (SSE) and its latest preview image."""
from __future__ import annotations

import base64
import json

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from .jobs import caller_of, error, valid_job_id

router = APIRouter()

PING_SEC = 15  # a comment line now and then keeps proxies from closing an idle stream


@router.get("/queue/{job_id}/events", response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "events: queued, started, progress, preview, then done|error|cancelled"},
                       404: {"description": "unknown job, or its final result was already read"}})
async def job_events(job_id: str, request: Request,
                     last_event_id: str | None = Header(None, alias="Last-Event-ID")):
    if not valid_job_id(job_id):
        return error(404, f"no job {job_id!r} (job ids are UUIDs)")
    try:
        feed = await request.app.state.jobs.events(job_id, last_event_id, caller_of(request))
    except NotImplementedError as e:
        return error(501, str(e))
    if feed is None:
        return error(404, f"no job {job_id!r}: unknown, or its final result was already read")

    async def stream():
        async for ev in feed:
            yield ServerSentEvent(data=json.dumps(ev.data), event=ev.type, id=ev.id)

    # A client that goes away cancels stream(); the feed's listener is dropped with it.
    return EventSourceResponse(stream(), ping=PING_SEC, headers={"Cache-Control": "no-store"})


@router.get("/queue/{job_id}/preview", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}, "description": "the latest preview"},
                       404: {"description": "unknown job, or no preview (yet)"}})
async def job_preview(job_id: str, request: Request):
    if not valid_job_id(job_id):
        return error(404, f"no job {job_id!r} (job ids are UUIDs)")
    st = request.app.state.jobs.status(job_id, caller_of(request))
    if st is None:
        return error(404, f"no job {job_id!r}")
    preview = getattr(st, "preview", None)
    if not preview:
        return error(404, f"job {job_id} has no preview (yet): previews are sent while it runs, "
                           "when the request asks for them (`preview`)")
    return Response(base64.b64decode(preview), media_type="image/jpeg",
                    headers={"X-Preview-Step": str(getattr(st, "preview_step", "")), "Cache-Control": "no-store"})
