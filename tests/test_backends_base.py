"""The default event feed of a backend (``JobBackend.events`` polls ``status``): what a backend
without a push feed of its own (Celery) streams on ``GET /queue/{id}/events``."""
from __future__ import annotations

import asyncio

from diffusionapi.jobs.backends.base import FinalJob, JobBackend
from diffusionapi.jobs.status import JobStatus


class ScriptedBackend(JobBackend):
    """A backend whose job goes through the given statuses, one per poll (the last one stays)."""

    def __init__(self, statuses: list[JobStatus], positions: list[int | None]):
        self.statuses, self.positions = list(statuses), list(positions)
        self.taken = 0

    def _now(self) -> JobStatus:
        return self.statuses[0]

    async def wait_final(self, job_id, timeout):  # one poll = one step of the script
        if len(self.statuses) > 1:
            self.statuses.pop(0)
            if len(self.positions) > 1:
                self.positions.pop(0)

    def status(self, job_id):
        return self._now() if job_id == "known" else None

    def position(self, job_id):
        return self.positions[0]

    def take_final(self, job_id):
        self.taken += 1
        return FinalJob(self._now(), [b"img"])

    def start(self): ...
    def stop(self): ...
    def submit(self, kind, payload): ...
    def cancel(self, job_id): ...
    def listing(self): return []
    def current_job(self): return None


def _collect(backend: JobBackend, job_id: str):
    async def run():
        feed = await backend.events(job_id)
        if feed is None:
            return None
        return [ev async for ev in feed]
    return asyncio.run(asyncio.wait_for(run(), 10))


def test_unknown_job_has_no_feed():
    assert _collect(ScriptedBackend([JobStatus.queued()], [None]), "other") is None


def test_polled_feed_sends_changes_once_and_ends_with_the_final_view():
    running = JobStatus.processing("generation", 40.0)
    preview = running.model_copy(update={"preview": "AAAA", "preview_step": 2})
    done = JobStatus(state="done", current_phase="done", progress=100.0, seed=7)
    backend = ScriptedBackend([JobStatus.queued(), JobStatus.queued(), JobStatus.queued(), running, running,
                               preview, done], positions=[2, 2, 1, None])
    backend.final_view = lambda job_id, final: {"job_id": job_id, "seed": final.status.seed,
                                                "images": len(final.images)}
    events = _collect(backend, "known")
    assert [(e.type, e.data) for e in events] == [
        ("queued", {"position": 2}), ("queued", {"position": 1}),
        ("started", {}), ("progress", {"progress": 40.0, "phase": "generation", "step": None, "total": None}),
        ("preview", {"image": "AAAA", "step": 2, "total": None}),
        ("done", {"job_id": "known", "seed": 7, "images": 1})]
    assert [e.id for e in events] == sorted(e.id for e in events) and len({e.id for e in events}) == len(events)
    assert backend.taken == 1  # delivering the final event consumed the job, once
