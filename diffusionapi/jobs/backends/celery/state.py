"""Job state of the Celery backend, in Redis: one hash per job, changed only by small Lua scripts.

Every transition that two nodes could race on is one script, so it is atomic in Redis:
submit (capacity check + record + waiting line), claim (a worker starts a job; counts the
attempt; refuses a job another live worker still holds), finish (only the job's current
owner may end it), cancel (queued: at once; running: a flag the worker polls) and take (the
final response, exactly once: read and delete in one step). The live events of a job are written
by the same scripts, so a listener sees exactly the transitions the job went through.

Keys (prefix ``dapi:``):
  job:<id>      hash: record (JSON: kind, payload, queue), status (JSON, the JobStatus fields),
                state, attempts, worker, cancel, final, n_images, img:<i> (bytes); while running
                also step, total (the sampler's) and preview (base64 JPEG), preview_step: apart from
                ``status`` so that the frequent status writes do not carry the preview; listened
                (an event stream followed the job: take keeps a copy for the others, below)
  ev:<id>       stream of the job's events, fields type + data (JSON): started (claim), progress
                and preview (worker), final {state} (finish, cancel, attempts exhausted); capped
                (approximate MAXLEN), expiring with the job's results (``events_retention_sec``
                after they were taken)
  taken:<id>    the job hash as it was when taken, kept ``events_retention_sec`` when the job had
                a listener: every listener (and a reconnect) gets the final event, whoever took it
  hooks         list: webhooks of jobs that became final without a worker (cancelled while queued),
                JSON {job_id, state, hook, body}; a worker moves each to hooks:<worker name> and
                records it in its durable webhook queue (``cluster/worker.py``)
  webhook:<id>  a worker's webhook delivery record (JSON, expiring): ``GET /queue`` on any node lists them
  waiting       sorted set: queued job ids scored by submit sequence (every queued job, whatever
                its model; the sweep and ``queue_stats`` read it)
  fair:*        the fair line (docs/tenants.md "Scheduling", the rule in ``jobs/fair.py``):
                fair:meta (hash: queued job id -> JSON [queue, owner, priority, seq]),
                fair:q:<queue>:<owner> (sorted set: that key's queued jobs of that model queue,
                by priority then seq), fair:owners:<queue> (set: the keys with jobs queued there),
                fair:nwait (hash: owner -> its queued jobs), fair:pass (hash: "<queue>\x1f<owner>"
                -> integer pass), fair:stride (hash: owner -> integer stride), fair:vtime (hash:
                queue -> the pass of its last job started). Each model queue is a fair line of its
                own (its workers' turns), so a key waiting on one queue banks no turns on another.
                Owner '' is "no key". Changed only by the scripts that change ``waiting``
  bound:<token> the job a broker message (its task id, "token") started: a message names no job,
                it is a turn of its model queue; the worker that gets it takes the next job of
                that queue in the fair order (``claim_next``) and binds the token to it, so a
                redelivery of the message (its worker died) resumes that job and no other
  unsent        sorted set: jobs whose own broker message is not known to exist, scored by the Redis
                time since when: submit adds the job, the submitting node removes it once the
                broker confirmed its message (``mark_sent``), and so does the message's arrival at
                a worker (``claim_next`` removes its token). A claim does not: a message is a turn
                of its queue, so a job may start on another job's turn, and then its own message is
                still owed to the queue (else the queue is one turn short and its last job never
                starts). An entry left longer than the grace period (its API node died between the
                two steps of submit), or a running job whose lease lapsed (its owner died and no
                redelivery claimed it), is re-published by the orphan sweep (``sweep_orphans``,
                run by every API node): a turn for a waiting job or for one that started on
                another's turn while its queue has jobs waiting, a message resuming a running job
                with a lapsed lease. unsent:queue (hash: id -> its model queue) keeps the queue of
                a submit's entry for when its job is gone (read and deleted before the sweep). Queued jobs
                recorded before this set existed are never in it, so never re-published: no storm
                on upgrade (they were published by the old submit, which answered only after the
                broker's confirm; the rare one orphaned before the upgrade stays as it was)
  running       hash: job id -> worker name
  lease:<id>    the running job's owner, expiring unless its worker's heartbeat renews it
  seq           submit counter; starts: claim counter (a job's ``started_n``: the order jobs started in)
  workers       sorted set: worker name scored by its last heartbeat (Redis clock: no skew between hosts);
                worker:<name> (JSON info) and catalog:<name> (JSON), both expiring
  final         pub/sub channel: a job id, each time a job becomes final
  idem:<hash>   the job id a submit with an Idempotency-Key made (hash of caller + key), with
                "|<fingerprint of its request>" when known, set by the submit script with the job
                itself, expiring after the idempotency window
  run_id        the run id of the Redis server the orphan sweep last saw: a different one means
                Redis restarted or failed over (and may have lost its last writes), so the sweep
                publishes every waiting job once more (a duplicate message is harmless)
"""
from __future__ import annotations

import json
import logging
import time
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.sentinel import Sentinel

from ... import fair
from ...states import (CANCELLED, ERROR, FINAL_STATES, MAX_ATTEMPTS, PROCESSING, QUEUED,  # noqa: F401
                       attempts_exhausted_message, lua_prelude, progress_event)

log = logging.getLogger(__name__)

PREFIX = "dapi:"
FINAL_CHANNEL = PREFIX + "final"
WAITING = PREFIX + "waiting"
UNSENT = PREFIX + "unsent"
UNSENT_QUEUE = UNSENT + ":queue"  # the scripts derive it as KEYS[unsent] .. ':queue'
RUNNING = PREFIX + "running"
SEQ = PREFIX + "seq"
WORKERS = PREFIX + "workers"
PENDING_HOOKS = PREFIX + "hooks"
RUN_ID = PREFIX + "run_id"
# A Redis up for less than this may not yet have the connections of every live worker (each
# reconnects at its next heartbeat): a missing one then says nothing about the worker's death.
RECONNECT_GRACE_SEC = 10
REPLICA_WAIT_MS = 1000  # Sentinel: how long a submit waits for a replica to have the job
EVENTS_MAXLEN = 500  # per job's stream; approximate trim. Previews are the big entries (a few kB each)
FINAL_EVENT = "final"
FAIR_META, FAIR_PASS, FAIR_STRIDE = PREFIX + "fair:meta", PREFIX + "fair:pass", PREFIX + "fair:stride"
# A token's binding outlives any redelivery of its message (acknowledged when its job has run).
BOUND_TTL_SEC = 7 * 86400  # the stream's last entry: data {state}; feeds send the final answer for it


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def lease_key(job_id: str) -> str:
    return f"{PREFIX}lease:{job_id}"


def worker_key(name: str) -> str:
    return f"{PREFIX}worker:{name}"


def catalog_key(name: str) -> str:
    return f"{PREFIX}catalog:{name}"


def events_key(job_id: str) -> str:
    return f"{PREFIX}ev:{job_id}"


# events_key(id) + GONE_SUFFIX: set with the final event, holding the TTL the job's answer was kept;
# deleted when the answer is read. Still there after the job is gone: the job expired unread (410).
GONE_SUFFIX = ":gone"


def taken_key(job_id: str) -> str:
    return f"{PREFIX}taken:{job_id}"


def webhook_key(delivery_id: str) -> str:
    return f"{PREFIX}webhook:{delivery_id}"


def hooks_key(worker: str) -> str:
    return f"{PENDING_HOOKS}:{worker}"


def worker_client_name(worker: str) -> str:
    """The CLIENT SETNAME of a worker's Redis connections (names allow no spaces)."""
    return "dapi-worker:" + "".join(c if c.isprintable() and not c.isspace() else "_" for c in worker)


def idem_key(caller: str, key: str) -> str:
    """One submit's Idempotency-Key in Redis (backends/base.py ``idempotency_hash``)."""
    from ..base import idempotency_hash

    return f"{PREFIX}idem:" + idempotency_hash(caller, key)


# Redis errors that mean "not reachable now" (down, restarting, loading its AOF, failing over: a
# replica refuses writes), as opposed to a bug: callers wait and retry these, or answer 503.
UNAVAILABLE: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError,
                                                redis.exceptions.ReadOnlyError)


def connect(url: str, *, client_name: str | None = None, asyncio: bool = False, **kw):
    """A Redis client for ``redis://`` / ``rediss://`` / ``unix://`` URLs, and for Sentinel:
    ``redis+sentinel://host:port[,host:port...]/service_name[/db]`` (optionally
    ``user:password@`` before the hosts, used for the master): the client asks the sentinels
    for the current master on every (re)connect, so a failover is followed by itself."""
    if not url.startswith("redis+sentinel://"):
        cls = aioredis.Redis if asyncio else redis.Redis
        return cls.from_url(url, client_name=client_name, **kw)
    parsed = urlsplit(url)
    hosts = []
    for hp in parsed.netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = hp.rpartition(":")
        hosts.append((host or hp, int(port or 26379)))
    parts = [p for p in parsed.path.split("/") if p]
    if not parts:
        raise ValueError(f"{url}: a Sentinel URL names its service: redis+sentinel://host:port/service_name[/db]")
    service, db = parts[0], int(parts[1]) if len(parts) > 1 else 0
    auth = {"username": unquote(parsed.username) if parsed.username else None,
            "password": unquote(parsed.password) if parsed.password else None}
    sentinel_kw = {k: kw[k] for k in ("socket_timeout", "socket_connect_timeout") if k in kw}
    if asyncio:
        from redis.asyncio.sentinel import Sentinel as ASentinel

        s = ASentinel(hosts, sentinel_kwargs=sentinel_kw, **sentinel_kw)
    else:
        s = Sentinel(hosts, sentinel_kwargs=sentinel_kw, **sentinel_kw)
    return s.master_for(service, db=db, client_name=client_name, **auth, **kw)


# Appends one event to a job's stream (KEYS[n] below): type, data JSON, MAXLEN.
_XADD = """
local function event(key, type, data, maxlen)
  redis.call('XADD', key, 'MAXLEN', '~', tonumber(maxlen), '*', 'type', type, 'data', data)
end
local function final_event(key, state, maxlen, ttl)
  event(key, 'final', '{"state": "' .. state .. '"}', maxlen)
  redis.call('EXPIRE', key, tonumber(ttl))
  -- the tombstone (GONE_SUFFIX): an unread job that expires answers 410, not 404, for a day more
  redis.call('SET', key .. ':gone', ttl, 'EX', tonumber(ttl) + 86400)
end
"""


# The fair line's Lua (see ``fair:*`` above). Integers written with '%d': Lua's own number
# formatting (%.14g) would round a large pass. An owner's priority/seq order within a queue is one
# score: -priority * 2^40 + seq (exact in a double for priorities of -10..10 and 2^40 submits).
_FAIR = """
local FAIR = 'dapi:fair:'
local function int(x) return string.format('%d', x) end
local function fair_zkey(q, o) return FAIR .. 'q:' .. q .. ':' .. o end
local function fair_pkey(q, o) return q .. string.char(31) .. o end  -- a key's pass in one queue
local function fair_pass(q, o) return tonumber(redis.call('HGET', FAIR .. 'pass', fair_pkey(q, o)) or '0') end
local function fair_add(id, q, o, prio, seq)
  if redis.call('ZCARD', fair_zkey(q, o)) == 0 then  -- (re)joins this queue at its virtual time
    local vt = tonumber(redis.call('HGET', FAIR .. 'vtime', q) or '0')
    if vt > fair_pass(q, o) then redis.call('HSET', FAIR .. 'pass', fair_pkey(q, o), int(vt)) end
  end
  redis.call('HINCRBY', FAIR .. 'nwait', o, 1)
  redis.call('HSET', FAIR .. 'meta', id, cjson.encode({q, o, int(prio), int(seq)}))
  redis.call('ZADD', fair_zkey(q, o), int(-tonumber(prio) * 1099511627776 + tonumber(seq)), id)
  redis.call('SADD', FAIR .. 'owners:' .. q, o)
end
local function fair_remove(id)
  local raw = redis.call('HGET', FAIR .. 'meta', id)
  if not raw then return nil end
  local m = cjson.decode(raw)
  redis.call('HDEL', FAIR .. 'meta', id)
  local z = fair_zkey(m[1], m[2])
  redis.call('ZREM', z, id)
  if redis.call('ZCARD', z) == 0 then redis.call('SREM', FAIR .. 'owners:' .. m[1], m[2]) end
  if redis.call('HINCRBY', FAIR .. 'nwait', m[2], -1) <= 0 then redis.call('HDEL', FAIR .. 'nwait', m[2]) end
  return m
end
-- A queued job starts: it leaves the line and its key's turn is spent (fair.start).
local function fair_started(id)
  local m = fair_remove(id)
  if not m then return end
  local p = fair_pass(m[1], m[2])
  if p > tonumber(redis.call('HGET', FAIR .. 'vtime', m[1]) or '0') then redis.call('HSET', FAIR .. 'vtime', m[1], int(p)) end
  redis.call('HINCRBY', FAIR .. 'pass', fair_pkey(m[1], m[2]),
             tonumber(redis.call('HGET', FAIR .. 'stride', m[2]) or '@SCALE@'))
end
-- The next job of queue q in the fair order (fair.order's head): each key's head job compared by
-- (-priority, the key's pass, seq).
local function fair_pick(q)
  local best, b1, b2, b3
  for _, o in ipairs(redis.call('SMEMBERS', FAIR .. 'owners:' .. q)) do
    local head = redis.call('ZRANGE', fair_zkey(q, o), 0, 0)[1]
    if head then
      local m = cjson.decode(redis.call('HGET', FAIR .. 'meta', head))
      local k1, k2, k3 = -tonumber(m[3]), fair_pass(q, o), tonumber(m[4])
      if not best or k1 < b1 or (k1 == b1 and (k2 < b2 or (k2 == b2 and k3 < b3))) then
        best, b1, b2, b3 = head, k1, k2, k3
      end
    end
  end
  return best
end
-- A key's jobs waiting or running (max_queued): its queued count plus its running jobs (one per worker at most).
local function owner_active(o)
  local n = tonumber(redis.call('HGET', FAIR .. 'nwait', o) or '0')
  for _, id in ipairs(redis.call('HKEYS', 'dapi:running')) do
    if redis.call('HGET', 'dapi:job:' .. id, 'owner') == o then n = n + 1 end
  end
  return n
end
""".replace("@SCALE@", str(fair.SCALE))

# KEYS: job, waiting, running, seq, unsent, idem. ARGV: record, queued status, max jobs, id,
# idempotency window ms (0: no key), owner ('' = none), priority, stride, the owner's max jobs
# queued or running ('' = no limit), the request's fingerprint ('' = none). Returns {seq, id}: seq
# -1 = full, -2 = the owner is at its max (id: its count), 0 = the key's earlier job (its id;
# nothing created), -3 = the key's earlier job was made from another request (its id; nothing created). The key is set in the same step as the job: a submit retried after
# its API node died anywhere in between finds either no job or the job and its key.
_SUBMIT = _FAIR + """
if tonumber(ARGV[5]) > 0 then
  local prior = redis.call('GET', KEYS[6])
  if prior then
    local sep = string.find(prior, '|', 1, true)
    if not sep then return {0, prior} end
    local id = string.sub(prior, 1, sep - 1)
    if ARGV[10] ~= '' and string.sub(prior, sep + 1) ~= ARGV[10] then return {-3, id} end
    return {0, id}
  end
end
local max = tonumber(ARGV[3])
if max > 0 and redis.call('ZCARD', KEYS[2]) + redis.call('HLEN', KEYS[3]) >= max then return {-1, ARGV[4]} end
if ARGV[9] ~= '' then
  local active = owner_active(ARGV[6])
  if active >= tonumber(ARGV[9]) then return {-2, tostring(active)} end
end
local seq = redis.call('INCR', KEYS[4])
local queue = cjson.decode(ARGV[1])['queue'] or ''
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'status', ARGV[2], 'state', QUEUED, 'attempts', 0, 'seq', seq,
           'queue', queue, 'priority', ARGV[7])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'owner', ARGV[6]) end
redis.call('ZADD', KEYS[2], seq, ARGV[4])
redis.call('HSET', FAIR .. 'stride', ARGV[6], ARGV[8])  -- the key's latest share counts
fair_add(ARGV[4], queue, ARGV[6], ARGV[7], seq)
local t = redis.call('TIME')
redis.call('ZADD', KEYS[5], t[1] * 1000 + math.floor(t[2] / 1000), ARGV[4])  -- until mark_sent: no message known yet
redis.call('HSET', KEYS[5] .. ':queue', ARGV[4], queue)  -- its turn is owed to this queue, whatever becomes of the job
if tonumber(ARGV[5]) > 0 then
  redis.call('SET', KEYS[6], ARGV[10] ~= '' and (ARGV[4] .. '|' .. ARGV[10]) or ARGV[4], 'PX', tonumber(ARGV[5]))
  redis.call('HSET', KEYS[1], 'idem', KEYS[6])
end
return {seq, ARGV[4]}
"""

# KEYS: unsent, waiting, running, run_id. ARGV: grace ms, at most this many jobs, the server's run
# id. Scores: Redis time in ms.
# The orphan sweep's claim, atomic: the jobs of ``unsent`` older than the grace period that still
# need a message (queued in the waiting line, or running with no live lease), each moved to now in
# ``unsent`` so that a concurrent sweep (another API node) does not find it again before another
# grace period; the caller publishes each and then removes it (``mark_sent``). If it dies in between,
# the job comes due again. A job that started on another job's turn, ended or is gone (its own
# message never confirmed) leaves its queue one turn short: while that queue has jobs waiting, one
# turn of it is owed ('owed', with {queue}); otherwise the entry is dropped. Running jobs
# whose lease lapsed enter ``unsent`` here first (their owner died; the broker's redelivery normally
# claims them long before their grace is over). Cost: the due entries plus the running jobs (one
# per worker at most), never the whole waiting line. It reads job and lease keys it derives from
# the ids (not in KEYS): one Redis, as everywhere here, not Redis Cluster.
# A new run id (Redis restarted, or a replica took over): its data may lack the last writes before
# the change (AOF's last second, asynchronous replication), e.g. a claim or a finish whose message
# was acknowledged, leaving a waiting job that no message names. Every waiting job is made due at
# once, so each gets one more message; the duplicates are dropped by the claim. Not on the first
# run id seen (an upgrade, a new Redis): nothing can have been lost before it.
_SWEEP = _FAIR + """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local known = redis.call('GET', KEYS[4])
if known ~= ARGV[3] then
  redis.call('SET', KEYS[4], ARGV[3])
  if known then
    for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
      redis.call('ZADD', KEYS[1], now - tonumber(ARGV[1]), id)
    end
  end
end
for _, id in ipairs(redis.call('HKEYS', KEYS[3])) do
  if redis.call('EXISTS', 'dapi:lease:' .. id) == 0 then redis.call('ZADD', KEYS[1], 'NX', now, id) end
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]), 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(due) do
  local job = 'dapi:job:' .. id
  local state = redis.call('HGET', job, 'state')
  local orphan = (state == QUEUED and redis.call('ZSCORE', KEYS[2], id))
              or (state == PROCESSING and redis.call('EXISTS', 'dapi:lease:' .. id) == 0)
  local q = redis.call('HGET', KEYS[1] .. ':queue', id) or redis.call('HGET', job, 'queue')
  if orphan then
    redis.call('ZADD', KEYS[1], now, id)
    out[#out + 1] = id
    out[#out + 1] = redis.call('HGET', job, 'record')
    out[#out + 1] = state
  elseif q and redis.call('SCARD', FAIR .. 'owners:' .. q) > 0 then
    redis.call('ZADD', KEYS[1], now, id)
    out[#out + 1] = id
    out[#out + 1] = cjson.encode({queue = q})
    out[#out + 1] = 'owed'
  else
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[1] .. ':queue', id)
  end
end
return out
"""

# KEYS: job, waiting, running, lease, events, unsent. ARGV: id, worker, lease_ms, max_attempts,
# processing status, exhausted status, ttl, events maxlen, an owner known dead ('' = none: a
# live lease of another worker refuses the claim; that worker: its lease does not)
_CLAIM_FN = _XADD + _FAIR + """
local function claim(KEYS, ARGV)
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= QUEUED and state ~= PROCESSING then return {'final'} end
if state == PROCESSING then
  local owner = redis.call('GET', KEYS[4])
  if owner and owner ~= ARGV[2] and owner ~= ARGV[9] then return {'busy', owner} end
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('ZREM', KEYS[2], ARGV[1])
fair_started(ARGV[1])  -- a queued job starts: its key's turn is spent
-- (unsent keeps the job: a claim says which job starts, not which message came; claim_next
-- removes the message's token)
if attempts > tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'state', ERROR, 'status', ARGV[6], 'final', '1')
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('DEL', KEYS[4])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[7]))
  final_event(KEYS[5], ERROR, ARGV[8], ARGV[7])
  redis.call('PUBLISH', 'dapi:final', ARGV[1])
  return {'exhausted', '0', redis.call('HGET', KEYS[1], 'record')}
end
-- started_n: the cluster-wide order jobs started in (tests and post-mortems compare it with positions)
redis.call('HSET', KEYS[1], 'state', PROCESSING, 'status', ARGV[5], 'worker', ARGV[2],
           'started_n', redis.call('INCR', 'dapi:starts'))
redis.call('HDEL', KEYS[1], 'step', 'total', 'preview', 'preview_step')  -- an earlier attempt's
event(KEYS[5], 'started', '{}', ARGV[8])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('SET', KEYS[4], ARGV[2], 'PX', tonumber(ARGV[3]))
return {'run', tostring(attempts), redis.call('HGET', KEYS[1], 'record')}
end
"""
_CLAIM = _CLAIM_FN + "return claim(KEYS, ARGV)\n"

# KEYS: waiting, running, unsent. ARGV: token, worker, lease_ms, max_attempts, processing status,
# exhausted status, ttl, events maxlen, queue, binding ttl ms.
# A broker message (a turn of its queue) reaches a worker: the job it is bound to ({'bound', id}:
# a redelivery; the caller claims that job as before), or the next job of its queue in the fair
# order, bound to the token and claimed in the same step ({'run', attempt, record, id}); nothing
# queued there: {'none'}. A picked job whose attempts are used up ends here ({'exhausted', '0',
# record, id}) and the token stays unbound: its caller asks again. A token naming a job queued
# before the fair line existed (not in fair:meta) runs that job.
_CLAIM_NEXT = _CLAIM_FN + """
redis.call('ZREM', KEYS[3], ARGV[1])  -- this message exists: the submit that sent it owes nothing
redis.call('HDEL', KEYS[3] .. ':queue', ARGV[1])
local bound = redis.call('GET', 'dapi:bound:' .. ARGV[1])
if bound then return {'bound', bound} end
local id = nil
if redis.call('HGET', 'dapi:job:' .. ARGV[1], 'state') == QUEUED and redis.call('HEXISTS', FAIR .. 'meta', ARGV[1]) == 0
   and redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  id = ARGV[1]
else
  id = fair_pick(ARGV[9])
end
if not id then return {'none'} end
local out = claim({'dapi:job:' .. id, KEYS[1], KEYS[2], 'dapi:lease:' .. id, 'dapi:ev:' .. id, KEYS[3]},
                  {id, ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ''})
if out[1] == 'run' then redis.call('SET', 'dapi:bound:' .. ARGV[1], id, 'PX', tonumber(ARGV[10])) end
out[#out + 1] = id
return out
"""

# KEYS: job, waiting, unsent. ARGV: id. Undo a submit whose broker message was refused.
_FORGET = _FAIR + """
local idem = redis.call('HGET', KEYS[1], 'idem')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[3] .. ':queue', ARGV[1])
fair_remove(ARGV[1])
redis.call('DEL', KEYS[1])
if idem then redis.call('DEL', idem) end
return 1
"""

# ARGV: owner. Its jobs queued or running.
_ACTIVE = _FAIR + "return owner_active(ARGV[1])\n"

# KEYS: job, events. ARGV: worker, status, step ('' = none), total, progress event data, events maxlen
_PROGRESS = _XADD + """
if redis.call('HGET', KEYS[1], 'state') ~= PROCESSING or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'step', ARGV[3], 'total', ARGV[4]) end
event(KEYS[2], 'progress', ARGV[5], ARGV[6])
return 1
"""

# KEYS: job, events. ARGV: worker, preview (base64 JPEG), its step, preview event data, events maxlen
_PREVIEW = _XADD + """
if redis.call('HGET', KEYS[1], 'state') ~= PROCESSING or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'preview', ARGV[2], 'preview_step', ARGV[3])
event(KEYS[2], 'preview', ARGV[4], ARGV[5])
return 1
"""

# KEYS: job, running, lease, events, waiting, unsent. ARGV: id, worker, state, status, ttl, events
# maxlen, image bytes... Only the job's owner ends it, with two exceptions that keep a result:
# the same finish again (its reply was lost to a Redis blip: 1, nothing changes), and a job that
# is queued again because Redis lost the claim (a restart from AOF's last second, a failover
# whose replica had not got it): no other worker holds it, so the result stands.
_FINISH = _XADD + _FAIR + """
local state = redis.call('HGET', KEYS[1], 'state')
if is_final(state) and redis.call('HGET', KEYS[1], 'final_by') == ARGV[2] then return 1 end
if not ((state == PROCESSING and redis.call('HGET', KEYS[1], 'worker') == ARGV[2])
        or (state == QUEUED and redis.call('ZSCORE', KEYS[5], ARGV[1]))) then
  return 0
end
redis.call('ZREM', KEYS[5], ARGV[1])
fair_remove(ARGV[1])
if tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') < 1 then redis.call('HSET', KEYS[1], 'attempts', 1) end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'status', ARGV[4], 'final', '1', 'final_by', ARGV[2],
           'worker', ARGV[2], 'n_images', #ARGV - 6)
redis.call('HDEL', KEYS[1], 'step', 'total', 'preview', 'preview_step')
for i = 7, #ARGV do redis.call('HSET', KEYS[1], 'img:' .. (i - 7), ARGV[i]) end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
final_event(KEYS[4], ARGV[3], ARGV[6], ARGV[5])
redis.call('PUBLISH', 'dapi:final', ARGV[1])
return 1
"""

# KEYS: job. ARGV: the record without its input images. Only a final job's record changes: it
# never runs again (written once at submit, the record is not changed by anything else).
_DROP_INPUTS = """
if redis.call('HGET', KEYS[1], 'final') ~= '1' then return 0 end
redis.call('HSET', KEYS[1], 'record', ARGV[1])
return 1
"""

# KEYS: job, running, lease, waiting. ARGV: id, worker, queued status. A graceful stop gives the job back.
_RELEASE = _FAIR + """
if redis.call('HGET', KEYS[1], 'state') ~= PROCESSING or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[2] then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
redis.call('HSET', KEYS[1], 'state', QUEUED, 'status', ARGV[3])
redis.call('HDEL', KEYS[1], 'worker', 'step', 'total', 'preview', 'preview_step')
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq'))
redis.call('ZADD', KEYS[4], seq, ARGV[1])
fair_add(ARGV[1], redis.call('HGET', KEYS[1], 'queue') or '', redis.call('HGET', KEYS[1], 'owner') or '',
         redis.call('HGET', KEYS[1], 'priority') or '0', seq)
return 1
"""

# KEYS: job, waiting, events, pending hooks, unsent. ARGV: id, cancelled status, ttl, events maxlen,
# the job's cancelled webhook ('' = none; no worker will see this job run, one sends it)
_CANCEL = _XADD + _FAIR + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local state = redis.call('HGET', KEYS[1], 'state')
if state == QUEUED then
  redis.call('HSET', KEYS[1], 'state', CANCELLED, 'status', ARGV[2], 'final', '1')
  redis.call('ZREM', KEYS[2], ARGV[1])
  fair_remove(ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[1])  -- it leaves the line: its turn, if never sent, is owed to no one
  redis.call('HDEL', KEYS[5] .. ':queue', ARGV[1])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
  final_event(KEYS[3], CANCELLED, ARGV[4], ARGV[3])
  if ARGV[5] ~= '' then redis.call('LPUSH', KEYS[4], ARGV[5]) end
  redis.call('PUBLISH', 'dapi:final', ARGV[1])
  return CANCELLED
elseif state == PROCESSING then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  return 'cancelling'
end
return state
"""

# KEYS: job, taken, events. ARGV: retention ms. The final response, read and deleted in one step:
# exactly one caller gets it. A job that had a listener keeps its hash (renamed: no copy of the
# images) and its events for ``retention``, so that every listener gets the final event.
_TAKE = """
if redis.call('HGET', KEYS[1], 'final') ~= '1' then return false end
local all = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[3] .. ':gone')  -- read: from now on an unknown id (404), not an expired one
if redis.call('HGET', KEYS[1], 'listened') == '1' and tonumber(ARGV[1]) > 0 then
  redis.call('RENAME', KEYS[1], KEYS[2])
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[1]))
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[1]))
else
  redis.call('DEL', KEYS[1], KEYS[3])
end
return all
"""

# KEYS: job, taken. A listener comes: 'job' (marked listened) | 'taken' (its final copy) | nil (404).
_LISTEN = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'listened', '1')
  return 'job'
end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'taken' end
return false
"""

# KEYS: job, lease. ARGV: worker, lease ms. Renewed only while the job is this worker's: a worker
# that was taken for dead (and lost its job) must not overwrite the new owner's lease.
_RENEW = """
if redis.call('HGET', KEYS[1], 'state') ~= PROCESSING or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', tonumber(ARGV[2]))
return 1
"""

# KEYS: worker info, workers, catalog (or ''). ARGV: name, info JSON, ttl, catalog JSON (or '')
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
redis.call('ZADD', KEYS[2], now, ARGV[1])
if ARGV[4] ~= '' then redis.call('SET', KEYS[3], ARGV[4], 'EX', tonumber(ARGV[3])) return {tostring(now), 1} end
-- A live worker's catalog lives with it; 0: it is gone (a Redis that lost it), send it again.
return {tostring(now), redis.call('EXPIRE', KEYS[3], tonumber(ARGV[3]))}
"""


def status_dict(state: str, phase: str | None = None, progress: float = 0.0, **extra) -> dict:
    return {"state": state, "current_phase": phase or state, "progress": progress, **extra}


def _s(v) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


def _final_of(fields: dict) -> tuple[dict, list[bytes]]:
    n = int(fields.get("n_images") or 0)
    return json.loads(fields["status"]), [fields[f"img:{i}"] for i in range(n)]


class RedisJobState:
    """All Redis reads and writes of the Celery backend, for API nodes and workers alike."""

    def __init__(self, url: str, *, results_ttl: int = 3600, max_attempts: int = MAX_ATTEMPTS, retention: float = 300.0,
                 client_name: str | None = None):
        self.url = url
        self.replicated = url.startswith("redis+sentinel://")
        # client_name: a worker's connections carry its name, so that its death is seen at once
        # (``owner_connected``). Short timeouts: a Redis that is down is answered with a 503
        # (API) or waited out (worker) without hanging a request for long.
        self.r = connect(url, client_name=client_name, socket_timeout=5, socket_connect_timeout=2,
                         health_check_interval=30)
        self.results_ttl = results_ttl
        self.max_attempts = max_attempts
        self.retention = retention  # seconds a taken job's final answer stays for its listeners
        self._submit = self.r.register_script(lua_prelude() + _SUBMIT)
        self._claim = self.r.register_script(lua_prelude() + _CLAIM)
        self._claim_next = self.r.register_script(lua_prelude() + _CLAIM_NEXT)
        self._forget = self.r.register_script(lua_prelude() + _FORGET)
        self._active = self.r.register_script(lua_prelude() + _ACTIVE)
        self._progress = self.r.register_script(lua_prelude() + _PROGRESS)
        self._finish = self.r.register_script(lua_prelude() + _FINISH)
        self._release = self.r.register_script(lua_prelude() + _RELEASE)
        self._cancel = self.r.register_script(lua_prelude() + _CANCEL)
        self._take = self.r.register_script(lua_prelude() + _TAKE)
        self._listen = self.r.register_script(lua_prelude() + _LISTEN)
        self._preview = self.r.register_script(lua_prelude() + _PREVIEW)
        self._heartbeat = self.r.register_script(lua_prelude() + _HEARTBEAT)
        self._sweep = self.r.register_script(lua_prelude() + _SWEEP)
        self._renew = self.r.register_script(lua_prelude() + _RENEW)
        self._drop_inputs = self.r.register_script(_DROP_INPUTS)

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
        seq, _ = self.create_once(job_id, record, max_jobs)
        return seq

    def create_once(self, job_id: str, record: dict, max_jobs: int, idem: str | None = None,
                    window_sec: float = 0, owner: str | None = None, priority: int = 0, share: float = 1.0,
                    owner_max: int | None = None, fingerprint: str | None = None) -> tuple[int | None, str]:
        """``create`` with an idempotency key (``idem_key``) and the job's owner (a field of its
        own: isolation reads only that), its place in the fair line (``priority``, the owner's
        ``share``) and the owner's ``max_queued`` (``owner_max``, checked in the same step, so
        API nodes submitting at once cannot pass it): (seq, job_id) for a new job, (0, the
        earlier job's id) when the key was used within ``window_sec`` (-3 when with another
        ``fingerprint``), (None, job_id) when full, (-2, the owner's count of jobs) when the owner
        is at ``owner_max``."""
        ttl = int(window_sec * 1000) if idem else 0
        keys = [job_key(job_id), WAITING, RUNNING, SEQ, UNSENT, idem or PREFIX + "noidem"]
        args = [json.dumps(record), json.dumps(status_dict("queued")), max_jobs, job_id, ttl, owner or "",
                int(priority), fair.stride(share), "" if owner_max is None else int(owner_max), fingerprint or ""]
        if not self.replicated:
            seq, jid = self._submit(keys=keys, args=args)
        else:
            # With Sentinel, a replica takes over when the primary dies; replication is asynchronous,
            # so the submit answers only once a replica has the job too (WAIT, on the connection that
            # wrote it: one pipeline). No replica within the time: accepted anyway (the primary has
            # it, with AOF), and logged: a failover now could lose it.
            p = self.r.pipeline(transaction=False)
            self._submit(keys=keys, args=args, client=p)
            p.wait(1, REPLICA_WAIT_MS)
            (seq, jid), acked = p.execute()
            if int(seq) > 0 and not acked:
                log.warning("job %s: no replica confirmed it within %d ms", job_id, REPLICA_WAIT_MS)
        seq = int(seq)
        return (None if seq == -1 else seq), _s(jid)

    def idem_entry(self, idem: str) -> tuple[str, str | None] | None:
        """(job id, request fingerprint or None) an idempotency key (``idem_key``) names, if live."""
        raw = _s(self.r.get(idem))
        if not raw:
            return None
        job_id, _, fp = raw.partition("|")
        return job_id, fp or None

    def forget(self, job_id: str) -> None:
        """Undo create() (the broker refused the message), with its idempotency key."""
        self._forget(keys=[job_key(job_id), WAITING, UNSENT], args=[job_id])

    def mark_sent(self, job_id: str) -> None:
        """The broker confirmed a message for the job: the orphan sweep leaves it alone. One
        round trip (submit's hot path); on an entry already removed it changes nothing."""
        p = self.r.pipeline()
        p.zrem(UNSENT, job_id)
        p.hdel(UNSENT_QUEUE, job_id)
        p.execute()

    def sweep_orphans(self, grace_sec: float, limit: int = 100) -> list[tuple[str, dict, str]]:
        """Claims the jobs that need a (new) broker message: recorded longer than ``grace_sec``
        ago and never confirmed sent, or running with a lapsed lease for that long. Each is
        returned to exactly one caller per grace period, (job id, record, state): 'queued' (publish
        a turn of its queue), 'processing' (a message that resumes it) or 'owed' (the job started
        on another job's turn or is gone, and its queue still has jobs waiting: a turn of
        ``record["queue"]``); then ``mark_sent``."""
        run_id = self.r.info("server").get("run_id", "")
        flat = self._sweep(keys=[UNSENT, WAITING, RUNNING, RUN_ID], args=[max(0, int(grace_sec * 1000)), limit, run_id])
        return [(_s(flat[i]), json.loads(flat[i + 1]), _s(flat[i + 2])) for i in range(0, len(flat), 3)]

    def unsent_ids(self) -> list[str]:
        return [_s(j) for j in self.r.zrange(UNSENT, 0, -1)]

    def status(self, job_id: str) -> tuple[dict | None, int | None]:
        """(status dict, position): position 0 while running, 1, 2, ... while queued, else None.
        While running, the status has the latest ``preview``/``preview_step`` and the sampler's
        ``step``/``total`` when the worker reported them."""
        p = self.r.pipeline(transaction=True)
        p.hmget(job_key(job_id), "status", "state", "preview", "preview_step", "step", "total")
        p.zrank(WAITING, job_id)
        (raw, state, preview, preview_step, step, total), rank = p.execute()
        if raw is None:
            return None, None
        st = json.loads(raw)
        state = _s(state)
        if rank is not None:
            line = self.fair_line()
            return st, (line.index(job_id) + 1 if job_id in line else rank + 1)
        if state != "processing":
            return st, None
        if preview is not None:
            st.update(preview=_s(preview), preview_step=int(preview_step))
        if step is not None:
            st.update(step=int(step), total=int(total))
        return st, 0

    def position(self, job_id: str) -> int | None:
        return self.status(job_id)[1]

    CANCELLED_STATUS = status_dict(CANCELLED, error="cancelled by request")

    def cancel(self, job_id: str, hook: dict | None = None) -> str | None:
        """``hook``: the webhook to send if this cancels a queued job (JSON {job_id, state, hook,
        body}); a worker sends it (``next_pending_hook``)."""
        out = self._cancel(keys=[job_key(job_id), WAITING, events_key(job_id), PENDING_HOOKS, UNSENT],
                           args=[job_id, json.dumps(self.CANCELLED_STATUS), self.results_ttl, EVENTS_MAXLEN,
                                 json.dumps(hook) if hook else ""])
        if out and _s(out) == CANCELLED:
            self.drop_inputs(job_id)
        return _s(out) if out else None

    def drop_inputs(self, job_id: str) -> bool:
        """A final job's input images (init images, ControlNet / IP-Adapter unit images: often
        megabytes of base64) leave its record, which stays until the result is taken or expires.
        Best effort: on a Redis error they leave with the record."""
        from ...resolve import without_inputs

        try:
            record = self.record(job_id)
            payload = without_inputs((record or {}).get("payload"))
            if payload is None:
                return False
            return bool(self._drop_inputs(keys=[job_key(job_id)], args=[json.dumps({**record, "payload": payload})]))
        except redis.RedisError as e:
            log.warning("could not drop the inputs of job %s: %s", job_id, e)
            return False

    def record(self, job_id: str) -> dict | None:
        raw = self.r.hget(job_key(job_id), "record")
        return json.loads(raw) if raw else None

    def take_final(self, job_id: str) -> tuple[dict, list[bytes]] | None:
        """The final status and image bytes, exactly once across all callers; None if not final/unknown."""
        flat = self._take(keys=[job_key(job_id), taken_key(job_id), events_key(job_id)],
                          args=[int(self.retention * 1000)])
        if not flat:
            return None
        return _final_of({_s(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)})

    def expired_unread(self, job_id: str) -> float | None:
        """The TTL an unread final answer was kept before it expired; None when the job exists,
        was read, or never was."""
        ttl = self.r.get(events_key(job_id) + GONE_SUFFIX)
        if ttl is None or self.r.exists(job_key(job_id), taken_key(job_id)):
            return None
        return float(ttl)

    def taken(self, job_id: str) -> tuple[dict, list[bytes]] | None:
        """The final status and images of a job taken while it had a listener (for the other
        listeners), within ``retention`` of the take; None otherwise."""
        fields = {_s(k): v for k, v in self.r.hgetall(taken_key(job_id)).items()}
        return _final_of(fields) if fields.get("final") == b"1" else None

    def listen(self, job_id: str) -> str | None:
        """A listener comes: 'job' (now marked listened), 'taken' (its final answer is kept), None (unknown)."""
        out = self._listen(keys=[job_key(job_id), taken_key(job_id)])
        return _s(out) if out else None

    def is_final(self, job_id: str) -> bool | None:
        """True when final, False while queued/running, None when unknown (or already taken)."""
        final, exists = self.r.hget(job_key(job_id), "final"), None
        if final is not None:
            return True
        exists = self.r.exists(job_key(job_id))
        return False if exists else None

    def fair_line(self) -> list[str]:
        """Queued job ids in the order they start if nothing else arrives (``jobs/fair.py``'s rule
        over the fair line's state, read in one step): queue positions. Each model queue is a
        line of its own: exact for one queue; with several, each queue's jobs start in this order
        relative to each other, and the queues' orders are merged by rank (then submit order),
        since which queue goes next depends on which worker is free."""
        p = self.r.pipeline(transaction=True)
        p.zrange(WAITING, 0, -1, withscores=True)
        p.hgetall(FAIR_META)
        p.hgetall(FAIR_PASS)
        p.hgetall(FAIR_STRIDE)
        waiting, meta, passes, strides = p.execute()
        per_queue: dict[str, list[fair.Waiting]] = {}
        for jid, score in waiting:
            m = meta.get(jid)
            if m is None:  # queued before the fair line existed: it runs in submit order, as then
                per_queue.setdefault("", []).append(fair.Waiting(_s(jid), "", 0, int(score)))
            else:
                queue, owner, priority, seq = json.loads(m)
                per_queue.setdefault(queue, []).append(fair.Waiting(_s(jid), owner, int(priority), int(seq)))
        pass_of: dict[str, dict[str, int]] = {}
        for k, v in passes.items():
            queue, _, owner = _s(k).partition("\x1f")
            pass_of.setdefault(queue, {})[owner] = int(v)
        strides = {_s(k): int(v) for k, v in strides.items()}
        seq_of = {w.job_id: w.seq for ws in per_queue.values() for w in ws}
        ranked = []
        for queue, ws in per_queue.items():
            for rank, jid in enumerate(fair.order(ws, pass_of.get(queue, {}), strides)):
                ranked.append((rank, seq_of[jid], jid))
        return [jid for _, _, jid in sorted(ranked)]

    def active_count(self, owner: str | None) -> int:
        """The owner's jobs queued or running (``max_queued``), as the submit script counts them."""
        return int(self._active(keys=[], args=[owner or ""]))

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
    def claim(self, job_id: str, worker: str, lease_sec: float, dead_owner: str = "") -> tuple[str, int, dict | None]:
        """('run', attempt, record) | ('exhausted', 0, record) | ('busy', 0, owner) |
        ('final'|'gone', 0, None). ``dead_owner``: a worker known dead, whose lease does not count."""
        exhausted = self.exhausted_status()
        out = self._claim(keys=[job_key(job_id), WAITING, RUNNING, lease_key(job_id), events_key(job_id), UNSENT],
                          args=[job_id, worker, int(lease_sec * 1000), self.max_attempts,
                                json.dumps(status_dict("processing", "starting")), json.dumps(exhausted),
                                self.results_ttl, EVENTS_MAXLEN, dead_owner])
        verdict = _s(out[0])
        if verdict == "exhausted":
            self.drop_inputs(job_id)
        if verdict in ("run", "exhausted"):
            return verdict, int(out[1]), json.loads(out[2])
        if verdict == "busy":
            return verdict, 0, _s(out[1])
        return verdict, 0, None

    def claim_next(self, token: str, queue: str, worker: str, lease_sec: float) -> tuple[str, int, dict | str | None, str | None]:
        """A broker message ``token`` (a turn of ``queue``) reaches ``worker``: (verdict, attempt,
        record, job id). 'run': the next job of the queue in the fair order, claimed and bound to
        the token; 'exhausted': that job ran out of attempts (ended; ask again); 'bound': the
        token already started the job (a redelivery: ``claim`` it); 'none': nothing queued there."""
        out = self._claim_next(keys=[WAITING, RUNNING, UNSENT],
                               args=[token, worker, int(lease_sec * 1000), self.max_attempts,
                                     json.dumps(status_dict("processing", "starting")),
                                     json.dumps(self.exhausted_status()), self.results_ttl, EVENTS_MAXLEN, queue,
                                     int(max(self.results_ttl, BOUND_TTL_SEC) * 1000)])
        verdict = _s(out[0])
        if verdict in ("run", "exhausted"):
            return verdict, int(out[1]), json.loads(out[2]), _s(out[3])
        if verdict == "bound":
            return verdict, 0, None, _s(out[1])
        return verdict, 0, None, None

    def owner_connected(self, worker: str) -> bool | None:
        """Whether ``worker`` holds a connection to Redis now (a worker's connections are named
        after it; its heartbeat and cancel checks keep one open while it runs a job). False is
        "known dead": a killed process's connections close with it. None when that cannot be
        told: Redis started too recently for a live worker to have reconnected, or CLIENT LIST
        is not allowed."""
        try:
            if int(self.r.info("server").get("uptime_in_seconds", 0)) < RECONNECT_GRACE_SEC:
                return None
            clients = self.r.client_list(_type="normal")
        except redis.ResponseError:
            return None
        return any(c.get("name") == worker_client_name(worker) for c in clients)

    def exhausted_status(self) -> dict:
        return status_dict(ERROR, error=attempts_exhausted_message(self.max_attempts))

    def progress(self, job_id: str, worker: str, status: dict, step: int | None = None,
                 total: int | None = None) -> bool:
        """The running job's status, sampler step and a ``progress`` event, in one step."""
        data = progress_event(status["progress"], status["current_phase"], step, total)
        return bool(self._progress(keys=[job_key(job_id), events_key(job_id)],
                                   args=[worker, json.dumps(status), "" if step is None else step,
                                         "" if total is None else total, json.dumps(data), EVENTS_MAXLEN]))

    def preview(self, job_id: str, worker: str, b64: str, step: int, total: int | None) -> bool:
        """The running job's latest preview (base64 JPEG) and a ``preview`` event, in one step."""
        data = {"image": b64, "step": step, "total": total}
        return bool(self._preview(keys=[job_key(job_id), events_key(job_id)],
                                  args=[worker, b64, step, json.dumps(data), EVENTS_MAXLEN]))

    def cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(job_key(job_id), "cancel") is not None

    def finish(self, job_id: str, worker: str, status: dict, images: list[bytes] = ()) -> bool:
        done = bool(self._finish(keys=[job_key(job_id), RUNNING, lease_key(job_id), events_key(job_id), WAITING, UNSENT],
                                 args=[job_id, worker, status["state"], json.dumps(status), self.results_ttl,
                                       EVENTS_MAXLEN, *images]))
        if done:
            self.drop_inputs(job_id)
        return done

    def release(self, job_id: str, worker: str) -> bool:
        """Give a running job back to the waiting line (graceful stop; not counted as an attempt)."""
        return bool(self._release(keys=[job_key(job_id), RUNNING, lease_key(job_id), WAITING],
                                  args=[job_id, worker, json.dumps(status_dict("queued"))]))

    def renew_lease(self, job_id: str, worker: str, lease_sec: float) -> bool:
        return bool(self._renew(keys=[job_key(job_id), lease_key(job_id)], args=[worker, int(lease_sec * 1000)]))

    def heartbeat(self, name: str, info: dict, ttl: int, catalog: dict | None = None) -> bool:
        """The worker's beat (and its catalog when given, else the published one kept alive).
        False when Redis has no catalog of it (lost with a restart or failover): send it again."""
        _, has_catalog = self._heartbeat(keys=[worker_key(name), WORKERS, catalog_key(name)],
                                         args=[name, json.dumps(info), ttl,
                                               json.dumps(catalog) if catalog is not None else ""])
        return bool(int(has_catalog))

    def next_pending_hook(self, worker: str, leftover: bool = False) -> bytes | None:
        """A webhook no worker ran (see ``hooks``), moved to this worker's own list until
        ``pending_hook_done``: a worker that dies in between finds it there again (``leftover``)."""
        if leftover:
            return self.r.lindex(hooks_key(worker), -1)
        return self.r.lmove(PENDING_HOOKS, hooks_key(worker), "RIGHT", "LEFT")

    def pending_hook_done(self, worker: str, raw: bytes) -> None:
        self.r.lrem(hooks_key(worker), -1, raw)

    def mirror_webhook(self, record: dict, ttl: float) -> None:
        self.r.set(webhook_key(record["id"]), json.dumps(record), ex=max(1, int(ttl)))

    def webhooks(self) -> list[dict]:
        """The workers' webhook delivery records (pending ones and recently finished), oldest first."""
        keys = list(self.r.scan_iter(webhook_key("*"), count=500))
        records = [json.loads(v) for v in (self.r.mget(keys) if keys else []) if v]
        records.sort(key=lambda r: r.get("created_at", 0))
        return [{k: v for k, v in r.items() if k != "created_at"} for r in records]

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
    r = connect(url, socket_connect_timeout=1)
    while True:
        try:
            r.ping()
            return
        except redis.RedisError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
