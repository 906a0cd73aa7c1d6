"""A job's lifecycle, written once: its states, the attempts cap, how an exception ends a job,
the shape of a progress event and how often progress is written.

Both backends (the embedded worker thread and Celery workers), the Redis Lua scripts (through
:func:`lua_prelude`), the event feeds and the webhooks take these facts from here. The
playground's JavaScript reads the final states from ``GET /queue``'s OpenAPI enum, not a copy.
"""
from __future__ import annotations

import logging
import time
from typing import Literal

QUEUED, PROCESSING, DONE, ERROR, CANCELLED = "queued", "processing", "done", "error", "cancelled"
JobState = Literal["queued", "processing", "done", "error", "cancelled"]
STATES: tuple[str, ...] = (QUEUED, PROCESSING, DONE, ERROR, CANCELLED)
FINAL_STATES: tuple[str, ...] = (DONE, ERROR, CANCELLED)
# Event kinds that describe a state: a feed keeps only the newest of each (a reconnecting
# listener gets the current state, never a backlog).
STATE_EVENTS: tuple[str, ...] = ("queued", "progress", "preview")

# What a webhook may subscribe to: each final state, and throttled progress.
WEBHOOK_EVENTS: tuple[str, ...] = FINAL_STATES + ("progress",)

# A job that keeps killing its worker (or the server) is not retried forever: the attempt after
# this many ends the job in ``error``. A graceful stop (shutdown) is not counted.
MAX_ATTEMPTS = 3

# Progress is written to the job's status at most this often (plus on every phase change and at
# a stage's last step): a write per tiny step would cost more than the step itself.
PROGRESS_WRITE_INTERVAL_SEC = 0.05

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """The job's cancel flag was seen (the engine raises it at the next model evaluation)."""


class JobFailed(Exception):
    """The job ends in ``error`` with this message (the user can act on it)."""


class JobInterrupted(Exception):
    """The worker is stopping: the job goes back to the queue as it was (not a failed attempt)."""


def is_final(state: str | None) -> bool:
    return state in FINAL_STATES


def final_state_of(exc: BaseException, job_id: str = "?") -> tuple[str, str]:
    """How an exception out of a running job ends it: (final state, message). JobInterrupted is
    not an end (the caller requeues); anything unexpected is logged with its traceback."""
    if isinstance(exc, JobInterrupted):
        raise TypeError("JobInterrupted is not a final outcome: requeue the job")
    if isinstance(exc, JobCancelled):
        return CANCELLED, "cancelled by request"
    if isinstance(exc, JobFailed):
        return ERROR, str(exc)
    log.error("job %s failed", job_id, exc_info=exc)
    return ERROR, f"{type(exc).__name__}: {exc}"


def attempts_exhausted_message(attempts: int = MAX_ATTEMPTS) -> str:
    return (f"interrupted {attempts} times (its worker died or the server restarted while it ran); "
            "not retried again")


def progress_event(progress: float, phase: str, step: int | None = None, total: int | None = None) -> dict:
    """A ``progress`` event's data, also a progress webhook's fields and a cluster stream entry."""
    return {"progress": progress, "phase": phase, "step": step, "total": total}


class ProgressThrottle:
    """Decides which progress reports are written: a phase change and a stage's last step
    always, otherwise at most every PROGRESS_WRITE_INTERVAL_SEC."""

    def __init__(self, interval: float = PROGRESS_WRITE_INTERVAL_SEC):
        self.interval = interval
        self._t = 0.0
        self._last: tuple | None = None  # (phase, step) last written

    def due(self, phase: str, step: int | None = None, total: int | None = None) -> bool:
        now = time.perf_counter()
        last_phase = self._last[0] if self._last else None
        stage_end = step is not None and step == total and self._last != (phase, step)
        if phase != last_phase or stage_end or now - self._t >= self.interval:
            self._t, self._last = now, (phase, step)
            return True
        return False


def lua_prelude() -> str:
    """The state names as Lua locals, prepended to every Redis script: the scripts compare
    against these names, never against their own string literals."""
    names = {"QUEUED": QUEUED, "PROCESSING": PROCESSING, "DONE": DONE, "ERROR": ERROR, "CANCELLED": CANCELLED}
    lines = [f"local {k} = '{v}'" for k, v in names.items()]
    finals = " or ".join(f"s == '{s}'" for s in FINAL_STATES)
    lines.append(f"local function is_final(s) return {finals} end")
    return "\n".join(lines) + "\n"
