"""What the API needs from a job queue, whatever implements it."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

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
