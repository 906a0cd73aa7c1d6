"""The `/sdapi` side of the job backend (`app.state.jobs`): A1111 calls block until their job
is final, but the job goes through the same queue, in order, as native jobs do.
"""
from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field

FINAL = ("done", "error", "cancelled")
POLL_SEC = 0.5  # how often a waiting call checks whether its client is still there


@dataclass
class FinalImage:
    data: bytes
    seed: int | None
    infotext: str | None
    width: int | None
    height: int | None


@dataclass
class Final:
    state: str
    error: str | None
    payload: dict
    images: list[FinalImage] = field(default_factory=list)


def _get(obj, name, default=None):
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def peek(jobs, job_id: str):
    if hasattr(jobs, "take_final"):
        return jobs.status(job_id)
    return jobs.store.read_status(job_id)  # PRE-SEAMS


def current_job(jobs) -> str | None:
    if hasattr(jobs, "current_job"):
        return jobs.current_job()
    snap = jobs.queue.snapshot()  # PRE-SEAMS
    return snap[0][0] if snap and snap[0][1] == 0 else None


def take_final(jobs, job_id: str) -> Final | None:
    """The job's final record, read exactly once."""
    if not hasattr(jobs, "take_final"):  # PRE-SEAMS
        resp = jobs.status(job_id)
        if resp is None:
            return None
        imgs = [FinalImage(base64.b64decode(resp["image"]), resp.get("seed"), resp.get("infotext"),
                           resp.get("width"), resp.get("height"))] if resp.get("image") else []
        return Final(resp["state"], resp.get("error"), resp.get("payload") or {}, imgs)
    fj = jobs.take_final(job_id)
    if fj is None:
        return None
    st = _get(fj, "status", fj)
    datas = list(_get(fj, "images_bytes", None) or _get(fj, "images", None) or [])
    records = list(_get(st, "images", None) or [])
    images = []
    for i, data in enumerate(datas):
        rec = records[i] if i < len(records) else None
        images.append(FinalImage(data if isinstance(data, bytes) else base64.b64decode(data),
                                 _get(rec, "seed", _get(st, "seed")) if rec is not None else _get(st, "seed"),
                                 _get(rec, "infotext", _get(st, "infotext")) if rec is not None else _get(st, "infotext"),
                                 _get(rec, "width", _get(st, "width")) if rec is not None else _get(st, "width"),
                                 _get(rec, "height", _get(st, "height")) if rec is not None else _get(st, "height")))
    return Final(_get(st, "state"), _get(st, "error"), dict(_get(st, "payload") or {}), images)


async def wait_for(request, jobs, job_id: str) -> Final | None:
    """Wait until the job is final and take it; a client that goes away cancels its job (nobody is
    left to receive the image). None when the client left."""
    while True:
        await jobs.wait_final(job_id, POLL_SEC)
        st = peek(jobs, job_id)
        if st is None or _get(st, "state") in FINAL:
            return take_final(jobs, job_id)
        if await request.is_disconnected():
            jobs.cancel(job_id)
            # Nobody will read the final record: take it once the job has stopped.
            _background.add(task := asyncio.get_running_loop().create_task(_discard(jobs, job_id)))
            task.add_done_callback(_background.discard)
            return None


_background: set = set()  # keeps the discard tasks referenced until they finish
DISCARD_WAIT_SEC = 600


async def _discard(jobs, job_id: str) -> None:
    await jobs.wait_final(job_id, DISCARD_WAIT_SEC)
    take_final(jobs, job_id)
