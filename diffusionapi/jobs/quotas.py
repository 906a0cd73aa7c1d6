"""Per-key limits and accounting: what each key may still do, and what it has used.

The job service asks before it queues anything (``check_submit``) and records after the backend
accepted the job (``charge_submit``), under the key's submit lock, so a refused request costs
nothing and two concurrent submits cannot both slip under a limit. The guard middleware spends
one request token per API call (``take_request``).

* ``requests_per_minute`` and ``pixel_steps_per_minute`` are token buckets: a full minute's worth
  at most, refilled continuously, so ``Retry-After`` is when enough has come back.
* ``images_per_day`` counts images submitted per UTC day (``Retry-After``: next midnight UTC).
* ``max_queued`` counts the key's jobs waiting or running (the backend's own index).

:class:`FileLedger` keeps the counts and the usage (``GET /usage``) in one JSON file in the
queue directory, so a restart keeps them. It is written at every submit and job end; request
tokens alone are written at most once a second (a crash forgets at most that second's calls).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from ..auth.caller import Caller
from ..errors import RateLimited
from ..files import write_atomic

log = logging.getLogger(__name__)

DAY = 86400.0


def utc_day(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def job_cost(kind: str, plan) -> tuple[int, int]:
    """(images, pixel×steps) of a resolved job's plan. An upscale counts as its output's pixels
    once (one image, one "step")."""
    if kind == "upscale":
        return 1, plan.width * plan.height
    n = plan.batch_size * plan.n_iter
    cost = plan.width * plan.height * plan.steps
    if plan.hires is not None:
        cost += plan.hires.width * plan.hires.height * plan.hires.steps
    return n, cost * n


class _Bucket:
    """Token bucket: ``per_minute`` tokens at most, refilled at per_minute/60 a second."""

    @staticmethod
    def level(state: list | None, per_minute: int, now: float) -> float:
        if not state:
            return float(per_minute)
        tokens, t = state
        return min(float(per_minute), tokens + max(0.0, now - t) * per_minute / 60.0)

    @staticmethod
    def wait(level: float, cost: float, per_minute: int) -> float:
        return (cost - level) * 60.0 / per_minute if per_minute else float("inf")


def check_daily_and_budget(caller: Caller, images: int, pixel_steps: int, now: float, images_today: int,
                           pixel_wait) -> None:
    """The images-per-day and pixel×steps-per-minute rules, for either ledger (file or Redis):
    ``images_today`` is what the key used today, ``pixel_wait(budget)`` the seconds until the
    budget covers this job (None: it does now)."""
    lim, name = caller.limits, caller.name
    if lim.images_per_day is not None and images_today + images > lim.images_per_day:
        raise RateLimited("images_per_day", lim.images_per_day, DAY - now % DAY,
                          f"key {name!r} asked for {images_today} images today and this job makes {images}")
    if lim.pixel_steps_per_minute is not None:
        budget = lim.pixel_steps_per_minute
        if pixel_steps > budget:  # could never pass: waiting would not help
            from ..errors import RequestError

            raise RequestError("steps", f"this job costs {pixel_steps} pixel×steps, more than key {name!r} may "
                                        f"spend in a minute ({budget}): fewer steps, images or pixels", status=422)
        wait = pixel_wait(budget)
        if wait is not None:
            raise RateLimited("pixel_steps_per_minute", budget, wait,
                              f"key {name!r} spent its pixel×steps budget for now (job costs {pixel_steps})")


class FileLedger:
    SAVE_EVERY_SEC = 1.0

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._dirty_since: float | None = None
        self._state = self._load()

    def _load(self) -> dict:
        try:
            data = json.loads(self.path.read_bytes())
            if isinstance(data, dict):
                return {"buckets": data.get("buckets", {}), "days": data.get("days", {}),
                        "usage": data.get("usage", {})}
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            log.error("tenant ledger %s is unreadable (%s); counts start from zero", self.path, e)
        return {"buckets": {}, "days": {}, "usage": {}}

    def save(self) -> None:
        with self._lock:
            data = json.dumps(self._state, separators=(",", ":")).encode()
            self._dirty_since = None
        try:
            write_atomic(self.path, data, fsync=False)
        except OSError as e:  # counts stay in memory; the next save tries again
            log.warning("could not write the tenant ledger %s: %s", self.path, e)

    # ------------------------------------------------------------------ limits
    def take_request(self, caller: Caller, now: float | None = None) -> None:
        """One API call of ``caller``; RateLimited when its requests_per_minute are spent."""
        limit = caller.limits.requests_per_minute
        if limit is None or caller.name is None:
            return
        now = time.time() if now is None else now
        with self._lock:
            key = f"{caller.name}|requests"
            level = _Bucket.level(self._state["buckets"].get(key), limit, now)
            if level < 1.0:
                raise RateLimited("requests_per_minute", limit, _Bucket.wait(level, 1.0, limit),
                                  f"key {caller.name!r} made too many requests")
            self._state["buckets"][key] = [level - 1.0, now]
            if self._dirty_since is None:
                self._dirty_since = now
            due = now - self._dirty_since >= self.SAVE_EVERY_SEC
        if due:
            self.save()

    def check_submit(self, caller: Caller, images: int, pixel_steps: int, active: int,
                     now: float | None = None) -> None:
        """RateLimited naming the first limit this job would break; nothing is counted."""
        lim, name = caller.limits, caller.name
        if name is None:
            return
        now = time.time() if now is None else now
        if lim.max_queued is not None and active + 1 > lim.max_queued:
            raise RateLimited("max_queued", lim.max_queued, 5.0,
                              f"key {name!r} has {active} jobs waiting or running")
        with self._lock:
            def pixel_wait(budget: int) -> float | None:
                level = _Bucket.level(self._state["buckets"].get(f"{name}|pixel_steps"), budget, now)
                return _Bucket.wait(level, pixel_steps, budget) if level < pixel_steps else None

            check_daily_and_budget(caller, images, pixel_steps, now,
                                   self._state["days"].get(name, {}).get(utc_day(now), 0), pixel_wait)

    def charge_submit(self, caller: Caller, images: int, pixel_steps: int, now: float | None = None) -> None:
        if caller.name is None:
            return
        now = time.time() if now is None else now
        name, lim = caller.name, caller.limits
        with self._lock:
            today = utc_day(now)
            days = self._state["days"].setdefault(name, {})
            for old in [d for d in days if d != today]:  # only today's count matters
                del days[old]
            days[today] = days.get(today, 0) + images
            if lim.pixel_steps_per_minute is not None:
                key = f"{name}|pixel_steps"
                level = _Bucket.level(self._state["buckets"].get(key), lim.pixel_steps_per_minute, now)
                self._state["buckets"][key] = [level - pixel_steps, now]
        self.save()

    # ------------------------------------------------------------------ accounting
    def record_usage(self, owner: str | None, model: str | None, *, images: int, steps: int,
                     gpu_seconds: float, now: float | None = None) -> None:
        """A job ended: one job, its images, denoising steps and engine time, by UTC day and model."""
        now = time.time() if now is None else now
        with self._lock:
            row = (self._state["usage"].setdefault(owner or "", {}).setdefault(utc_day(now), {})
                   .setdefault(model or "", {"jobs": 0, "images": 0, "steps": 0, "gpu_seconds": 0.0}))
            row["jobs"] += 1
            row["images"] += images
            row["steps"] += steps
            row["gpu_seconds"] = round(row["gpu_seconds"] + gpu_seconds, 3)
        self.save()

    def usage(self, owner: str | None = None) -> dict:
        """{key: {day: {model: {jobs, images, steps, gpu_seconds}}}}: one key's, or every key's
        (owner None). Jobs of no key (an open service) are under ""."""
        with self._lock:
            data = json.loads(json.dumps(self._state["usage"]))
        return data if owner is None else {owner: data.get(owner, {})}


def usage_of(kind: str, payload: dict | None, status) -> dict:
    """What a finished job used (for ``record_usage``)."""
    payload = payload or {}
    images = len(status.images or []) if status.state == "done" else 0
    if status.state == "done" and not images and (status.output_file or status.output_path):
        images = 1
    steps = int(payload.get("steps") or 0) if kind != "upscale" else 0
    hires = payload.get("hires") or {}
    if hires.get("enabled"):
        steps += int(hires.get("steps") or 0)
    gpu = float(status.generation_time_sec or 0.0) + float(status.load_time_sec or 0.0)
    return {"images": images, "steps": steps * images, "gpu_seconds": gpu}
