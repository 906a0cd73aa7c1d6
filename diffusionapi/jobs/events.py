"""The live event feed of jobs: an in-process log per job, with ids, fan-out and replay.

Producers (the worker thread, the API) call :meth:`EventLog.publish` from any thread;
listeners (SSE streams on the event loop) iterate :meth:`EventLog.follow`. Each job's log is
*compacted*: it keeps only the newest event of each kind that describes a state (``queued``,
``progress``, ``preview``), plus ``started`` and the final event. A reconnecting client
(``Last-Event-ID``) is therefore sent the current state and never misses the final event, and
a slow or absent listener costs no memory: there is no per-listener queue, only a wake-up.

Event ids are ``"<epoch>-<n>"``: ``n`` grows per job, ``epoch`` identifies this log (this
process). An id from another epoch (the server restarted since) replays the whole log.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from .states import FINAL_STATES as FINAL_EVENTS, STATE_EVENTS  # noqa: E402 - a final event is named after its state


@dataclass(frozen=True)
class JobEvent:
    id: str
    type: str
    data: dict

    @property
    def final(self) -> bool:
        return self.type in FINAL_EVENTS


@dataclass
class _JobLog:
    events: list[JobEvent] = field(default_factory=list)
    counter: itertools.count = field(default_factory=lambda: itertools.count(1))
    waiters: set = field(default_factory=set)       # (loop, asyncio.Event) of listeners
    final_at: float | None = None                    # monotonic time the final event came
    listened: bool = False                           # someone followed it (may reconnect)


class EventLog:
    def __init__(self, retention_sec: float = 300.0):
        self.epoch = uuid.uuid4().hex[:8]
        self.retention_sec = retention_sec
        self._logs: dict[str, _JobLog] = {}
        self._pruned_at = 0.0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ producers
    def open(self, job_id: str) -> None:
        with self._lock:
            self._logs.setdefault(job_id, _JobLog())

    def has(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._logs

    def publish(self, job_id: str, type_: str, data: dict | None = None) -> JobEvent | None:
        """Append an event (thread-safe) and wake the job's listeners. After the final event
        the log is closed: later events are dropped (None)."""
        with self._lock:
            self._prune()
            log = self._logs.setdefault(job_id, _JobLog())
            if log.final_at is not None:
                return None
            ev = JobEvent(f"{self.epoch}-{next(log.counter)}", type_, data or {})
            if type_ in STATE_EVENTS:
                log.events = [e for e in log.events if e.type != type_]
            log.events.append(ev)
            if ev.final:
                log.final_at = time.monotonic()
                if not log.listened:  # no one to reconnect: nothing to keep
                    self._logs.pop(job_id, None)
            waiters = list(log.waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that listener's loop is gone
                pass
        return ev

    def final(self, job_id: str) -> JobEvent | None:
        with self._lock:
            log = self._logs.get(job_id)
            if log and log.events and log.events[-1].final:
                return log.events[-1]
            return None

    def latest(self, job_id: str, type_: str) -> JobEvent | None:
        with self._lock:
            log = self._logs.get(job_id)
            for ev in reversed(log.events if log else []):
                if ev.type == type_:
                    return ev
            return None

    def listening(self, job_id: str) -> bool:
        """Someone follows the job right now."""
        with self._lock:
            log = self._logs.get(job_id)
            return bool(log and log.waiters)

    def listened(self, job_id: str) -> bool:
        """Someone followed the job (and may reconnect)."""
        with self._lock:
            log = self._logs.get(job_id)
            return bool(log and log.listened)

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._logs.pop(job_id, None)

    def listened_jobs(self) -> set[str]:
        """The jobs someone follows right now."""
        with self._lock:
            return {job_id for job_id, lg in self._logs.items() if lg.waiters}

    def _prune(self) -> None:
        # At most once a second (or per retention, when shorter): a walk over every log at each
        # publish would make a long queue quadratic.
        now = time.monotonic()
        if now - self._pruned_at < min(1.0, self.retention_sec):
            return
        self._pruned_at = now
        for job_id in [j for j, lg in self._logs.items()
                       if lg.final_at is not None and now - lg.final_at > self.retention_sec and not lg.waiters]:
            del self._logs[job_id]

    # ------------------------------------------------------------------ listeners
    def after(self, job_id: str, after_id: str | None) -> list[JobEvent]:
        """The retained events newer than ``after_id`` (all of them for None or another epoch)."""
        n = self._number(after_id)
        with self._lock:
            log = self._logs.get(job_id)
            return [e for e in (log.events if log else []) if self._number(e.id) > n]

    def _number(self, event_id: str | None) -> int:
        if not event_id:
            return 0
        epoch, _, n = event_id.rpartition("-")
        if epoch != self.epoch or not n.isdigit():
            return 0
        return int(n)

    async def follow(self, job_id: str, after_id: str | None = None,
                     ready: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[JobEvent]:
        """Events after ``after_id``, then each new one as it comes, ending with the final event.

        ``ready`` runs once this listener is registered and before anything is read (so an
        event published meanwhile is not missed): the owner can bring the log up to date there;
        it returns False when the job is gone, which ends the stream at once."""
        wake = asyncio.Event()
        entry = (asyncio.get_running_loop(), wake)
        with self._lock:
            log = self._logs.setdefault(job_id, _JobLog())
            log.listened = True
            log.waiters.add(entry)
        try:
            if ready is not None and not await ready():
                return
            last = after_id
            while True:
                wake.clear()  # before reading, so a publish in between is not missed
                for ev in self.after(job_id, last):
                    last = ev.id
                    yield ev
                    if ev.final:
                        return
                if self.final(job_id) is not None:
                    return  # the final event was already sent to this client before it reconnected
                await wake.wait()
        finally:
            with self._lock:
                lg = self._logs.get(job_id)
                if lg is not None:
                    lg.waiters.discard(entry)
