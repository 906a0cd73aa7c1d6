"""A job's ``GET /queue/{id}`` answer, built from its status: the one builder for the route, the
event stream's final event and the webhook bodies (which a cluster worker sends, so it lives
below the backends and the workers, not in ``api/``)."""
from __future__ import annotations

import base64

from .status import FinalJob, JobStatus
from ..schemas import ImageOut, QueueStatusResponse


def status_response(job_id: str, st: JobStatus, position: int | None = None) -> QueueStatusResponse:
    """The response of a job that is not final yet (or the head of a final one)."""
    resp = QueueStatusResponse(status="error" if st.state == "error" else "success", job_id=job_id,
                               progress=st.progress, current_phase=st.current_phase or st.state, state=st.state,
                               error=st.error)
    if position is not None:
        resp.queue_position = position
    if st.preview is not None:
        resp.preview, resp.preview_step = st.preview, st.preview_step
    return resp


def final_response(job_id: str, final: FinalJob) -> QueueStatusResponse:
    """A final job's response: the seed's fields; ``image`` = the first image, ``images`` when several."""
    st = final.status
    resp = status_response(job_id, st)
    if st.state != "done":
        resp.generation_time_sec = st.generation_time_sec
        return resp
    b64 = [base64.b64encode(data).decode() if data is not None else None for data in final.images]
    for field in ("payload", "output_path", "width", "height", "file_type", "jpeg_quality", "generation_time_sec",
                  "load_time_sec", "memory_before_mb", "memory_after_mb", "seed", "infotext", "warnings"):
        setattr(resp, field, getattr(st, field))
    resp.image = b64[0] if b64 else None
    if st.images and len(st.images) > 1:
        resp.images = [ImageOut(image=data, seed=r.seed, output_path=r.output_path, infotext=r.infotext,
                                width=r.width, height=r.height) for r, data in zip(st.images, b64)]
    return resp


def final_view(job_id: str, final: FinalJob) -> dict:
    """The final ``GET /queue/{id}`` JSON, as the stream's final event and webhooks carry it."""
    return final_response(job_id, final).model_dump(mode="json", exclude_unset=True)
