"""The job backend of a cluster: Celery (RabbitMQ, or Redis) carries jobs to GPU workers; Redis
holds their state, progress and results. Any API node answers for any job.

An API node is stateless: submit records the job in Redis (one atomic script: capacity and
per-key checks, record, place in the cluster-wide fair line), publishes one persistent message to
the queue of its model, then marks the job sent (``mark_sent``). The message is a turn of that
queue, not the job: the worker that gets it starts the queue's next job in the fair order
(docs/tenants.md "Scheduling", ``state.claim_next``), so the order holds whatever the number of
workers; everything else (status, position,
cancel, the final response) is a read or a script on Redis. See ``cluster/state.py`` for the keys
and ``cluster/worker.py`` for the other side.

Orphans: an API node that dies between recording a job and the broker's confirm leaves a job that
no message will deliver. Every API node runs an orphan sweep (``_sweep``) that re-publishes such a
job after ``orphan_grace_sec``; see ``_sweep`` for why here and not on the workers.

Live progress: the event stream of a job (``events``) follows its Redis stream with blocking
reads, so any API node serves any listener, with the stream's ids as event ids (a reconnect
resumes after its ``Last-Event-ID``). Webhooks are sent by the workers (``delivers_webhooks``).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import uuid

import kombu.exceptions
import redis
import redis.asyncio as aioredis

from .catalog import CatalogRegistry
from .celery_app import TASK_NAME, make_celery, make_queue, queue_name
from .state import (FINAL_CHANNEL, FINAL_EVENT, UNAVAILABLE, RedisJobState, connect, events_key, idem_key,
                    job_key)
from ... import observe
from ...events import JobEvent
from ...status import FINAL_STATES, JobStatus
from ...states import MAX_ATTEMPTS
from ....errors import IdempotencyConflict, RateLimited
from ..base import BackendUnavailable, FinalJob, FinalWaiters, JobBackend, JobOwner, QueueEntry, QueueFull
from .ledger import RedisLedger

log = logging.getLogger(__name__)

QUEUED_POLL_MS = 500  # a queued job's position is read again this often (its stream starts at claim)
BLOCK_MS = 5000       # the longest blocking stream read: bounds how long a job that vanished goes unnoticed
# An open event stream rides out a Redis outage this long (reading again where it was), then ends:
# the client reconnects with its Last-Event-ID and misses nothing, the final event included.
STREAM_OUTAGE_SEC = 60.0
# An event id: the stream id of the job's last stored event, and for a (synthetic, unstored)
# ``queued`` event after it ".<n>.<position>".
_EVENT_ID = re.compile(r"^(\d+-\d+)(?:\.(\d+)\.(\d+))?$")


def cluster_readiness(settings, state: RedisJobState, *, need_workers: bool) -> dict[str, str | None]:
    """``/readyz``'s checks on a cluster node: Redis answers, the broker accepts a connection and
    (API nodes) at least one worker's heartbeat is live. Each check is one round trip."""
    checks: dict[str, str | None] = {}
    try:
        state.ping()
        checks["redis"] = None
    except (redis.RedisError, OSError) as e:
        checks["redis"] = f"Redis unreachable: {e}"
    checks["broker"] = broker_problem(settings.broker_url)
    if need_workers:
        if checks["redis"] is not None:
            checks["workers"] = "unknown (Redis unreachable)"
        else:
            dead_after = 3 * settings.worker_heartbeat_sec
            alive = [w for w in state.workers() if w["heartbeat_age"] <= dead_after]
            checks["workers"] = None if alive else "no live worker (none has sent a heartbeat recently)"
    return checks


def broker_problem(url: str, timeout: float = 2.0) -> str | None:
    """None when the broker accepts a connection, else why not."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
        return None
    except Exception as e:  # noqa: BLE001 - kombu raises a different class per transport
        return f"broker unreachable: {type(e).__name__}: {e}"


def _parse_event_id(event_id: str | None) -> tuple[str, int, int | None]:
    """(stream id to read after, queued events sent after it, last position sent); an id this
    backend did not make replays from the start."""
    m = _EVENT_ID.match(event_id or "")
    if not m:
        return "0-0", 0, None
    return m.group(1), int(m.group(2) or 0), int(m.group(3)) if m.group(3) else None


class RedisBlobs:
    """JobBackend.shared_blobs on the cluster's Redis: every API node reads what one wrote."""
    PREFIX = "dapi:blob:"

    def __init__(self, r):
        self.r = r

    def put(self, name: str, data: bytes, ttl: float) -> None:
        try:
            self.r.set(self.PREFIX + name, data, ex=max(1, int(ttl)))
        except redis.RedisError as e:
            raise BackendUnavailable(f"the job state store (Redis) is unavailable: {e}") from e

    def get(self, name: str) -> bytes | None:
        try:
            return self.r.get(self.PREFIX + name)
        except redis.RedisError as e:
            raise BackendUnavailable(f"the job state store (Redis) is unavailable: {e}") from e


class _Outage:
    """An event feed's Redis outage: how long it has lasted, and the wait before reading again."""

    def __init__(self, job_id: str):
        self.job_id, self.since = job_id, None

    async def wait(self, error: Exception) -> bool:
        """False when the outage has lasted STREAM_OUTAGE_SEC: the feed ends (the client
        reconnects with its Last-Event-ID)."""
        now = time.monotonic()
        self.since = self.since or now
        if now - self.since > STREAM_OUTAGE_SEC:
            log.warning("job %s: event stream ended, Redis unreachable for %.0f s (%s)", self.job_id,
                        now - self.since, error)
            return False
        await asyncio.sleep(0.5)
        return True

    def over(self) -> None:
        self.since = None


class CeleryBackend(JobBackend):
    delivers_webhooks = True  # by the workers (cluster/worker.py); checked at submit here as everywhere
    # Redis or the broker unreachable: every route answers 503 + Retry-After (main.py), not 500.
    unavailable_errors = (*UNAVAILABLE, kombu.exceptions.OperationalError)

    def __init__(self, settings):
        self.settings = settings
        self.state = RedisJobState(settings.redis_url, results_ttl=settings.results_ttl_sec, max_attempts=MAX_ATTEMPTS,
                                   retention=settings.events_retention_sec)
        self._aredis: aioredis.Redis | None = None  # the event streams' connections, on the event loop
        self._aredis_loop = None
        self.celery = make_celery(settings)
        self.catalog = CatalogRegistry(settings, self.state)
        self.ledger = RedisLedger(self.state.r)  # per-key limits and usage, shared by the cluster
        self._waiters = FinalWaiters()
        self._stopping = threading.Event()
        self._listener: threading.Thread | None = None
        self._sweeper: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._waiters.bind()
        self._listener = threading.Thread(target=self._listen, name="diffusionapi-final-listener", daemon=True)
        self._listener.start()
        self._sweeper = threading.Thread(target=self._sweep, name="diffusionapi-orphan-sweep", daemon=True)
        self._sweeper.start()

    def stop(self) -> None:
        self._stopping.set()
        self.state.close()
        if self._aredis is not None:
            try:
                asyncio.get_running_loop().create_task(self._aredis.aclose())
            except RuntimeError:  # not on a loop: its connections go with the process
                pass

    def _listen(self) -> None:
        """One subscription per API node: wakes the long-polls of jobs that became final."""
        while not self._stopping.is_set():
            try:
                pubsub = self.state.r.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(FINAL_CHANNEL)
                while not self._stopping.is_set():
                    msg = pubsub.get_message(timeout=1.0)
                    if msg and msg.get("type") == "message":
                        job_id = msg["data"].decode() if isinstance(msg["data"], bytes) else msg["data"]
                        if self._waiters.waiting_for(job_id):
                            self._waiters.notify(job_id)
            except (redis.RedisError, OSError, ValueError) as e:
                if self._stopping.is_set():
                    return
                log.warning("final-event subscription lost (%s); resubscribing", e)
                time.sleep(0.5)

    def _sweep(self) -> None:
        """Re-publishes orphaned jobs (``RedisJobState.sweep_orphans``): recorded but never confirmed
        sent (this or another API node died between ``create`` and the broker's confirm), or
        running with a lapsed lease that no redelivery claimed. Every API node sweeps every few
        seconds (one Lua call, cheap whatever the queue length); the script hands each orphan to one
        sweeper per grace period, so nodes sweeping at once publish it once.

        Why on the API nodes and not in the workers' heartbeat: orphans come from API nodes dying,
        and publishing is the API side's job (its Celery app publishes with confirms and a short
        retry policy). The workers' heartbeat thread renews the running job's lease: a publish that
        blocks there while the broker is down would let a live worker's lease lapse and its job
        be taken over. Its own thread, not the final-event listener's: a slow publish must not
        delay the long-polls' wake-ups. With no API node up, orphans wait for the first to start
        (and no client can collect a result meanwhile anyway)."""
        grace = self.settings.orphan_grace_sec
        every = min(5.0, max(0.2, grace / 4))
        while not self._stopping.wait(every):
            try:
                for job_id, record, state in self.state.sweep_orphans(grace):
                    if self._stopping.is_set():
                        return
                    # A new token: the job's own may have been taken as a turn for another job. A
                    # running job's message resumes it (its worker died); a queued one's is a turn.
                    queue = record.get("queue") or queue_name(None)
                    self._publish(str(uuid.uuid4()), queue, resume=job_id if state == "processing" else None)
                    if state == "owed":
                        log.warning("job %s: started or ended, and no message of its own is known to have "
                                    "reached a worker; one more turn of %s published (a spare one starts the "
                                    "next job or nothing)", job_id, queue)
                    else:
                        log.warning("job %s: no broker message confirmed after %.0f s; published again",
                                    job_id, grace)
                    if state != "processing":
                        # A resumed job stays: if its submit's own message was lost too, the next
                        # sweep owes its queue that turn (or drops the entry when none is waiting).
                        self.state.mark_sent(job_id)
            except Exception as e:  # noqa: BLE001 - Redis or the broker down: the jobs come due again
                if self._stopping.is_set():
                    return
                log.warning("orphan sweep failed (%s); retrying", e)

    def _publish(self, token: str, queue: str, resume: str | None = None) -> None:
        """One turn of ``queue`` (the task id: its token), or with ``resume`` the message that
        resumes that running job."""
        kwargs = {"queue": queue} if resume is None else {"queue": queue, "resume": resume}
        self.celery.send_task(TASK_NAME, args=[token], kwargs=kwargs, queue=make_queue(queue), task_id=token)

    async def wait_final(self, job_id: str, timeout: float) -> None:
        await self._waiters.wait(job_id, timeout, lambda: self.state.is_final(job_id) is not False)

    # ------------------------------------------------------------------ jobs
    def keyed_job(self, owner: str | None, idempotency_key: str) -> tuple[str, str | None] | None:
        try:
            return self.state.idem_entry(idem_key(owner or "", idempotency_key))
        except redis.RedisError as e:
            raise BackendUnavailable(f"the job state store (Redis) is unavailable: {e}") from e

    def submit(self, kind: str, payload: dict, owner: JobOwner | None = None,
               idempotency_key: str | None = None, fingerprint: str | None = None) -> str:
        job_id = str(uuid.uuid4())
        queue = queue_name(payload.get("model"))
        owner = owner or JobOwner()
        owner_name = owner.name
        record = {"kind": kind, "payload": payload, "queue": queue, "created_at": time.time(), "owner": owner_name}
        idem = idem_key(owner_name or "", idempotency_key) if idempotency_key else None
        try:
            # The owner goes beside the record (isolation reads only that field), its place in the
            # fair line and its max_queued check (atomic across API nodes) in the same script.
            seq, got = self.state.create_once(job_id, record, self.settings.max_queued_jobs, idem,
                                              self.settings.idempotency_window_sec, owner=owner_name,
                                              priority=owner.priority, share=owner.share,
                                              owner_max=owner.max_queued if owner_name else None,
                                              fingerprint=fingerprint)
        except redis.RedisError as e:
            raise BackendUnavailable(f"the job state store (Redis) is unavailable: {e}") from e
        if seq is None:
            raise QueueFull(f"the queue is full ({self.settings.max_queued_jobs} jobs); retry later")
        if seq == -2:
            raise RateLimited("max_queued", owner.max_queued, 5.0,
                              f"key {owner_name!r} has {got} jobs waiting or running")
        if seq == -3:
            raise IdempotencyConflict(got)
        if got != job_id:  # the key's first submit made it; if that one died before publishing, the sweep does
            return got
        try:
            self._publish(job_id, queue)
        except Exception as e:  # noqa: BLE001 - kombu raises several kinds for a broker that is down
            try:
                self.state.forget(job_id)
            except redis.RedisError:
                pass
            raise BackendUnavailable(f"the broker is unavailable: {e}") from e
        try:  # the broker has the message: the orphan sweep leaves the job alone
            self.state.mark_sent(job_id)
        except redis.RedisError:  # the job is queued and will run; at worst the sweep sends a duplicate
            log.warning("job %s: could not mark it sent; the orphan sweep may publish it again", job_id)
        return job_id

    def status(self, job_id: str) -> JobStatus | None:
        st, _ = self.state.status(job_id)
        return JobStatus.model_validate(st) if st is not None else None

    def position(self, job_id: str) -> int | None:
        return self.state.position(job_id)

    def take_final(self, job_id: str) -> FinalJob | None:
        got = self.state.take_final(job_id)
        if got is None:
            return None
        st, images = got
        return FinalJob(JobStatus.model_validate(st), list(images))

    def cancel(self, job_id: str) -> str | None:
        # A job cancelled while queued never reaches a worker's run: its webhook goes with the
        # cancel, for a worker to send (an API node keeps no durable queue).
        record = self.state.record(job_id) or {}
        hook = record.get("payload", {}).get("webhook")
        entry = None
        if isinstance(hook, dict) and "cancelled" in hook.get("events", ()):
            st = JobStatus.model_validate(self.state.CANCELLED_STATUS)
            entry = {"job_id": job_id, "state": "cancelled", "hook": hook,
                     "body": self.final_view(job_id, FinalJob(st, []))}
        outcome = self.state.cancel(job_id, entry)
        if outcome == "cancelled":  # it was queued: it ends here, no worker will see it
            observe.ended(job_id, record.get("kind", "txt2img"), self.state.CANCELLED_STATUS, record.get("payload"))
        return outcome

    def webhook_deliveries(self) -> list[dict]:
        return self.state.webhooks()

    # ------------------------------------------------------------------ event stream
    async def events(self, job_id: str, after_id: str | None = None):
        # Marks the job listened: whoever takes its final answer then keeps a copy for the listeners.
        if await asyncio.to_thread(self.state.listen, job_id) is None:
            return None
        return self._feed(job_id, after_id)

    def _redis(self) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        if self._aredis is None or self._aredis_loop is not loop:
            self._aredis_loop = loop
            self._aredis = connect(self.settings.redis_url, asyncio=True, socket_connect_timeout=2,
                                   socket_timeout=BLOCK_MS / 1000 + 10, health_check_interval=30)
        return self._aredis

    async def _feed(self, job_id: str, after_id: str | None):
        """``queued`` events while the job waits, then its stream's events, then the final answer.
        A client that goes away cancels the pending read: its connection is closed, nothing waits on.
        A Redis outage is ridden out (STREAM_OUTAGE_SEC): the reads start again after the last
        event sent, so nothing is skipped or sent twice."""
        r = self._redis()
        sid, n, sent_position = _parse_event_id(after_id)
        key = events_key(job_id)
        outage = _Outage(job_id)
        while True:
            try:
                state = await r.hget(job_key(job_id), "state")
                state = state.decode() if state is not None else None  # None: taken (its events are complete)
                # its place in the fair line (state.fair_line: the line's state read in one step)
                position = await asyncio.to_thread(self.state.position, job_id) if state == "queued" else None
            except UNAVAILABLE as e:
                if not await outage.wait(e):
                    return
                continue
            if state == "queued" and position and position != sent_position:
                n, sent_position = n + 1, position
                yield JobEvent(f"{sid}.{n}.{sent_position}", "queued", {"position": sent_position})
            block = QUEUED_POLL_MS if state == "queued" else BLOCK_MS if state == "processing" else None
            try:
                got = await r.xread({key: sid}, count=100, block=block)
            except UNAVAILABLE as e:
                if not await outage.wait(e):
                    return
                continue
            outage.over()
            entries = got[0][1] if got else []
            for eid, fields in entries:
                kind = fields[b"type"].decode()
                if kind == FINAL_EVENT:
                    final = await self._final_retrying(job_id, outage)
                    if final is not None:
                        yield JobEvent(eid.decode(), final.status.state, self.final_view(job_id, final))
                    return
                sid, n = eid.decode(), 0
                yield JobEvent(sid, kind, json.loads(fields[b"data"]))
            if entries:
                continue
            if state is None:
                return  # taken, and this client had its final event already (or it expired)
            if state in FINAL_STATES:  # final with no final event in its stream (written before it had one)
                final = await self._final_retrying(job_id, outage)
                if final is not None:
                    yield JobEvent(f"{sid}.{n + 1}.0", final.status.state, self.final_view(job_id, final))
                return

    async def _final_retrying(self, job_id: str, outage: _Outage) -> FinalJob | None:
        while True:
            try:
                return await asyncio.to_thread(self._final, job_id)
            except UNAVAILABLE as e:
                if not await outage.wait(e):
                    return None

    def _final(self, job_id: str) -> FinalJob | None:
        """The final answer for a listener: taken now, or the copy kept when another reader took it."""
        got = self.state.take_final(job_id) or self.state.taken(job_id)
        if got is None:
            return None
        st, images = got
        return FinalJob(JobStatus.model_validate(st), list(images))

    def current_job(self) -> str | None:
        running = self.state.running()
        return next(iter(running), None)

    def owner(self, job_id: str) -> str | None:
        raw = self.state.r.hget(job_key(job_id), "owner")
        return raw.decode() if raw else None

    def active_count(self, owner: str | None) -> int:
        return self.state.active_count(owner)

    def listing(self) -> list[QueueEntry]:
        running = list(self.state.running())
        waiting = self.state.fair_line()  # positions: the fair order
        ids = running + waiting
        seen = set(ids)
        finished = [k.decode().rsplit(":", 1)[1] for k in self.state.r.scan_iter("dapi:job:*", count=500)]
        ids += sorted(j for j in finished if j not in seen)
        out = []
        p = self.state.r.pipeline()
        for job_id in ids:
            p.hget(job_key(job_id), "owner")
        owners = [o.decode() if o else None for o in p.execute()]
        for i, (job_id, st, owner) in enumerate(zip(ids, self.state.statuses(ids), owners)):
            if st is None:
                continue
            pos = 0 if i < len(running) else (i - len(running) + 1 if i < len(running) + len(waiting) else None)
            out.append(QueueEntry(job_id=job_id, state=st.get("state", "unknown"),
                                  current_phase=st.get("current_phase", ""), progress=st.get("progress", 0.0),
                                  queue_position=pos, owner=owner))
        return out

    # ------------------------------------------------------------------ operating it
    def queue_stats(self) -> dict:
        """The cluster's queue (Redis), the same on every API node."""
        waiting = self.state.waiting_ids()
        oldest = 0.0
        if waiting:
            created = (self.state.record(waiting[0]) or {}).get("created_at")
            oldest = max(0.0, time.time() - created) if created else 0.0
        return {"waiting": len(waiting), "running": len(self.state.running()), "oldest_wait_sec": oldest}

    def readiness(self) -> dict[str, str | None]:
        return cluster_readiness(self.settings, self.state, need_workers=True)

    def expired(self, job_id: str) -> str | None:
        try:
            ttl = self.state.expired_unread(job_id)
        except redis.RedisError as e:
            raise BackendUnavailable(f"the job state store (Redis) is unavailable: {e}") from e
        if ttl is None:
            return None
        return (f"the job ended and its answer was not read within DIFFUSIONAPI_RESULTS_TTL_SEC={ttl:g} s; "
                "the cluster dropped it (its image file stays in the worker's outputs/)")

    def shared_blobs(self) -> "RedisBlobs":
        return RedisBlobs(self.state.r)

    # ------------------------------------------------------------------ cluster view
    def cluster_view(self) -> dict:
        dead_after = 3 * self.settings.worker_heartbeat_sec
        workers = []
        for w in self.state.workers():
            workers.append({"name": w["name"], "alive": w["heartbeat_age"] <= dead_after,
                            "device": w.get("device"), "host": w.get("host"), "models": w.get("models", []),
                            "loaded_model": w.get("loaded_model"), "current_job": w.get("current_job"),
                            "jobs_done": w.get("jobs_done", 0), "heartbeat_age": w["heartbeat_age"]})
        return {"backend": "celery", "workers": workers, "queued": len(self.state.waiting_ids()),
                "running": len(self.state.running()), "dead_after_sec": dead_after}
