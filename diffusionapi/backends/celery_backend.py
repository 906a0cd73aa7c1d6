"""The job backend of a cluster: Celery (RabbitMQ, or Redis) carries jobs to GPU workers; Redis
holds their state, progress and results. Any API node answers for any job.

An API node is stateless: submit records the job in Redis (one atomic script: capacity check,
record, place in the cluster-wide waiting line) and publishes one persistent message naming it
to the queue of its model; everything else (status, position, cancel, the final response) is a
read or a script on Redis. See ``cluster/state.py`` for the keys and ``cluster/worker.py`` for the
other side.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid

import redis

from ..cluster.catalog import CatalogRegistry
from ..cluster.celery_app import TASK_NAME, make_celery, make_queue, queue_name
from ..cluster.state import FINAL_CHANNEL, RedisJobState
from ..jobstatus import JobStatus
from .base import BackendUnavailable, FinalJob, FinalWaiters, JobBackend, QueueEntry, QueueFull

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


class CeleryBackend(JobBackend):
    def __init__(self, settings):
        self.settings = settings
        self.state = RedisJobState(settings.redis_url, results_ttl=settings.results_ttl_sec, max_attempts=MAX_ATTEMPTS)
        self.celery = make_celery(settings)
        self.catalog = CatalogRegistry(settings, self.state)
        self._waiters = FinalWaiters()
        self._stopping = threading.Event()
        self._listener: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._waiters.bind()
        self._listener = threading.Thread(target=self._listen, name="diffusionapi-final-listener", daemon=True)
        self._listener.start()

    def stop(self) -> None:
        self._stopping.set()
        self.state.close()

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

    async def wait_final(self, job_id: str, timeout: float) -> None:
        await self._waiters.wait(job_id, timeout, lambda: self.state.is_final(job_id) is not False)

    # ------------------------------------------------------------------ jobs
    def submit(self, kind: str, payload: dict) -> str:
        job_id = str(uuid.uuid4())
        queue = queue_name(payload.get("model"))
        record = {"kind": kind, "payload": payload, "queue": queue, "created_at": time.time()}
        try:
            seq = self.state.create(job_id, record, self.settings.max_queued_jobs)
        except redis.RedisError as e:
            raise BackendUnavailable(f"the job state store (Redis) is unavailable: {e}") from e
        if seq is None:
            raise QueueFull()
        try:
            self.celery.send_task(TASK_NAME, args=[job_id], queue=make_queue(queue), task_id=job_id)
        except Exception as e:  # noqa: BLE001 - kombu raises several kinds for a broker that is down
            try:
                self.state.forget(job_id)
            except redis.RedisError:
                pass
            raise BackendUnavailable(f"the broker is unavailable: {e}") from e
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
        return self.state.cancel(job_id)

    def current_job(self) -> str | None:
        running = self.state.running()
        return next(iter(running), None)

    def listing(self) -> list[QueueEntry]:
        running = list(self.state.running())
        waiting = self.state.waiting_ids()
        ids = running + waiting
        seen = set(ids)
        finished = [k.decode().rsplit(":", 1)[1] for k in self.state.r.scan_iter("dapi:job:*", count=500)]
        ids += sorted(j for j in finished if j not in seen)
        out = []
        for i, (job_id, st) in enumerate(zip(ids, self.state.statuses(ids))):
            if st is None:
                continue
            pos = 0 if i < len(running) else (i - len(running) + 1 if i < len(running) + len(waiting) else None)
            out.append(QueueEntry(job_id=job_id, state=st.get("state", "unknown"),
                                  current_phase=st.get("current_phase", ""), progress=st.get("progress", 0.0),
                                  queue_position=pos))
        return out

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
