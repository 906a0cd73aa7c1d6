"""The `/sdapi` side of the job service: A1111 calls block until their job is final, but the
job goes through the same queue, in order, as native jobs do.
"""
from __future__ import annotations

from dataclasses import dataclass, field


POLL_SEC = 0.5  # how often a waiting call checks whether its client is still there


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


def to_final(fj) -> Final:
    """A final job (jobs.status.FinalJob) as the A1111 answers need it."""
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
    fj = await jobs.wait_and_take(job_id, POLL_SEC, request.is_disconnected)
    return to_final(fj) if fj is not None else None
