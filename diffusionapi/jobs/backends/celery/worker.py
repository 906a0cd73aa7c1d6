"""`diffusionapi worker`: one process per GPU, consuming the queues of the models it serves.

The model stays loaded in this process between jobs. A heartbeat thread publishes the worker's
info (device, loaded model, current job) and its catalog to Redis and renews the lease on the
running job; a worker whose heartbeat stops is shown dead in ``GET /cluster`` and its job is
claimed by the next worker the broker hands it to (attempts counted; three is the cap): at once
when the dead worker has no connection to Redis left, else when its lease lapses.

Redis unreachable (restart, blip, failover): claims and finishes are retried (``until_redis``),
the broker message held unacknowledged meanwhile; progress and previews are skipped.

Live progress goes to Redis as the job runs (``JobProgress``): status, sampler step, previews and
the job's event stream, which any API node reads. Webhooks are sent from here, by a durable
``WebhookQueue`` in ``<queue dir>/webhooks`` on this worker's host (a restarted worker there goes
on retrying; its delivery records are mirrored to Redis for ``GET /queue``).
"""
from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
import time

import redis
from celery.exceptions import Reject

from ... import observe
from ...status import FinalJob, JobStatus
from ...live import JobWebhooks
from ...views import final_view
from .celery_app import AFFINITY_PRIORITY, ANY_QUEUE, TASK_NAME, make_celery, make_queue, queue_name
from ...states import MAX_ATTEMPTS, ProgressThrottle, progress_event
from .state import UNAVAILABLE, RedisJobState, status_dict, worker_client_name

log = logging.getLogger("diffusionapi.worker")

CATALOG_REFRESH_SEC = 30.0
# How long a worker holding a broker message waits for Redis (down, restarting, failing over)
# before it gives the message back to the broker (requeued, not acknowledged: nothing is lost
# either way; giving it back lets another worker, perhaps one that reaches Redis, have it).
REDIS_WAIT_SEC = 120.0


class StateUnavailable(Exception):
    """Redis stayed unreachable for REDIS_WAIT_SEC: the delivery is requeued, not acknowledged."""


def build_catalog(registry, models) -> dict:
    """What this worker can run, as plain JSON: the API nodes validate against the union."""
    from .catalog import catalog_of

    return catalog_of(registry, models)


class ClusterWorker:
    def __init__(self, settings, *, name: str | None = None, models: list[str] | None = None,
                 engine_factory=None):
        from ....registry import Registry

        self.settings = settings
        self.name = name or f"{socket.gethostname()}:{settings.device}:{os.getpid()}"
        self.state = RedisJobState(settings.redis_url, results_ttl=settings.results_ttl_sec, max_attempts=MAX_ATTEMPTS,
                                   client_name=worker_client_name(self.name))
        self.registry = Registry(settings)
        self.requested_models = models
        self._engine_factory = engine_factory
        self._engine = None
        self._engine_lock = threading.Lock()
        self.hb = settings.worker_heartbeat_sec
        self.lease_sec = 3 * self.hb
        self.current_job: str | None = None
        self.last_sign: float | None = None  # the running job's last progress (monotonic); /readyz
        self.loaded_model: str | None = None
        self.started_at = time.time()
        self.jobs_done = 0
        self._stop = threading.Event()
        self._catalog_new: dict | None = None  # built, not yet published (the next beat sends it)
        self._catalog_sent: dict | None = None  # the last one published
        self._leftover_hooks = True
        self.models = self._served_models()
        self.hooks = JobWebhooks(settings, on_record=lambda rec: self.state.mirror_webhook(rec, self.hooks.queue.keep_sec))

    # ------------------------------------------------------------------ what it serves
    def _served_models(self):
        from ....registry import UnknownName

        installed = [m for m in self.registry.models()]
        if not self.requested_models:
            return installed
        out = []
        for name in self.requested_models:
            try:
                out.append(self.registry.resolve_model(name, models=installed))
            except UnknownName as e:
                raise SystemExit(f"worker: --models: {e}") from None
        return out

    @property
    def home_model(self) -> str | None:
        """The model whose queue this worker prefers (its first one; loaded on start when possible)."""
        return self.models[0].name if self.models else None

    def queues(self):
        qs = [make_queue(queue_name(m.name), AFFINITY_PRIORITY if m.name == self.home_model else 0)
              for m in self.models]
        return qs + [make_queue(ANY_QUEUE)]

    @property
    def engine(self):
        with self._engine_lock:
            if self._engine is None:
                from ...runner import freeze_imports

                self._engine = self._engine_factory() if self._engine_factory else self._default_engine()
                freeze_imports()  # before the home model loads (preload)
            return self._engine

    def _default_engine(self):
        from ....engine.engine import Engine

        return Engine(self.settings)

    # ------------------------------------------------------------------ heartbeat
    def info(self) -> dict:
        return {"device": self.settings.device, "host": socket.gethostname(), "pid": os.getpid(),
                "models": [m.name for m in self.models], "loaded_model": self.loaded_model,
                "current_job": self.current_job, "jobs_done": self.jobs_done, "started_at": self.started_at}

    def refresh_catalog(self) -> None:
        """Rescans the model folders (files may have been added) and builds the catalog the next
        beat publishes. Its own thread, never the heartbeat's: hashing a new multi-GB file takes
        seconds, and a heartbeat that waits for it lets the worker look dead and its job's lease
        lapse."""
        self.registry = type(self.registry)(self.settings)
        self.models = [m for m in self._served_models()]
        self._catalog_new = build_catalog(self.registry, self.models)

    def beat(self) -> None:
        catalog, self._catalog_new = self._catalog_new, None
        ttl = max(60, int(self.hb * 30))
        try:
            has_catalog = self.state.heartbeat(self.name, self.info(), ttl, catalog)
        except Exception:
            if catalog is not None and self._catalog_new is None:
                self._catalog_new = catalog  # the next beat sends it
            raise
        if catalog is not None:
            self._catalog_sent = catalog
        elif not has_catalog and self._catalog_new is None:
            self._catalog_new = self._catalog_sent  # Redis lost it: the next beat sends it again
        job = self.current_job
        if job and not self.state.renew_lease(job, self.name, self.lease_sec):
            log.warning("job %s: no longer this worker's (taken over while it could not renew its lease)", job)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.hb):
            try:
                self.beat()
                self.send_pending_hooks(leftover=self._leftover_hooks)
                self._leftover_hooks = False
            except Exception as e:  # noqa: BLE001 - Redis may be restarting; keep beating
                log.warning("heartbeat failed: %s", e)

    # ------------------------------------------------------------------ webhooks
    def start_webhooks(self) -> None:
        self.hooks.start()
        self._leftover_hooks = True  # a worker that starts while Redis is down looks at its next beat
        try:
            self.send_pending_hooks(leftover=True)
            self._leftover_hooks = False
        except UNAVAILABLE as e:
            log.warning("Redis unreachable at start (%s); pending webhooks are looked at later", e)

    def stop_webhooks(self) -> None:
        self.hooks.stop()

    def send_pending_hooks(self, leftover: bool = False) -> None:
        """Record the webhooks of jobs that ended without a worker (cancelled while queued; the API
        node that cancelled them has no durable queue), each taken by exactly one worker."""
        while True:
            raw = self.state.next_pending_hook(self.name, leftover=leftover)
            if raw is None:
                return
            entry = json.loads(raw)
            self.hooks.record_final(entry["job_id"], entry["state"], entry["hook"], entry["body"])
            self.state.pending_hook_done(self.name, raw)

    def _catalog_loop(self) -> None:
        while not self._stop.wait(CATALOG_REFRESH_SEC):
            try:
                self.refresh_catalog()
            except Exception as e:  # noqa: BLE001 - a folder being changed; the last catalog stands
                log.warning("model rescan failed: %s", e)

    def start_heartbeat(self) -> None:
        # The first catalog before the first beat: a worker seen live has its catalog published.
        self._catalog_new = build_catalog(self.registry, self.models)
        try:
            self.beat()
        except UNAVAILABLE as e:  # a worker may start while Redis is down: it beats once it is back
            log.warning("Redis unreachable at start (%s); heartbeat retries", e)
        threading.Thread(target=self._heartbeat_loop, name="diffusionapi-heartbeat", daemon=True).start()
        threading.Thread(target=self._catalog_loop, name="diffusionapi-catalog", daemon=True).start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        try:
            self.state.remove_worker(self.name)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass

    # ------------------------------------------------------------------ one job
    def until_redis(self, what: str, fn):
        """``fn()``, retried while Redis is unreachable (restart, blip, failover), for at most
        REDIS_WAIT_SEC; then StateUnavailable (the caller's broker message is requeued). Every
        script retried here is safe to run twice (a claim counts one more attempt at worst)."""
        deadline = time.monotonic() + REDIS_WAIT_SEC
        delay = 0.1
        while True:
            try:
                return fn()
            except UNAVAILABLE as e:
                if time.monotonic() >= deadline:
                    raise StateUnavailable(f"{what}: Redis unreachable for {REDIS_WAIT_SEC:.0f} s: {e}") from e
                log.warning("%s: Redis unreachable (%s); retrying in %.1f s", what, e, delay)
                time.sleep(delay)
                delay = min(2 * delay, 2.0)

    def _claim(self, job_id: str, redelivered: bool) -> tuple[str, int, dict | None]:
        deadline = time.monotonic() + self.lease_sec + 2 * self.hb
        while True:
            verdict, attempt, record = self.until_redis(
                f"job {job_id}: claim", lambda: self.state.claim(job_id, self.name, self.lease_sec))
            if verdict != "busy":
                return verdict, attempt, record
            # Another worker holds the job and its lease is live. A first delivery is a duplicate
            # (the orphan sweep re-published a job whose submit looked unfinished): the owner holds
            # the message it claimed from, which the broker gives back if the owner dies. Dropped
            # at once, so it never blocks this worker. A redelivery may come from the owner's death
            # or a broker restart / Redis broker's visibility timeout (the owner lives on). An owner
            # with no connection to Redis is known dead (a killed process's connections close
            # with it): the job is taken over at once, not after its lease. Otherwise wait for the
            # lease to lapse, but no longer than a dead owner's lease could last. If the owner
            # outlives that and dies later, the orphan sweep re-publishes its job (a running job
            # with a lapsed lease).
            if not redelivered:
                log.info("job %s: delivery dropped, worker %s holds the job", job_id, record)
                return verdict, 0, None
            owner = record
            if self.until_redis(f"job {job_id}: owner check", lambda: self.state.owner_connected(owner)) is False:
                verdict, attempt, record = self.until_redis(
                    f"job {job_id}: claim", lambda: self.state.claim(job_id, self.name, self.lease_sec, owner))
                if verdict != "busy":
                    log.warning("job %s: its worker %s is gone (no Redis connection); taken over", job_id, owner)
                    return verdict, attempt, record
            if time.monotonic() > deadline:
                log.info("job %s: delivery dropped, worker %s holds the job", job_id, record)
                return verdict, 0, None
            time.sleep(min(self.hb, 0.5))

    def _exhausted(self, job_id: str, record: dict) -> None:
        """A job that ran out of attempts became final here: its webhook is ours to send."""
        st = self.state.exhausted_status()
        observe.ended(job_id, record.get("kind", "txt2img"), st, record.get("payload"))
        self.hooks.ended(job_id, record.get("payload"), "error",
                         lambda: final_view(job_id, FinalJob(JobStatus.model_validate(st), [])))

    def _take_turn(self, token: str, queue: str, redelivered: bool) -> tuple[str, int, dict | None, str | None]:
        """A message is a turn of its model queue, not a job (docs/tenants.md "Scheduling"): the
        next job of the queue in the fair order starts, bound to the message's token, so that a
        redelivery (this worker died) resumes that job. Returns (verdict, attempt, record, job id)."""
        while True:
            verdict, attempt, record, job_id = self.until_redis(
                f"message {token}: claim", lambda: self.state.claim_next(token, queue, self.name, self.lease_sec))
            if verdict == "exhausted":
                self._exhausted(job_id, record)
                continue  # the turn is still this message's
            if verdict == "bound":  # a redelivery: the job this token started, as before
                return (*self._claim(job_id, redelivered), job_id)
            return verdict, attempt, record, job_id

    def run(self, token: str, redelivered: bool = True, queue: str | None = None, resume: str | None = None) -> str:
        """Called for each broker delivery; returns what happened (for logs and tests).
        ``token``: the message's id, a turn of ``queue`` (the submit's job id, or a new id from the
        orphan sweep); ``resume``: the sweep's message for a running job whose worker died (that
        job, not a turn). ``redelivered``: the broker's flag (the message went to a consumer
        before). Raises StateUnavailable when Redis stays unreachable: the caller requeues the message."""
        if resume:
            job_id = resume
            verdict, attempt, record = self._claim(job_id, redelivered)
        else:
            if queue is None:  # a message published before turns had a queue argument: its job's queue
                queue = (self.until_redis(f"message {token}: queue", lambda: self.state.record(token)) or {}).get(
                    "queue") or queue_name(None)
            verdict, attempt, record, job_id = self._take_turn(token, queue, redelivered)
        kind = (record or {}).get("kind", "txt2img")
        if verdict == "exhausted":
            self._exhausted(job_id, record)
        if verdict != "run":
            return verdict
        self.current_job = job_id
        self.last_sign = time.monotonic()
        observe.started(job_id, kind, record.get("payload"), self.name, attempt, record.get("created_at"))
        try:
            try:
                self.beat()
            except Exception as e:  # noqa: BLE001 - the heartbeat thread retries; the job goes on
                log.warning("heartbeat failed: %s", e)
            from .execute import execute_job

            final, images = execute_job(self, job_id, record, JobProgress(self, job_id, record.get("payload")))
            # The result in hand is worth waiting for Redis: a blip here must not cost the job.
            if self.until_redis(f"job {job_id}: finish", lambda: self.state.finish(job_id, self.name, final, images)):
                observe.ended(job_id, kind, final, record.get("payload"))  # counted where its result landed
                self.hooks.ended(job_id, record.get("payload"), final["state"],
                                 lambda: final_view(job_id, FinalJob(JobStatus.model_validate(final), list(images))))
                self._record_usage(record, final)
            else:
                log.warning("job %s: finished here but no longer ours (lease lost); result dropped", job_id)
            self.jobs_done += 1
            return final["state"]
        finally:
            self.current_job = None
            self.last_sign = None
            try:
                self.beat()  # /cluster shows the worker free at once
            except Exception:  # noqa: BLE001
                pass

    def readiness(self) -> dict[str, str | None]:
        """``/readyz`` on the worker's metrics port: Redis, the broker, not wedged, a model to serve."""
        from .backend import cluster_readiness

        checks = cluster_readiness(self.settings, self.state, need_workers=False)
        sign, stall = self.last_sign, self.settings.worker_stall_sec
        silent = time.monotonic() - sign if sign is not None else None
        checks["worker"] = (f"wedged: job {self.current_job} has reported nothing for {silent:.0f} s "
                            f"(DIFFUSIONAPI_WORKER_STALL_SEC={stall:g})") if silent is not None and silent > stall else None
        checks["models"] = None if self.models else "no model installed"
        return checks

    def _record_usage(self, record: dict, final: dict) -> None:
        """GET /usage's counts for the job's key (jobs/quotas.py); never fails the job."""
        from ...quotas import usage_of
        from .ledger import RedisLedger

        try:
            payload = record.get("payload") or {}
            RedisLedger(self.state.r).record_usage(record.get("owner"), payload.get("model"),
                                                   **usage_of(record.get("kind", "txt2img"), payload,
                                                              JobStatus.model_validate(final)))
        except Exception:  # noqa: BLE001 - accounting is best effort
            log.warning("could not record the usage of a job", exc_info=True)

    def cancel_check(self, job_id: str):
        last = {"t": 0.0, "v": False}

        def cancelled() -> bool:
            now = time.perf_counter()
            if not last["v"] and now - last["t"] >= 0.05:
                last["t"] = now
                try:
                    last["v"] = self.state.cancel_requested(job_id)
                except UNAVAILABLE:  # a Redis blip is not a cancel: asked again at the next check
                    pass
            return last["v"]
        return cancelled


class JobProgress:
    """One running job's progress (``report``) and the engine's step/preview callbacks
    (``engine.plan.StepObserver``), written to Redis: the job's status, step and preview fields
    and its event stream, in one script each. Progress writes are throttled as the embedded
    worker's are (a Redis write per tiny step costs more than the step); a phase change and a
    stage's last step are always written, so a listener sees every phase and the final count."""

    def __init__(self, worker: ClusterWorker, job_id: str, payload: dict | None):
        self.worker, self.job_id, self.payload = worker, job_id, payload
        self._step: tuple[str, int, int] | None = None  # (phase, step, total) of the current stage
        self._throttle = ProgressThrottle()
        self._warned = float("-inf")

    def step(self, phase: str, step: int, total: int) -> None:
        self._step = (phase, step, total)

    def preview(self, jpeg: bytes, step: int, total: int) -> None:
        self._write("preview", self.worker.state.preview, self.job_id, self.worker.name,
                    base64.b64encode(jpeg).decode(), step, total)

    def _write(self, what: str, fn, *args) -> None:
        """Progress and previews are not decisions: a Redis error while writing one is logged and
        the write skipped (the next one, or the finish, carries the job on), never the job's end."""
        try:
            fn(*args)
        except redis.RedisError as e:
            now = time.monotonic()
            if now - self._warned >= 5:  # once per outage, not once per step
                self._warned = now
                log.warning("job %s: %s not written (%s); the job goes on", self.job_id, what, e)

    def report(self, phase: str, progress: float) -> None:
        self.worker.last_sign = time.monotonic()
        s = self._step if self._step and self._step[0] == phase else None
        step, total = (s[1], s[2]) if s else (None, None)
        status = status_dict("processing", phase, round(progress, 2))
        self.worker.hooks.progress(self.job_id, self.payload, progress_event(status["progress"], phase, step, total))
        if self._throttle.due(phase, step, total):
            self._write("progress", self.worker.state.progress, self.job_id, self.worker.name, status, step, total)


def serve(settings, *, name: str | None = None, models: list[str] | None = None, engine_factory=None,
          loglevel: str = "INFO") -> int:
    """Runs a Celery worker (one execution slot, threads pool: the model stays in this process)."""
    worker = ClusterWorker(settings, name=name, models=models, engine_factory=engine_factory)
    app = make_celery(settings)
    queues = worker.queues()
    app.conf.task_queues = queues

    @app.task(name=TASK_NAME, ignore_result=True, bind=True)
    def run_job(task, token: str, queue: str | None = None, resume: str | None = None) -> str:
        info = task.request.delivery_info or {}
        redelivered = bool(info.get("redelivered", True))
        try:
            return worker.run(token, redelivered=redelivered, queue=queue or info.get("routing_key"), resume=resume)
        except StateUnavailable as e:
            # Acknowledged only once the job's state is decided in Redis: here it is not, so the
            # message goes back to the broker (after REDIS_WAIT_SEC of waiting: no tight loop).
            # Any other exception is acknowledged as Celery does: a message that fails for a
            # reason other than Redis would fail again (a poison message must not loop); the
            # job's state decides its fate (a claimed job with a lapsed lease is re-published by
            # the orphan sweep and counts attempts up to the cap).
            log.warning("%s; message requeued", e)
            raise Reject(str(e), requeue=True) from e

    if worker.home_model:
        try:  # load the home model now, so its first job does not pay for it
            from .execute import preload

            preload(worker, worker.home_model)
        except Exception as e:  # noqa: BLE001 - the first job reports the real error
            log.warning("could not preload %s: %s", worker.home_model, e)
    worker.start_webhooks()
    worker.start_heartbeat()
    from ....retention import Janitor

    janitor = Janitor(settings)  # this host's outputs/ (results in Redis expire by RESULTS_TTL_SEC)
    janitor.start()
    if settings.metrics_port is not None:  # /metrics, /healthz, /readyz of this worker
        from ....metrics import serve_worker_http

        serve_worker_http(settings.metrics_port, worker.readiness)
        log.info("worker %s: metrics and probes on port %d", worker.name, settings.metrics_port)
    log.info("worker %s: device %s, queues %s", worker.name, settings.device, ", ".join(q.name for q in queues))
    try:
        w = app.Worker(pool="threads", concurrency=1, queues=[q.name for q in queues], hostname=worker.name,
                       without_gossip=True, without_mingle=True, without_heartbeat=True, loglevel=loglevel,
                       optimization="fair", quiet=True)
        w.start()  # SIGTERM: warm shutdown, the running job finishes first
        return w.exitcode or 0
    finally:
        janitor.stop()
        worker.stop_heartbeat()
        worker.stop_webhooks()
