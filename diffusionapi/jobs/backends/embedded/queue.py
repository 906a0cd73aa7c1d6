"""The embedded backend's waiting line and running jobs, in memory (rebuilt from the store at start).

The line is fair between keys: the rule is ``jobs/fair.py`` (shared with the Celery backend);
this queue keeps each key's pass and stride and the virtual time in memory.

``order()`` runs that choice forward over the jobs waiting now: positions are the order jobs
start in if nothing else arrives, and the worker's batch window (``peek``) is that order's head.
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

from ....errors import QueueFull
from ... import fair
from ...fair import Waiting


@dataclass
class RunningJob:
    job_id: str
    cancel: threading.Event


class JobQueue:
    """The waiting line and the running jobs (one, or a batch); positions are 0 for running, then 1, 2, ..."""

    def __init__(self, max_jobs: int):
        self.max_jobs = max_jobs
        self._waiting: dict[str, Waiting] = {}
        self._running: list[RunningJob] = []
        self._pass: dict[str | None, int] = {}      # per key: its virtual time (turns taken x stride)
        self._stride: dict[str | None, int] = {}
        self._vtime = 0                             # the pass of the last job started
        self._seq = itertools.count()
        self._order: list[str] | None = None        # cached order(); None when the line changed
        self._cond = threading.Condition()
        self._closed = False

    def put(self, job_id: str, *, force: bool = False, owner: str | None = None, priority: int = 0,
            share: float = 1.0) -> None:
        with self._cond:
            if not force and self.size() >= self.max_jobs:
                raise QueueFull(f"the queue is full ({self.max_jobs} jobs); retry later")
            if not any(w.owner == owner for w in self._waiting.values()):
                # (re)joining: at the current virtual time, never behind it (no banked turns)
                self._pass[owner] = fair.join(self._pass.get(owner, 0), self._vtime)
            self._stride[owner] = fair.stride(share)
            self._waiting[job_id] = Waiting(job_id, owner, priority, next(self._seq))
            self._order = None
            self._cond.notify()

    def size(self) -> int:
        return len(self._waiting) + len(self._running)

    # ------------------------------------------------------------------ the order
    def order(self) -> list[str]:
        """Waiting job ids in the order they will start (if nothing else arrives)."""
        with self._cond:
            if self._order is None:
                self._order = fair.order(self._waiting.values(), self._pass, self._stride)
            return list(self._order)

    def _started(self, job_id: str) -> None:
        """``job_id`` leaves the line to run: its key's turn is spent (caller holds the lock)."""
        w = self._waiting.pop(job_id)
        self._pass[w.owner], self._vtime = fair.start(self._pass.get(w.owner, 0), self._vtime,
                                                      self._stride.get(w.owner, fair.SCALE))
        self._order = None

    # ------------------------------------------------------------------ the worker's side
    def take(self) -> RunningJob | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            job_id = self.order()[0]
            self._started(job_id)
            self._running = [RunningJob(job_id, threading.Event())]
            return self._running[0]

    def peek(self, n: int) -> list[str]:
        """The first ``n`` waiting jobs: the batch window."""
        return self.order()[:n]

    def wait_for_waiting(self, n: int, timeout: float) -> None:
        """Until ``n`` jobs wait (or ``timeout`` seconds passed): a batch may fill up."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._waiting) >= n or self._closed, timeout)

    def claim(self, job_ids: list[str]) -> list[RunningJob]:
        """Those of ``job_ids`` still waiting, now running beside the taken one (each spends its key's turn)."""
        with self._cond:
            claimed = []
            for job_id in job_ids:
                if job_id in self._waiting:
                    self._started(job_id)
                    claimed.append(RunningJob(job_id, threading.Event()))
            self._running.extend(claimed)
            return claimed

    def finish(self) -> None:
        with self._cond:
            self._running = []

    def running(self) -> str | None:
        with self._cond:
            return self._running[0].job_id if self._running else None

    def position(self, job_id: str) -> int | None:
        with self._cond:
            if any(r.job_id == job_id for r in self._running):
                return 0
            if job_id not in self._waiting:
                return None
            return self.order().index(job_id) + 1

    def remove_waiting(self, job_id: str) -> bool:
        with self._cond:
            if self._waiting.pop(job_id, None) is None:
                return False
            self._order = None
            return True

    def cancel_running(self, job_id: str) -> bool:
        with self._cond:
            for r in self._running:
                if r.job_id == job_id:
                    r.cancel.set()
                    return True
            return False

    def snapshot(self) -> list[tuple[str, int]]:
        with self._cond:
            out = [(r.job_id, 0) for r in self._running]
            return out + [(j, i + 1) for i, j in enumerate(self.order())]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for r in self._running:
                r.cancel.set()
            self._cond.notify_all()
