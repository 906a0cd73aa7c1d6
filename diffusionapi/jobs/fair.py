"""The fair order of waiting jobs (docs/tenants.md "Scheduling"), one rule for both backends.

1. priority classes first: the waiting job with the highest ``priority`` of any key goes next;
2. within a class, keys take turns: stride scheduling, each key's ``pass`` advancing by its
   ``stride`` (``SCALE / share``) per job it starts, the lowest pass next (ties: the older head
   job). A key that had nothing waiting joins at the current virtual time (the pass of the last
   job started), so idling banks no turns: with key A's 500 jobs waiting, key B's new job starts
   after at most one more of A's;
3. within a key, higher priority first, then first come, first served (``seq``).

Passes and strides are integers, so the Celery backend's Lua script (``celery/state.py``,
``_FAIR``) compares exactly what this module compares; tests/test_fair_celery.py checks that
the script starts jobs in the order ``order`` predicts. The embedded queue
(``embedded/queue.py``) keeps its passes in memory, the Celery backend in Redis.
"""
from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

SCALE = 1_000_000  # a share-1 key's stride: shares down to 1e-6 stay distinct


def stride(share: float) -> int:
    """The pass one started job costs a key of this ``share`` (no share, or a bad one: 1)."""
    return max(1, round(SCALE / share)) if share and share > 0 else SCALE


@dataclass(frozen=True)
class Waiting:
    job_id: str
    owner: Hashable
    priority: int
    seq: int


def head_key(priority: int, pass_: int, seq: int) -> tuple[int, int, int]:
    """What a key's head job is compared by (the smallest starts next)."""
    return -priority, pass_, seq


def order(waiting: Iterable[Waiting], passes: Mapping, strides: Mapping) -> list[str]:
    """Waiting job ids in the order they start if nothing else arrives (positions 1, 2, ...).

    ``passes``/``strides``: per owner (missing: 0 / ``SCALE``). A key's pass here is already at
    least the virtual time when it has jobs waiting (``join``), so the simulation needs no clock."""
    per: dict = {}
    for w in waiting:
        per.setdefault(w.owner, []).append(w)
    heap = []
    for i, (owner, jobs) in enumerate(per.items()):
        jobs.sort(key=lambda w: (-w.priority, w.seq))
        heap.append((*head_key(jobs[0].priority, int(passes.get(owner, 0)), jobs[0].seq), i, owner))
    heapq.heapify(heap)
    out, nxt = [], {k: 0 for k in per}
    while heap:
        _, p, _, i, owner = heapq.heappop(heap)
        jobs = per[owner]
        out.append(jobs[nxt[owner]].job_id)
        nxt[owner] += 1
        p += int(strides.get(owner, SCALE))
        if nxt[owner] < len(jobs):
            head = jobs[nxt[owner]]
            heapq.heappush(heap, (*head_key(head.priority, p, head.seq), i, owner))
    return out


def join(pass_: int, vtime: int) -> int:
    """A key that had nothing waiting (re)joins at the virtual time, never behind it."""
    return max(pass_, vtime)


def start(pass_: int, vtime: int, stride_: int) -> tuple[int, int]:
    """A job of a key starts: (the key's new pass, the new virtual time)."""
    return pass_ + stride_, max(vtime, pass_)
