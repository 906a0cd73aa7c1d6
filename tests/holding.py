"""Hold a job busy by a condition, never by hoping it is still running.

A test that needs a job to be running (so that others queue behind it, or to cancel it, kill its
worker, stop its server) used to submit a "slow" job and hope it had not finished yet; on a faster
CPU it sometimes had. Here the job is held until the test lets it go:

    hold = Hold()                                   # a file in the hold directory
    blocker = server.submit(prompt=hold.prompt, ...)  # its prompt carries the hold's token
    ...                                             # the job runs its first step, then waits
    hold.release()                                  # ... it goes on (or: cancel it, it ends at once)

How: the engine's ``generate`` / ``generate_batch`` are wrapped (``install()``) so that for a plan
whose prompt carries a hold token, the ``cancelled()`` callback the engine asks at every model
evaluation blocks while the hold's file exists — once the job has reported progress (``after``,
in percent: > 0 by default, so a held job is seen running, in its generation phase). Cancelling the
job ends the wait (the engine then stops as for any cancel), and a held job re-sends its last
progress report while it waits, so a throttled status write still shows it. Jobs without a token
are untouched.

The hold is a file, so it works across processes: ``tests/conftest.py`` installs the wrapper in
the test process (in-process servers), and child processes (a cluster worker, a server restarted
by a test) run through ``python -m tests.holding <module> <args...>``, which installs it and then
runs the module as ``python -m <module>`` would. ``HOLD_DIR`` is inherited through the environment.
"""
from __future__ import annotations

import functools
import os
import re
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ENV = "DAPI_TEST_HOLD_DIR"
if not os.environ.get(ENV):
    os.environ[ENV] = tempfile.mkdtemp(prefix="dapi-holds-")
HOLD_DIR = Path(os.environ[ENV])
TOKEN = re.compile(r"\bhold-([0-9a-f]{12})-(\d+)\b")
POLL_SEC = 0.02
REPORT_EVERY_SEC = 0.1

_live: set[Hold] = set()
_lock = threading.Lock()


class Hold:
    """One hold: jobs whose prompt contains ``self.prompt`` (or ``self.token``) wait while it is held."""

    def __init__(self, after: float = 0.0):
        self.id = uuid.uuid4().hex[:12]
        self.token = f"hold-{self.id}-{int(after)}"
        self.prompt = f"held job {self.token}"
        self.path = HOLD_DIR / self.id
        HOLD_DIR.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        with _lock:
            _live.add(self)

    @property
    def held(self) -> bool:
        return self.path.exists()

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        with _lock:
            _live.discard(self)

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def release_all() -> None:
    """Let every hold of this process go (tests/conftest.py does this after each test)."""
    with _lock:
        holds = list(_live)
    for h in holds:
        h.release()


def _token(plan) -> tuple[Path, float] | None:
    m = TOKEN.search(getattr(plan, "prompt", "") or "")
    return (HOLD_DIR / m.group(1), float(m.group(2))) if m else None


def _held(plan, report, cancelled, batch: list | None = None, seen: set | None = None):
    """(report, cancelled) for ``plan``: unchanged without a token, else the holding pair.

    In a batch (``batch``: every row's own ``cancelled``), a held row's wait also ends, once, when
    another row is cancelled: the engine asks the rows in turn, so the cancelled row must be asked
    too, and then ends while the held ones go on waiting."""
    found = _token(plan)
    if found is None:
        return report, cancelled
    path, after = found
    last: list = []

    def held_report(phase, progress, *a, **k):
        last[:] = [phase, progress, a, k]
        return report(phase, progress, *a, **k)

    def held_cancelled() -> bool:
        if cancelled():
            return True
        if not last or last[1] <= after:
            return False
        t = time.monotonic()
        while path.exists():
            if cancelled():
                return True
            for other in batch or ():
                if other is not cancelled and id(other) not in seen and other():
                    seen.add(id(other))
                    return False
            if time.monotonic() - t >= REPORT_EVERY_SEC:  # past any throttle of status writes
                report(last[0], last[1], *last[2], **last[3])
                t = time.monotonic()
            time.sleep(POLL_SEC)
        return cancelled()

    return held_report, held_cancelled


def install() -> None:
    """Wrap the engine (idempotent): jobs whose prompt carries a hold token wait on their hold."""
    from diffusionapi.engine.engine import Engine

    if getattr(Engine.generate, "_holding", False):
        return
    generate, generate_batch = Engine.generate, Engine.generate_batch

    @functools.wraps(generate)
    def held_generate(self, plan, report, cancelled, *args, **kwargs):
        report, cancelled = _held(plan, report, cancelled)
        return generate(self, plan, report, cancelled, *args, **kwargs)

    @functools.wraps(generate_batch)
    def held_generate_batch(self, plans, reports, cancelled, *args, **kwargs):
        seen: set = set()
        pairs = [_held(p, r, c, list(cancelled), seen) for p, r, c in zip(plans, reports, cancelled)]
        return generate_batch(self, plans, [r for r, _ in pairs], [c for _, c in pairs], *args, **kwargs)

    held_generate._holding = held_generate_batch._holding = True
    Engine.generate, Engine.generate_batch = held_generate, held_generate_batch


def main() -> None:
    """``python -m tests.holding <module> <args...>``: ``python -m <module> <args...>`` with holds."""
    import runpy

    install()
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
