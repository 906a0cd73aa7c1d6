"""The Celery backend's per-key counts and usage (jobs/quotas.py's FileLedger, in Redis): every
API node and worker of a cluster shares them, and they survive restarts with Redis.

Buckets are read and spent in one Lua call each (atomic across API nodes); images per day are
one counter per key and UTC day; usage is one hash per key, day and model, written by the worker
that ran the job.
"""
from __future__ import annotations

import time

from ....auth.caller import Caller
from ....errors import RateLimited
from ...quotas import DAY, check_daily_and_budget, utc_day

PREFIX = "dapi:tenant:"
USAGE_INDEX = PREFIX + "usage-index"  # the usage hashes' names

# KEYS[1]: the bucket; ARGV: per_minute, cost, now, mode (check | spend | force).
# Returns "ok", or the seconds until ``cost`` would be there.
_BUCKET = """
local cap, cost, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local level = cap
if t[1] then level = math.min(cap, tonumber(t[1]) + math.max(0, now - tonumber(t[2])) * cap / 60) end
if ARGV[4] ~= 'force' and level < cost then return tostring((cost - level) * 60 / cap) end
if ARGV[4] ~= 'check' then
  redis.call('HSET', KEYS[1], 'tokens', tostring(level - cost), 'at', tostring(now))
  redis.call('EXPIRE', KEYS[1], 3600)
end
return 'ok'
"""


class RedisLedger:
    def __init__(self, r):
        self.r = r
        self._bucket = r.register_script(_BUCKET)

    def _spend(self, key: str, per_minute: int, cost: float, now: float, mode: str) -> float | None:
        out = self._bucket(keys=[PREFIX + key], args=[per_minute, cost, now, mode])
        out = out.decode() if isinstance(out, bytes) else out
        return None if out == "ok" else float(out)

    def take_request(self, caller: Caller, now: float | None = None) -> None:
        limit = caller.limits.requests_per_minute
        if limit is None or caller.name is None:
            return
        wait = self._spend(f"{caller.name}:requests", limit, 1, time.time() if now is None else now, "spend")
        if wait is not None:
            raise RateLimited("requests_per_minute", limit, wait, f"key {caller.name!r} made too many requests")

    def check_submit(self, caller: Caller, images: int, pixel_steps: int, active: int,
                     now: float | None = None) -> None:
        lim, name = caller.limits, caller.name
        if name is None:
            return
        now = time.time() if now is None else now
        if lim.max_queued is not None and active + 1 > lim.max_queued:
            raise RateLimited("max_queued", lim.max_queued, 5.0, f"key {name!r} has {active} jobs waiting or running")
        used = int(self.r.get(f"{PREFIX}{name}:images:{utc_day(now)}") or 0) if lim.images_per_day is not None else 0
        check_daily_and_budget(caller, images, pixel_steps, now, used,
                               lambda budget: self._spend(f"{name}:pixel_steps", budget, pixel_steps, now, "check"))

    def charge_submit(self, caller: Caller, images: int, pixel_steps: int, now: float | None = None) -> None:
        if caller.name is None:
            return
        now = time.time() if now is None else now
        key = f"{PREFIX}{caller.name}:images:{utc_day(now)}"
        p = self.r.pipeline()
        p.incrby(key, images)
        p.expire(key, int(2 * DAY))
        p.execute()
        if caller.limits.pixel_steps_per_minute is not None:
            self._spend(f"{caller.name}:pixel_steps", caller.limits.pixel_steps_per_minute, pixel_steps, now, "force")

    def record_usage(self, owner: str | None, model: str | None, *, images: int, steps: int,
                     gpu_seconds: float, now: float | None = None) -> None:
        now = time.time() if now is None else now
        key = f"{PREFIX}usage:{owner or ''}\x1f{utc_day(now)}\x1f{model or ''}"
        p = self.r.pipeline()
        p.hincrby(key, "jobs", 1)
        p.hincrby(key, "images", images)
        p.hincrby(key, "steps", steps)
        p.hincrbyfloat(key, "gpu_seconds", gpu_seconds)
        p.sadd(USAGE_INDEX, key)
        p.execute()

    def usage(self, owner: str | None = None) -> dict:
        keys = sorted(k.decode() for k in self.r.smembers(USAGE_INDEX))
        out: dict = {} if owner is None else {owner: {}}
        rows = []
        for k in keys:
            who, day, model = k[len(PREFIX) + len("usage:"):].split("\x1f")
            if owner is None or who == owner:
                rows.append((who, day, model, k))
        p = self.r.pipeline()
        for *_, k in rows:
            p.hgetall(k)
        for (who, day, model, _), h in zip(rows, p.execute()):
            h = {a.decode(): b.decode() for a, b in h.items()}
            out.setdefault(who, {}).setdefault(day, {})[model] = {
                "jobs": int(h.get("jobs", 0)), "images": int(h.get("images", 0)), "steps": int(h.get("steps", 0)),
                "gpu_seconds": round(float(h.get("gpu_seconds", 0.0)), 3)}
        return out
