"""The `/sdapi` side of the job backend (`app.state.jobs`): A1111 calls block until their job
is final, but the job goes through the same queue, in order, as native jobs do.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi.concurrency import run_in_threadpool

POLL_SEC = 0.5  # how often a waiting call checks whether its client is still there
DISCARD_WAIT_SEC = 600


@dataclass
class FinalImage:
    data: bytes
    seed: int | None
    infotext: str | None


@dataclass
class Final:
    state: str
    error: str | None
    payload: dict
    images: list[FinalImage] = field(default_factory=list)


def take_final(jobs, job_id: str) -> Final | None:
    """The job's final record and image bytes, handed out once (reads files: call off the loop)."""
    fj = jobs.take_final(job_id)
    if fj is None:
        return None
    st = fj.status
    records = st.images or []
    images = []
    for i, data in enumerate(fj.images):
        if data is None:  # the file could no longer be read
            continue
        rec = records[i] if i < len(records) else None
        images.append(FinalImage(data, rec.seed if rec else st.seed, rec.infotext if rec else st.infotext))
    return Final(st.state, st.error, dict(st.payload or {}), images)


async def wait_for(request, jobs, job_id: str) -> Final | None:
    """Wait until the job is final and take it; a client that goes away cancels its job (nobody is
    left to receive the image). None when the client left."""
    while True:
        await jobs.wait_final(job_id, POLL_SEC)
        st = jobs.status(job_id)
        if st is None or st.is_final:
            return await run_in_threadpool(take_final, jobs, job_id)
        if await request.is_disconnected():
            jobs.cancel(job_id)
            # Nobody will read the final record: take it once the job has stopped.
            task = asyncio.get_running_loop().create_task(_discard(jobs, job_id))
            _background.add(task)
            task.add_done_callback(_background.discard)
            return None


_background: set = set()  # keeps the discard tasks referenced until they finish


async def _discard(jobs, job_id: str) -> None:
    await jobs.wait_final(job_id, DISCARD_WAIT_SEC)
    await run_in_threadpool(take_final, jobs, job_id)
