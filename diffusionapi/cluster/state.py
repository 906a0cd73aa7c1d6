"""Job state of the Celery backend, in Redis: one hash per job, changed only by small Lua scripts.

Every transition that two nodes could race on is one script, so it is atomic in Redis:
submit (capacity check + record + waiting line), claim (a worker starts a job; counts the
attempt; refuses a job another live worker still holds), finish (only the job's current
owner may end it), cancel (queued: at once; running: a flag the worker polls) and take (the
final response, exactly once: read and delete in one step).

Keys (prefix ``dapi:``):
  job:<id>      hash: record (JSON: kind, payload, queue), status (JSON, the JobStatus fields),
                state, attempts, worker, cancel, final, n_images, img:<i> (bytes)
  waiting       sorted set: queued job ids scored by submit sequence (exact cluster-wide positions)
  running       hash: job id -> worker name
  lease:<id>    the running job's owner, expiring unless its worker's heartbeat renews it
  seq           submit counter
  workers       sorted set: worker name scored by its last heartbeat (Redis clock: no skew between hosts);
                worker:<name> (JSON info) and catalog:<name> (JSON), both expiring
  final         pub/sub channel: a job id, each time a job becomes final
"""
from __future__ import annotations

import json
import time

import redis

PREFIX = "dapi:"
FINAL_STATES = ("done", "error", "cancelled")
FINAL_CHANNEL = PREFIX + "final"
WAITING = PREFIX + "waiting"
RUNNING = PREFIX + "running"
SEQ = PREFIX + "seq"
WORKERS = PREFIX + "workers"


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def lease_key(job_id: str) -> str:
    return f"{PREFIX}lease:{job_id}"


def worker_key(name: str) -> str:
    return f"{PREFIX}worker:{name}"


def catalog_key(name: str) -> str:
    return f"{PREFIX}catalog:{name}"


_SUBMIT = """
local max = tonumber(ARGV[3])
if max > 0 and redis.call('ZCARD', KEYS[2]) + redis.call('HLEN', KEYS[3]) >= max then return -1 end
local seq = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'status', ARGV[2], 'state', 'queued', 'attempts', 0, 'seq', seq)
redis.call('ZADD', KEYS[2], seq, ARGV[4])
return seq
"""

# KEYS: job, waiting, running, lease. ARGV: id, worker, lease_ms, max_attempts, processing status,
# exhausted status, ttl
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'processing' then return {'final'} end
if state == 'processing' then
  local owner = redis.call('GET', KEYS[4])
  if owner and owner ~= ARGV[2] then return {'busy', owner} end
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('ZREM', KEYS[2], ARGV[1])
if attempts > tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'state', 'error', 'status', ARGV[6], 'final', '1')
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('DEL', KEYS[4])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[7]))
  redis.call('PUBLISH', 'dapi:final', ARGV[1])
  return {'exhausted'}
end
redis.call('HSET', KEYS[1], 'state', 'processing', 'status', ARGV[5], 'worker', ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('SET', KEYS[4], ARGV[2], 'PX', tonumber(ARGV[3]))
return {'run', tostring(attempts), redis.call('HGET', KEYS[1], 'record')}
"""

# KEYS: job. ARGV: worker, status
_PROGRESS = """
if redis.call('HGET', KEYS[1], 'state') ~= 'processing' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
return 1
"""

# KEYS: job, running, lease. ARGV: id, worker, state, status, ttl, image bytes...
_FINISH = """
if redis.call('HGET', KEYS[1], 'state') ~= 'processing' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'status', ARGV[4], 'final', '1', 'n_images', #ARGV - 5)
for i = 6, #ARGV do redis.call('HSET', KEYS[1], 'img:' .. (i - 6), ARGV[i]) end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
redis.call('PUBLISH', 'dapi:final', ARGV[1])
return 1
"""

# KEYS: job, running, lease, waiting. ARGV: id, worker, queued status. A graceful stop gives the job back.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'state') ~= 'processing' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[2] then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
redis.call('HSET', KEYS[1], 'state', 'queued', 'status', ARGV[3])
redis.call('HDEL', KEYS[1], 'worker')
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
redis.call('ZADD', KEYS[4], tonumber(redis.call('HGET', KEYS[1], 'seq')), ARGV[1])
return 1
"""

# KEYS: job, waiting. ARGV: id, cancelled status, ttl
_CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'status', ARGV[2], 'final', '1')
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
  redis.call('PUBLISH', 'dapi:final', ARGV[1])
  return 'cancelled'
elseif state == 'processing' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  return 'cancelling'
end
return state
"""

# KEYS: job. The final response, read and deleted in one step: exactly one caller gets it.
_TAKE = """
if redis.call('HGET', KEYS[1], 'final') ~= '1' then return false end
local all = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
return all
"""

# KEYS: worker info, workers, catalog (or ''). ARGV: name, info JSON, ttl, catalog JSON (or '')
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
redis.call('ZADD', KEYS[2], now, ARGV[1])
if ARGV[4] ~= '' then redis.call('SET', KEYS[3], ARGV[4], 'EX', tonumber(ARGV[3])) end
return tostring(now)
"""


def status_dict(state: str, phase: str | None = None, progress: float = 0.0, **extra) -> dict:
    return {"state": state, "current_phase": phase or state, "progress": progress, **extra}


def _s(v) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


class RedisJobState:
    """All Redis reads and writes of the Celery backend, for API nodes and workers alike."""

    def __init__(self, url: str, *, results_ttl: int = 3600, max_attempts: int = 3):
        self.url = url
        self.r = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)
        self.results_ttl = results_ttl
        self.max_attempts = max_attempts
        self._submit = self.r.register_script(_SUBMIT)
        self._claim = self.r.register_script(_CLAIM)
        self._progress = self.r.register_script(_PROGRESS)
        self._finish = self.r.register_script(_FINISH)
        self._release = self.r.register_script(_RELEASE)
        self._cancel = self.r.register_script(_CANCEL)
        self._take = self.r.register_script(_TAKE)
        self._heartbeat = self.r.register_script(_HEARTBEAT)

    def close(self) -> None:
        self.r.close()

    def ping(self) -> bool:
        return bool(self.r.ping())

    def now(self) -> float:
        sec, usec = self.r.time()
        return sec + usec / 1e6

    # ------------------------------------------------------------------ API side
    def create(self, job_id: str, record: dict, max_jobs: int) -> int | None:
        """Records a queued job; None when the cluster already holds ``max_jobs`` (0: no limit)."""
        seq = self._submit(keys=[job_key(job_id), WAITING, RUNNING, SEQ],
                           args=[json.dumps(record), json.dumps(status_dict("queued")), max_jobs, job_id])
        return None if int(seq) < 0 else int(seq)

    def forget(self, job_id: str) -> None:
        """Undo create() (the broker refused the message)."""
        p = self.r.pipeline()
        p.zrem(WAITING, job_id)
        p.delete(job_key(job_id))
        p.execute()

    def status(self, job_id: str) -> tuple[dict | None, int | None]:
        """(status dict, position): position 0 while running, 1, 2, ... while queued, else None."""
        p = self.r.pipeline(transaction=True)
        p.hmget(job_key(job_id), "status", "state")
        p.zrank(WAITING, job_id)
        (raw, state), rank = p.execute()
        if raw is None:
            return None, None
        st = json.loads(raw)
        state = _s(state)
        if rank is not None:
            return st, rank + 1
        return st, (0 if state == "processing" else None)

    def position(self, job_id: str) -> int | None:
        return self.status(job_id)[1]

    def cancel(self, job_id: str) -> str | None:
        out = self._cancel(keys=[job_key(job_id), WAITING],
                           args=[job_id, json.dumps(status_dict("cancelled", error="cancelled by request")),
                                 self.results_ttl])
        return _s(out) if out else None

    def take_final(self, job_id: str) -> tuple[dict, list[bytes]] | None:
        """The final status and image bytes, exactly once across all callers; None if not final/unknown."""
        flat = self._take(keys=[job_key(job_id)])
        if not flat:
            return None
        fields = {_s(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
        n = int(fields.get("n_images") or 0)
        return json.loads(fields["status"]), [fields[f"img:{i}"] for i in range(n)]

    def is_final(self, job_id: str) -> bool | None:
        """True when final, False while queued/running, None when unknown (or already taken)."""
        final, exists = self.r.hget(job_key(job_id), "final"), None
        if final is not None:
            return True
        exists = self.r.exists(job_key(job_id))
        return False if exists else None

    def waiting_ids(self) -> list[str]:
        return [_s(j) for j in self.r.zrange(WAITING, 0, -1)]

    def running(self) -> dict[str, str]:
        return {_s(k): _s(v) for k, v in self.r.hgetall(RUNNING).items()}

    def size(self) -> int:
        p = self.r.pipeline()
        p.zcard(WAITING)
        p.hlen(RUNNING)
        a, b = p.execute()
        return a + b

    def statuses(self, job_ids: list[str]) -> list[dict | None]:
        p = self.r.pipeline()
        for j in job_ids:
            p.hget(job_key(j), "status")
        return [json.loads(v) if v else None for v in p.execute()]

    # ------------------------------------------------------------------ worker side
    def claim(self, job_id: str, worker: str, lease_sec: float) -> tuple[str, int, dict | None]:
        """('run', attempt, record) | ('busy', 0, None) | ('final'|'gone'|'exhausted', 0, None)."""
        exhausted = status_dict("error", error=f"interrupted {self.max_attempts} times (its worker died or "
                                               "stopped); not retried again")
        out = self._claim(keys=[job_key(job_id), WAITING, RUNNING, lease_key(job_id)],
                          args=[job_id, worker, int(lease_sec * 1000), self.max_attempts,
                                json.dumps(status_dict("processing", "starting")), json.dumps(exhausted),
                                self.results_ttl])
        verdict = _s(out[0])
        if verdict == "run":
            return verdict, int(out[1]), json.loads(out[2])
        return verdict, 0, None

    def progress(self, job_id: str, worker: str, status: dict) -> bool:
        return bool(self._progress(keys=[job_key(job_id)], args=[worker, json.dumps(status)]))

    def cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(job_key(job_id), "cancel") is not None

    def finish(self, job_id: str, worker: str, status: dict, images: list[bytes] = ()) -> bool:
        return bool(self._finish(keys=[job_key(job_id), RUNNING, lease_key(job_id)],
                                 args=[job_id, worker, status["state"], json.dumps(status), self.results_ttl,
                                       *images]))

    def release(self, job_id: str, worker: str) -> bool:
        """Give a running job back to the waiting line (graceful stop; not counted as an attempt)."""
        return bool(self._release(keys=[job_key(job_id), RUNNING, lease_key(job_id), WAITING],
                                  args=[job_id, worker, json.dumps(status_dict("queued"))]))

    def renew_lease(self, job_id: str, worker: str, lease_sec: float) -> None:
        self.r.set(lease_key(job_id), worker, px=int(lease_sec * 1000))

    def heartbeat(self, name: str, info: dict, ttl: int, catalog: dict | None = None) -> float:
        out = self._heartbeat(keys=[worker_key(name), WORKERS, catalog_key(name)],
                              args=[name, json.dumps(info), ttl, json.dumps(catalog) if catalog is not None else ""])
        return float(out)

    def remove_worker(self, name: str) -> None:
        p = self.r.pipeline()
        p.zrem(WORKERS, name)
        p.delete(worker_key(name), catalog_key(name))
        p.execute()

    # ------------------------------------------------------------------ cluster view
    def workers(self) -> list[dict]:
        """Every worker seen within its info TTL, with ``heartbeat_age`` (seconds, Redis clock)."""
        beats = {_s(n): t for n, t in self.r.zrange(WORKERS, 0, -1, withscores=True)}
        names = list(beats)
        if not names:
            return []
        p = self.r.pipeline()
        for n in names:
            p.get(worker_key(n))
        raws = p.execute()
        now = self.now()
        out, gone = [], []
        for n, raw in zip(names, raws):
            if raw is None:
                gone.append(n)
                continue
            info = json.loads(raw)
            info["name"] = n
            info["heartbeat_age"] = round(max(0.0, now - beats[n]), 3)
            out.append(info)
        if gone:  # their info expired long ago: drop them from the index
            self.r.zrem(WORKERS, *gone)
        return out

    def catalogs(self, names: list[str]) -> list[dict]:
        if not names:
            return []
        p = self.r.pipeline()
        for n in names:
            p.get(catalog_key(n))
        return [json.loads(c) for c in p.execute() if c]


def wait_for_redis(url: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    r = redis.Redis.from_url(url, socket_connect_timeout=1)
    while True:
        try:
            r.ping()
            return
        except redis.RedisError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
