"""The embedded backend's waiting line and running jobs, in memory (rebuilt from the store at start)."""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from ....errors import QueueFull


@dataclass
class RunningJob:
    job_id: str
    cancel: threading.Event


class JobQueue:
    """The waiting line and the running jobs (one, or a batch); positions are 0 for running, then 1, 2, ..."""

    def __init__(self, max_jobs: int):
        self.max_jobs = max_jobs
        self._waiting: deque[str] = deque()
        self._running: list[RunningJob] = []
        self._cond = threading.Condition()
        self._closed = False

    def put(self, job_id: str, *, force: bool = False) -> None:
        with self._cond:
            if not force and self.size() >= self.max_jobs:
                raise QueueFull(f"the queue is full ({self.max_jobs} jobs); retry later")
            self._waiting.append(job_id)
            self._cond.notify()

    def size(self) -> int:
        return len(self._waiting) + len(self._running)

    def take(self) -> RunningJob | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            self._running = [RunningJob(self._waiting.popleft(), threading.Event())]
            return self._running[0]

    def peek(self, n: int) -> list[str]:
        """The first ``n`` waiting jobs: the batch window."""
        with self._cond:
            return list(self._waiting)[:n]

    def wait_for_waiting(self, n: int, timeout: float) -> None:
        """Until ``n`` jobs wait (or ``timeout`` seconds passed): a batch may fill up."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._waiting) >= n or self._closed, timeout)

    def claim(self, job_ids: list[str]) -> list[RunningJob]:
        """Those of ``job_ids`` still waiting, now running beside the taken one."""
        with self._cond:
            claimed = []
            for job_id in job_ids:
                if job_id in self._waiting:
                    self._waiting.remove(job_id)
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
            try:
                return self._waiting.index(job_id) + 1
            except ValueError:
                return None

    def remove_waiting(self, job_id: str) -> bool:
        with self._cond:
            try:
                self._waiting.remove(job_id)
                return True
            except ValueError:
                return False

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
            return out + [(j, i + 1) for i, j in enumerate(self._waiting)]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for r in self._running:
                r.cancel.set()
            self._cond.notify_all()
