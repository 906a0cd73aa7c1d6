"""The one job service: every dialect (native routes, `/sdapi`, and any later one) submits,
watches, cancels and collects jobs here, with typed requests, and translates only its wire
types. Nothing here knows HTTP: errors are :class:`diffusionapi.errors.ServiceError`s that each
dialect renders in its own shape.

submit = resolve once (names -> files, limits, images checked, seed drawn) -> the job record
(``ResolvedJob.payload``: the request as understood) -> the backend makes it durable and queues
it. The worker builds what runs from that record (jobs/runner.py).
"""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Literal

from ..errors import Conflict, NotFound, RequestError
from ..schemas import Img2ImgRequest, Txt2ImgRequest, UpscaleRequest
from .backends.base import JobBackend, QueueEntry
from .events import JobEvent
from .resolve import ResolvedJob, resolve_img2img, resolve_txt2img, resolve_upscale
from .states import FINAL_STATES
from .status import FinalJob, JobStatus
from .webhooks import check_webhook

JobKind = Literal["txt2img", "img2img", "upscale"]
NativeRequest = Txt2ImgRequest | Img2ImgRequest | UpscaleRequest
REQUEST_TYPES: dict[str, type] = {"txt2img": Txt2ImgRequest, "img2img": Img2ImgRequest, "upscale": UpscaleRequest}


@dataclass(frozen=True)
class Caller:
    """Who submits or asks: the API key's name where keys have names (None: anonymous / the one key)."""
    name: str | None = None


@dataclass
class Submitted:
    job_id: str
    job: ResolvedJob  # what was resolved: the dialects answer from it (names, seed) without re-parsing


def valid_job_id(job_id: str) -> bool:
    try:
        return str(uuid.UUID(job_id)) == job_id
    except ValueError:
        return False


class JobService:
    def __init__(self, backend: JobBackend, registry, settings):
        self.backend, self.registry, self.settings = backend, registry, settings

    # ------------------------------------------------------------------ submit
    def resolve(self, kind: JobKind, request: NativeRequest) -> ResolvedJob:
        """What would run (a RequestError names the field); nothing is queued."""
        if kind == "upscale":
            return resolve_upscale(request, self.registry, self.settings)
        resolver = resolve_img2img if kind == "img2img" else resolve_txt2img
        return resolver(request, self.registry, self.settings)

    def submit(self, kind: JobKind, request: NativeRequest, caller: Caller | None = None) -> Submitted:
        """Resolve, record durably, queue. Raises RequestError (4xx, nothing queued), QueueFull or
        BackendUnavailable (503, nothing queued)."""
        expected = REQUEST_TYPES.get(kind)
        if expected is None or not isinstance(request, expected):
            raise RequestError("kind", f"a {kind} job takes a {expected.__name__ if expected else '?'}")
        job = self.resolve(kind, request)
        webhook = job.echo.get("webhook")
        if webhook and not self.backend.delivers_webhooks:
            raise RequestError("webhook", f"the {self.settings.backend} queue backend does not deliver webhooks; "
                                          "poll GET /queue/{id} or follow GET /queue/{id}/events")
        refused = check_webhook(webhook, self.settings)
        if refused:
            raise RequestError("webhook.url", refused)
        return Submitted(self.backend.submit(job.kind, job.payload), job)

    # ------------------------------------------------------------------ observe
    def status(self, job_id: str) -> JobStatus | None:
        return self.backend.status(job_id) if valid_job_id(job_id) else None

    def position(self, job_id: str) -> int | None:
        return self.backend.position(job_id)

    def take_final(self, job_id: str) -> FinalJob | None:
        """A final job, handed out once (reads image files: call off the event loop)."""
        return self.backend.take_final(job_id) if valid_job_id(job_id) else None

    async def wait_final(self, job_id: str, timeout: float) -> None:
        if valid_job_id(job_id):
            await self.backend.wait_final(job_id, timeout)

    async def events(self, job_id: str, after_id: str | None = None) -> AsyncIterator[JobEvent] | None:
        if not valid_job_id(job_id):
            return None
        return await self.backend.events(job_id, after_id)

    def listing(self) -> list[QueueEntry]:
        return self.backend.listing()

    def pending_count(self) -> int:
        return sum(1 for e in self.backend.listing() if e.state not in FINAL_STATES)

    def webhook_deliveries(self) -> list[dict]:
        return self.backend.webhook_deliveries()

    def current_job(self) -> str | None:
        return self.backend.current_job()

    # ------------------------------------------------------------------ cancel
    def cancel(self, job_id: str) -> str:
        """'cancelled' (was queued) or 'cancelling' (stops at the next model evaluation).
        Raises NotFound, or Conflict when the job is already final."""
        outcome = self.backend.cancel(job_id) if valid_job_id(job_id) else None
        if outcome is None:
            raise NotFound(f"no job {job_id!r}")
        if outcome not in ("cancelled", "cancelling"):
            raise Conflict(f"job {job_id} is already {outcome}", state=outcome)
        return outcome

    async def wait_and_take(self, job_id: str, poll_sec: float, gone) -> FinalJob | None:
        """Block until the job is final and take it (A1111-style calls). ``gone()`` (async) says
        the client left: then the job is cancelled, its final answer discarded when it comes, and
        None returned."""
        while True:
            await self.wait_final(job_id, poll_sec)
            st = self.status(job_id)
            if st is None or st.is_final:
                return await asyncio.to_thread(self.take_final, job_id)
            if await gone():
                try:
                    self.cancel(job_id)
                except (NotFound, Conflict):
                    pass
                task = asyncio.get_running_loop().create_task(self._discard(job_id))
                _background.add(task)
                task.add_done_callback(_background.discard)
                return None

    async def _discard(self, job_id: str, wait_sec: float = 600) -> None:
        """Nobody will read this final answer: take it once the job has stopped."""
        await self.wait_final(job_id, wait_sec)
        await asyncio.to_thread(self.take_final, job_id)


_background: set = set()  # keeps the discard tasks referenced until they finish
