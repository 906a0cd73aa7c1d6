"""What the API needs from a job queue, whatever implements it."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from ..events import JobEvent

from ..jobstatus import JobStatus


class QueueFull(Exception):
    """The queue holds its configured maximum; the client should retry later (503)."""


class BackendUnavailable(Exception):
    """The job could not be recorded durably (disk full, broker down); nothing was queued (503)."""


@dataclass
class FinalJob:
    """A finished job as handed out exactly once: its status and the bytes of each image."""
    status: JobStatus
    images: list[bytes | None]  # None where an image file could no longer be read


@dataclass
class QueueEntry:
    job_id: str
    state: str
    current_phase: str
    progress: float
    queue_position: int | None = None
    kind: str = "txt2img"


class JobBackend(ABC):
    """Submit, observe, cancel and collect jobs. Methods are called from the event loop's
    threadpool or directly (``status``/``position`` must be cheap: polls call them often)."""

    # Set by the app (main.py): a final job -> its final GET /queue/{id} JSON. The event
    # stream's final event and the webhooks carry exactly that.
    final_view: Callable[[str, FinalJob], dict] | None = None

    @abstractmethod
    def start(self) -> None:
        """Recover what was queued before a restart and start accepting jobs."""

    @abstractmethod
    def stop(self) -> None:
        """Stop; a running job goes back to the queue (not counted as a failed attempt)."""

    @abstractmethod
    def submit(self, kind: str, payload: dict) -> str:
        """Record the job durably and queue it; returns its id.
        Raises QueueFull or BackendUnavailable (then nothing was queued)."""

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
        held. A backend across processes (Celery) keeps the log where all processes see it
        (e.g. a Redis stream per job) and wakes listeners from there.
        """
        raise NotImplementedError(f"{type(self).__name__} has no event feed")

    def webhook_deliveries(self) -> list[dict]:
        """Webhook deliveries, pending and recently finished (``GET /queue`` lists them)."""
        return []
