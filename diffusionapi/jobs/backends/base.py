"""What the API needs from a job queue, whatever implements it."""
from __future__ import annotations

import asyncio
import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Protocol

from .. import views
from ..events import JobEvent
from ..states import FINAL_STATES, progress_event
from ..status import FinalJob, JobStatus


from ...errors import BackendUnavailable, QueueFull  # noqa: E402,F401 - what submit raises (503s)


def idempotency_hash(owner: str | None, idempotency_key: str) -> str:
    """One submit's Idempotency-Key, per owner (another owner's same key is another key): a hash,
    so keys and credentials are never stored as such. Both backends keep their keys by it."""
    return hashlib.sha256(f"{owner or ''}\0{idempotency_key}".encode()).hexdigest()


@dataclass
class QueueEntry:
    job_id: str
    state: str
    current_phase: str
    progress: float
    queue_position: int | None = None
    kind: str = "txt2img"
    owner: str | None = None  # the key's name (None: submitted with no named key)


@dataclass(frozen=True)
class JobOwner:
    """Whose job it is and how it queues (docs/tenants.md): the key's name, the job's priority
    (already capped to the key's maximum), the key's share of turns."""
    name: str | None = None
    priority: int = 0
    share: float = 1.0
    max_queued: int | None = None  # the key's limit; a backend may check it atomically (Celery)


class SharedBlobs(Protocol):
    """Bytes under a name for ``ttl`` seconds, readable from every API node."""

    def put(self, name: str, data: bytes, ttl: float) -> None: ...

    def get(self, name: str) -> bytes | None: ...


class JobBackend(ABC):
    """Submit, observe, cancel and collect jobs. Methods are called from the event loop's
    threadpool or directly (``status``/``position`` must be cheap: polls call them often)."""

    # A final job -> its final GET /queue/{id} JSON: the event stream's final event and the
    # webhooks carry exactly that (a test may put a simpler one on an instance).
    final_view: Callable[[str, FinalJob], dict] = staticmethod(views.final_view)
    delivers_webhooks = False  # a backend that does not refuses requests with a ``webhook`` (422)
    # Exceptions (other than the ServiceErrors) that mean "a part this backend needs is unreachable
    # now", not a bug: any route that meets one answers 503 + Retry-After (main.py), never 500.
    unavailable_errors: tuple[type[BaseException], ...] = ()

    @abstractmethod
    def start(self) -> None:
        """Recover what was queued before a restart and start accepting jobs."""

    @abstractmethod
    def stop(self) -> None:
        """Stop; a running job goes back to the queue (not counted as a failed attempt)."""

    @abstractmethod
    def submit(self, kind: str, payload: dict, owner: JobOwner | None = None,
               idempotency_key: str | None = None, fingerprint: str | None = None) -> str:
        """Record the job durably (with its owner) and queue it; returns its id.
        Raises QueueFull or BackendUnavailable (then nothing was queued).

        ``idempotency_key`` (the client's Idempotency-Key, per owner name: another key's is
        another key): a submit with a key that the same owner used within
        ``settings.idempotency_window_sec`` returns the first submit's job id and queues nothing,
        whatever happened in between (the first submit's node died, the backend restarted, the
        job finished and was collected). The key is recorded durably with the job, in one step,
        with ``fingerprint`` (the request's, jobs/service.py): a later submit with the key and
        another fingerprint raises IdempotencyConflict."""

    def keyed_job(self, owner: str | None, idempotency_key: str) -> tuple[str, str | None] | None:
        """(job id, its request's fingerprint or None) for a key the owner used within the window;
        None when unused. The job service asks before the caller's limits: a retry of a submit
        that was made is answered with its job, never refused (429) or counted again."""
        return None

    def owner(self, job_id: str) -> str | None:
        """The name of the key that submitted the job; None when unknown or submitted with no
        named key (only admins see those). Cheap and the same path for both: isolation answers
        another key's job exactly as an unknown one (jobs/service.py)."""
        return None

    def active_count(self, owner: str | None) -> int:
        """The owner's jobs waiting or running (the ``max_queued`` limit)."""
        return sum(1 for e in self.listing() if e.owner == owner and e.state not in FINAL_STATES)

    ledger = None  # the per-key counts and usage (jobs/quotas.py); set by backends that keep them

    @abstractmethod
    def status(self, job_id: str) -> JobStatus | None:
        """The job's current status, without consuming a final one; None if unknown."""

    @abstractmethod
    def take_final(self, job_id: str) -> FinalJob | None:
        """A final job's status and images, handed out once: later calls (from any reader,
        concurrent or not) get None and the job is forgotten."""

    @abstractmethod
    def position(self, job_id: str) -> int | None:
        """0 while running, 1, 2, ... while waiting; None when neither."""

    @abstractmethod
    def cancel(self, job_id: str) -> str | None:
        """'cancelled' (was queued: done at once), 'cancelling' (running: stops at the next
        model evaluation), the final state it already has, or None if unknown."""

    @abstractmethod
    def listing(self) -> list[QueueEntry]:
        """Every job not yet collected: running first, then in queue order, then finished ones."""

    @abstractmethod
    async def wait_final(self, job_id: str, timeout: float) -> None:
        """Return when the job is final (or unknown), or after ``timeout`` seconds."""

    @abstractmethod
    def current_job(self) -> str | None:
        """The id of the job running now (A1111's /progress reports the one current job)."""

    # ------------------------------------------------------------------ live progress (#16)
    async def events(self, job_id: str, after_id: str | None = None) -> AsyncIterator[JobEvent] | None:
        """The job's event feed for ``GET /queue/{id}/events``; None when the job is unknown (404).

        The iterator yields ``JobEvent(id, type, data)``: ``queued`` {position} (again when it
        changes), ``started`` {}, ``progress`` {progress, phase, step, total}, ``preview``
        {image (base64 JPEG), step, total}, and last exactly one ``done`` | ``error`` |
        ``cancelled`` whose data is ``final_view(job_id, take_final(job_id))``: delivering it
        consumes the job as a final poll does. Ids are strings that order the events of one
        job; with ``after_id`` (the client's Last-Event-ID) only later events come, but the
        newest state events and the final one are never skipped: an id the backend does not
        know (e.g. from before a restart) replays from the start. ``progress``, ``preview`` and
        ``queued`` are state events: a backend may keep only the newest of each. Several
        iterators may follow one job; one that is closed early (client gone) must free what it
        held. This default polls ``status`` (``polled_events``), for a backend with no push feed of
        its own; the embedded backend follows its in-process log, the Celery backend each job's
        Redis stream.
        """
        return await polled_events(self, job_id)

    def webhook_deliveries(self) -> list[dict]:
        """Webhook deliveries, pending and recently finished (``GET /queue`` lists them)."""
        return []

    # ------------------------------------------------------------------ operating it (#27)
    def queue_stats(self) -> dict | None:
        """``{"waiting", "running", "oldest_wait_sec"}`` for the metrics (read at each scrape:
        cheap); None when this backend cannot tell."""
        return None

    def expired(self, job_id: str) -> str | None:
        """Why an unknown ``job_id`` is gone when retention removed it (``GET /queue/{id}`` then
        answers 410 with this), else None."""
        return None

    def shared_blobs(self) -> "SharedBlobs | None":
        """Where API nodes keep short-lived bytes that any node must serve (the OpenAI dialect's
        ``url`` results); None when there is one node (the embedded backend: files do)."""
        return None

    def readiness(self) -> dict[str, str | None]:
        """``/readyz``'s backend checks: name -> None when fine, else why not (cheap: probes
        come every few seconds)."""
        return {}


POLL_SEC = 1.0  # how often a polled feed reads a job's status


async def polled_events(backend: JobBackend, job_id: str) -> AsyncIterator[JobEvent] | None:
    """An event feed made by polling ``status`` (the default ``events``): for a backend with no
    push feed of its own. It has the same events and final event; ids are only this
    feed's own, so a reconnect (any ``Last-Event-ID``) replays from the current state."""
    if await asyncio.to_thread(backend.status, job_id) is None:
        return None

    async def feed():
        n = 0
        seen: dict[str, object] = {}

        def event(kind: str, data: dict, key: object = None) -> JobEvent | None:
            nonlocal n
            if kind in seen and seen[kind] == key:
                return None
            seen[kind] = key
            n += 1
            return JobEvent(f"poll-{n:08d}", kind, data)

        while True:
            st = await asyncio.to_thread(backend.status, job_id)
            if st is None:
                return
            out: list[JobEvent | None] = []
            if st.is_final:
                final = await asyncio.to_thread(backend.take_final, job_id)
                if final is None:
                    return
                yield JobEvent(f"poll-{n + 1:08d}", final.status.state, backend.final_view(job_id, final))
                return
            if st.state == "queued":
                position = await asyncio.to_thread(backend.position, job_id)
                out.append(event("queued", {"position": position}, position))
            else:
                out.append(event("started", {}))
                out.append(event("progress", progress_event(st.progress, st.current_phase),
                                 (st.progress, st.current_phase)))
                if st.preview:
                    out.append(event("preview", {"image": st.preview, "step": st.preview_step, "total": None},
                                     st.preview_step))
            for ev in out:
                if ev is not None:
                    yield ev
            await backend.wait_final(job_id, POLL_SEC)

    return feed()


class FinalWaiters:
    """Long-polls (GET /queue/{id}?wait=N) waiting on the event loop for jobs to become final.
    ``bind`` once on the loop; ``notify`` from any thread when a job became final."""

    def __init__(self):
        self._loop = None
        self._waiters: dict[str, list] = {}

    def bind(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

    def waiting_for(self, job_id: str) -> bool:
        return job_id in self._waiters

    def notify(self, job_id: str) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._wake, job_id)

    def _wake(self, job_id: str) -> None:
        for fut in self._waiters.pop(job_id, []):
            if not fut.done():
                fut.set_result(None)

    async def wait(self, job_id: str, timeout: float, is_final) -> None:
        """Until ``is_final()`` (checked again after registering: it may have finished meanwhile),
        a notify for the job, or ``timeout`` seconds."""
        if timeout <= 0 or is_final():
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(fut)
        if is_final():
            self._wake(job_id)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pass
        finally:  # timed out or the client went away: forget this waiter
            waiters = self._waiters.get(job_id, [])
            if fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    self._waiters.pop(job_id, None)
