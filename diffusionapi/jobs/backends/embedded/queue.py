"""The embedded backend's waiting line and running jobs, in memory (rebuilt from the store at start).

The line is fair between keys (docs/tenants.md "Scheduling"):

1. priority classes first: the waiting job with the highest ``priority`` of any key goes next;
2. within a class, keys take turns: stride scheduling, each key's ``pass`` advancing by
   ``1 / share`` per job it starts, the lowest pass next (ties: the older head job). A key that
   had nothing waiting joins at the current virtual time, so idling banks no turns: with key A's
   500 jobs waiting, key B's new job starts after at most one more of A's;
3. within a key, higher priority first, then first come, first served.

``order()`` runs that choice forward over the jobs waiting now: positions are the order jobs
start in if nothing else arrives, and the worker's batch window (``peek``) is that order's head.
"""
from __future__ import annotations

import heapq
import itertools
import threading
from dataclasses import dataclass

from ....errors import QueueFull


@dataclass
class RunningJob:
    job_id: str
    cancel: threading.Event


@dataclass(frozen=True)
class Waiting:
    job_id: str
    owner: str | None
    priority: int
    seq: int


class JobQueue:
    """The waiting line and the running jobs (one, or a batch); positions are 0 for running, then 1, 2, ..."""

    def __init__(self, max_jobs: int):
        self.max_jobs = max_jobs
        self._waiting: dict[str, Waiting] = {}
        self._running: list[RunningJob] = []
        self._pass: dict[str | None, float] = {}    # per key: its virtual time (turns taken / share)
        self._share: dict[str | None, float] = {}
        self._vtime = 0.0                           # the pass of the last job started
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
                self._pass[owner] = max(self._pass.get(owner, 0.0), self._vtime)
            self._share[owner] = share if share > 0 else 1.0
            self._waiting[job_id] = Waiting(job_id, owner, priority, next(self._seq))
            self._order = None
            self._cond.notify()

    def size(self) -> int:
        return len(self._waiting) + len(self._running)

    # ------------------------------------------------------------------ the order
    def _heads(self) -> dict[str | None, list[Waiting]]:
        per: dict[str | None, list[Waiting]] = {}
        for w in self._waiting.values():
            per.setdefault(w.owner, []).append(w)
        for jobs in per.values():
            jobs.sort(key=lambda w: (-w.priority, w.seq))
        return per

    def order(self) -> list[str]:
        """Waiting job ids in the order they will start (if nothing else arrives)."""
        with self._cond:
            if self._order is None:
                per = self._heads()
                # (head's class, key's pass, head's age, tie-breaker, key): the smallest starts next
                heap = [(-jobs[0].priority, self._pass.get(k, 0.0), jobs[0].seq, i, k)
                        for i, (k, jobs) in enumerate(per.items())]
                heapq.heapify(heap)
                out, nxt = [], {k: 0 for k in per}
                while heap:
                    _, p, _, i, k = heapq.heappop(heap)
                    jobs = per[k]
                    out.append(jobs[nxt[k]].job_id)
                    nxt[k] += 1
                    p += 1.0 / self._share.get(k, 1.0)
                    if nxt[k] < len(jobs):
                        head = jobs[nxt[k]]
                        heapq.heappush(heap, (-head.priority, p, head.seq, i, k))
                self._order = out
            return list(self._order)

    def _started(self, job_id: str) -> None:
        """``job_id`` leaves the line to run: its key's turn is spent (caller holds the lock)."""
        w = self._waiting.pop(job_id)
        self._vtime = max(self._vtime, self._pass.get(w.owner, 0.0))
        self._pass[w.owner] = self._pass.get(w.owner, 0.0) + 1.0 / self._share.get(w.owner, 1.0)
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
