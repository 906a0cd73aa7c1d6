"""The one job service: every dialect (native routes, `/sdapi`, and any later one) submits,
watches, cancels and collects jobs here, with typed requests, and translates only its wire
types. Nothing here knows HTTP: errors are :class:`diffusionapi.errors.ServiceError`s that each
dialect renders in its own shape.

It is also the one place where keys are kept apart (docs/tenants.md): every call takes the
``Caller`` (auth/caller.py; None = internal, with an admin's view). A user's call about another
key's job takes the same path as one about an unknown job -- an in-memory owner look-up first,
then the answer of an unknown job -- so the two cannot be told apart. Per-key limits are
checked before anything is queued (jobs/quotas.py).

submit = resolve once (names -> files, limits, images checked, seed drawn) -> the job record
(``ResolvedJob.payload``: the request as understood) -> the backend makes it durable and queues
it. The worker builds what runs from that record (jobs/runner.py).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Literal

from ..auth.caller import Caller
from ..errors import (IDEMPOTENCY_HEADER, BackendUnavailable, Conflict, IdempotencyConflict, NotFound, QueueFull,
                      RequestError, ServiceError)
from . import observe
from ..schemas import EditRequest, Img2ImgRequest, Txt2ImgRequest, UpscaleRequest
from .backends.base import JobBackend, JobOwner, QueueEntry
from .events import JobEvent
from .quotas import job_cost
from .resolve import ResolvedJob, pick_model, resolve_edit, resolve_img2img, resolve_txt2img, resolve_upscale
from .states import FINAL_STATES
from .status import FinalJob, JobStatus
from .webhooks import check_webhook

JobKind = Literal["txt2img", "img2img", "edit", "upscale"]
NativeRequest = Txt2ImgRequest | Img2ImgRequest | EditRequest | UpscaleRequest
REQUEST_TYPES: dict[str, type] = {"txt2img": Txt2ImgRequest, "img2img": Img2ImgRequest, "edit": EditRequest,
                                  "upscale": UpscaleRequest}


@dataclass
class Submitted:
    job_id: str
    job: ResolvedJob  # what was resolved: the dialects answer from it (names, seed) without re-parsing


MAX_IDEMPOTENCY_KEY = 255


def check_idempotency_key(key: str) -> None:
    if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise ServiceError(f"{IDEMPOTENCY_HEADER}: 1 to {MAX_IDEMPOTENCY_KEY} printable characters", status=400)


def request_fingerprint(kind: str, request: NativeRequest) -> str:
    """What a keyed submit is compared by: the request as the dialect translated it (before any
    random seed is drawn, so a retry of the same request matches)."""
    canonical = json.dumps({"kind": kind, "request": request.model_dump(mode="json")}, sort_keys=True,
                           separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def valid_job_id(job_id: str) -> bool:
    try:
        return str(uuid.UUID(job_id)) == job_id
    except ValueError:
        return False


PRIORITY_RANGE = (-10, 10)  # a request's `priority` (schemas.py); capped by the key's max_priority


class JobService:
    def __init__(self, backend: JobBackend, registry, settings):
        self.backend, self.registry, self.settings = backend, registry, settings
        self._submit_locks: dict[str | None, threading.Lock] = {}  # per key: limits checked and charged as one
        self._locks_lock = threading.Lock()

    # ------------------------------------------------------------------ isolation
    def _sees(self, job_id: str, caller: Caller | None) -> bool:
        """Whether the job exists for ``caller``: False for an invalid id, another key's job and an
        unknown job alike (admins and internal calls: any valid id; the backend says the rest)."""
        if not valid_job_id(job_id):
            return False
        if caller is None or caller.is_admin:
            return True
        return caller.may_see(self.backend.owner(job_id))

    def _lock_for(self, name: str | None) -> threading.Lock:
        with self._locks_lock:
            return self._submit_locks.setdefault(name, threading.Lock())

    # ------------------------------------------------------------------ submit
    def resolve(self, kind: JobKind, request: NativeRequest) -> ResolvedJob:
        """What would run (a RequestError names the field); nothing is queued."""
        if kind == "upscale":
            return resolve_upscale(request, self.registry, self.settings)
        resolver = {"img2img": resolve_img2img, "edit": resolve_edit}.get(kind, resolve_txt2img)
        return resolver(request, self.registry, self.settings)

    def edits(self, model: str | None) -> bool:
        """Whether the model a request names (None: the default one) is an instruction-editing
        model: a dialect whose img2img means "edit" on such models (A1111/Forge's) asks this.
        An unknown name is False (the submit then names the problem)."""
        from ..families import BY_ID
        from ..registry import UnknownName

        try:
            entry = pick_model(model, self.registry, self.settings)
        except UnknownName:
            return False
        family = BY_ID.get(str(entry.family))
        return family is not None and family.edits

    def submit(self, kind: JobKind, request: NativeRequest, caller: Caller | None = None,
               idempotency_key: str | None = None) -> Submitted:
        """Resolve, check the caller's limits, record durably, queue. Raises RequestError (4xx),
        RateLimited (429), QueueFull or BackendUnavailable (503): then nothing was queued or counted.

        ``idempotency_key`` (the client's Idempotency-Key header, #32): the same key from the same
        caller within ``settings.idempotency_window_sec`` gives the first submit's job id and
        queues nothing (JobBackend.submit keeps the key durably, with the job)."""
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)
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
        caller = caller or Caller()
        priority = max(PRIORITY_RANGE[0], min(int(getattr(request, "priority", 0) or 0), caller.max_priority))
        owner = JobOwner(caller.name, priority, caller.share, caller.limits.max_queued)
        fingerprint = request_fingerprint(kind, request) if idempotency_key is not None else None
        ledger = self.backend.ledger
        if ledger is None or caller.name is None:
            prior = self._keyed(caller.name, idempotency_key, fingerprint)
            return Submitted(prior or self._queue(job, owner, idempotency_key, fingerprint), job)
        images, pixel_steps = job_cost(job.kind, job.plan)
        with self._lock_for(caller.name):  # check, queue, count: no concurrent submit slips between
            prior = self._keyed(caller.name, idempotency_key, fingerprint)
            if prior is not None:  # a retry of a submit that was made: its job, not checked or counted again
                return Submitted(prior, job)
            ledger.check_submit(caller, images, pixel_steps, self.backend.active_count(caller.name))
            job_id = self._queue(job, owner, idempotency_key, fingerprint)
            ledger.charge_submit(caller, images, pixel_steps)
        return Submitted(job_id, job)

    def _keyed(self, owner: str | None, idempotency_key: str | None, fingerprint: str | None) -> str | None:
        """The job an earlier submit with this key made, if any; IdempotencyConflict (422) when that
        submit was another request. (Two submits with one key at once on different API nodes both
        pass here; the backend's submit then gives the second the first one's job.)"""
        if idempotency_key is None:
            return None
        prior = self.backend.keyed_job(owner, idempotency_key)
        if prior is None:
            return None
        job_id, prior_fingerprint = prior
        if prior_fingerprint is not None and prior_fingerprint != fingerprint:
            raise IdempotencyConflict(job_id)
        return job_id

    def _queue(self, job: ResolvedJob, owner: JobOwner, idempotency_key: str | None = None,
               fingerprint: str | None = None) -> str:
        # An ownerless job goes in as before keys existed: a backend (or test double) that knows
        # nothing of owners still serves an open service.
        return self.record(job.kind, job.payload, None if owner == JobOwner() else owner, idempotency_key,
                           fingerprint)

    def record(self, kind: str, payload: dict, owner: JobOwner | None = None,
               idempotency_key: str | None = None, fingerprint: str | None = None) -> str:
        """Make a resolved job (or a model install, api/models_admin.py) durable and queue it."""
        try:
            if idempotency_key is not None:  # the key is per owner (JobBackend.submit)
                job_id = self.backend.submit(kind, payload, owner, idempotency_key=idempotency_key,
                                             fingerprint=fingerprint)
            else:
                job_id = (self.backend.submit(kind, payload) if owner is None
                          else self.backend.submit(kind, payload, owner))
        except (QueueFull, BackendUnavailable) as e:
            observe.refused(kind, e.status, e.message)
            raise
        observe.submitted(job_id, kind, payload)
        return job_id

    # ------------------------------------------------------------------ observe
    def status(self, job_id: str, caller: Caller | None = None) -> JobStatus | None:
        return self.backend.status(job_id) if self._sees(job_id, caller) else None

    def position(self, job_id: str, caller: Caller | None = None) -> int | None:
        return self.backend.position(job_id) if self._sees(job_id, caller) else None

    def take_final(self, job_id: str, caller: Caller | None = None) -> FinalJob | None:
        """A final job, handed out once (reads image files: call off the event loop)."""
        return self.backend.take_final(job_id) if self._sees(job_id, caller) else None

    async def wait_final(self, job_id: str, timeout: float, caller: Caller | None = None) -> None:
        if self._sees(job_id, caller):
            await self.backend.wait_final(job_id, timeout)

    async def events(self, job_id: str, after_id: str | None = None,
                     caller: Caller | None = None) -> AsyncIterator[JobEvent] | None:
        if not self._sees(job_id, caller):
            return None
        return await self.backend.events(job_id, after_id)

    def listing(self, caller: Caller | None = None) -> list[QueueEntry]:
        """Every job for admins; a user's own jobs only (``others_count`` says how many more there are)."""
        entries = self.backend.listing()
        if caller is None or caller.is_admin:
            return entries
        return [e for e in entries if caller.may_see(e.owner)]

    def others_count(self, caller: Caller | None = None) -> int:
        """How many jobs not yet collected belong to other keys (0 for admins: they see them all)."""
        if caller is None or caller.is_admin:
            return 0
        return sum(1 for e in self.backend.listing() if not caller.may_see(e.owner))

    def pending_count(self) -> int:
        return sum(1 for e in self.backend.listing() if e.state not in FINAL_STATES)

    def webhook_deliveries(self, caller: Caller | None = None) -> list[dict]:
        out = self.backend.webhook_deliveries()
        if caller is None or caller.is_admin:
            return out
        return [d for d in out if caller.may_see(self.backend.owner(d.get("job_id", "")))]

    def current_job(self, caller: Caller | None = None) -> str | None:
        """The job running now, when ``caller`` may see it."""
        job_id = self.backend.current_job()
        return job_id if job_id is not None and self._sees(job_id, caller) else None

    def usage(self, caller: Caller | None = None, key: str | None = None) -> dict:
        """GET /usage: {key: {day: {model: {jobs, images, steps, gpu_seconds}}}}. A user gets its
        own key's; an admin any key's (``key``) or every key's."""
        ledger = self.backend.ledger
        if caller is not None and not caller.is_admin:
            if key not in (None, caller.name):
                raise NotFound(f"no key {key!r}")  # another key's usage is not there for a user
            key = caller.name
        return ledger.usage(key) if ledger is not None else {}

    def expired(self, job_id: str) -> str | None:
        """Why retention forgot this unread job (GET /queue/{id} answers 410), else None."""
        return self.backend.expired(job_id) if valid_job_id(job_id) else None

    def shared_blobs(self):
        """The backend's store of short-lived bytes every API node can read (None: one node)."""
        return self.backend.shared_blobs()

    def readiness(self) -> dict[str, str | None]:
        return self.backend.readiness()

    # ------------------------------------------------------------------ cancel
    def cancel(self, job_id: str, caller: Caller | None = None) -> str:
        """'cancelled' (was queued) or 'cancelling' (stops at the next model evaluation).
        Raises NotFound (also for another key's job), or Conflict when the job is already final."""
        sees = self._sees(job_id, caller)
        if sees:
            observe.cancel_requested(job_id)  # before: a queued job's ``cancelled`` record follows it
        outcome = self.backend.cancel(job_id) if sees else None
        if outcome is None:
            raise NotFound(f"no job {job_id!r}")
        if outcome not in ("cancelled", "cancelling"):
            raise Conflict(f"job {job_id} is already {outcome}", state=outcome)
        return outcome

    async def wait_and_take(self, job_id: str, poll_sec: float, gone) -> FinalJob | None:
        # The dialect's call submitted this job itself: the job is the caller's, no check here.
        """Block until the job is final and take it (A1111-style calls). ``gone()`` (async) says
        the client left: then the job is cancelled, its final answer discarded when it comes, and
        None returned."""
        while True:
            await self.wait_final(job_id, poll_sec)
            st = self.status(job_id)
            if st is None or st.is_final:
                return await asyncio.to_thread(self.take_final, job_id)
            if await gone():
                await self.abandon(job_id)
                return None

    async def abandon(self, job_id: str) -> None:
        """Nobody will collect this job (its client left): cancel it, and discard its final
        answer when it comes."""
        try:
            self.cancel(job_id)
        except (NotFound, Conflict):
            pass
        task = asyncio.get_running_loop().create_task(self._discard(job_id))
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def _discard(self, job_id: str, wait_sec: float = 600) -> None:
        """Nobody will read this final answer: take it once the job has stopped."""
        await self.wait_final(job_id, wait_sec)
        await asyncio.to_thread(self.take_final, job_id)


_background: set = set()  # keeps the discard tasks referenced until they finish
