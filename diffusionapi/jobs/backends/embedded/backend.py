"""The default backend: job records on disk (store.py), an in-process queue (queue.py), one
worker thread (worker.py), live events and webhooks (jobs/live.py) -- all in this process."""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path


from ... import observe
from ...status import JobStatus
from ...live import LiveFeed
from ...runner import JobRunner
from ....errors import IdempotencyConflict
from ....retention import free_space_problem
from .queue import JobQueue
from .store import JobStore
from .worker import Worker
from ..base import (BackendUnavailable, FinalJob, FinalWaiters, JobBackend, JobOwner, QueueEntry, QueueFull,
                    idempotency_hash)
from ...quotas import FileLedger, usage_of
from ...states import FINAL_STATES

log = logging.getLogger(__name__)

INSTALL = "install"  # the job kind of POST /models/install (models_install.py)
# An expired job's id answers 410 (not 404) at least this long after it expired.
TOMBSTONE_SEC = 86400.0


class EmbeddedBackend(JobBackend):
    """Store + queue + worker in this process: one server per GPU and queue directory."""
    delivers_webhooks = True

    def __init__(self, settings, registry, engine_factory):
        self.settings = settings
        self.store = JobStore(settings.queue_dir)
        self.queue = JobQueue(settings.max_queued_jobs)
        self.runner = JobRunner(settings, registry, engine_factory)
        self.live = LiveFeed(settings)
        self.worker = Worker(self.store, self.queue, self.runner, on_final=self._notify, live=self.live,
                             on_ended=self._ended)
        self._final_lock = threading.Lock()
        self._idem_lock = threading.Lock()
        self._loop = None
        self._waiters = FinalWaiters()
        from ....retention import Janitor

        self.janitor = Janitor(settings, self.expire_finals, self.expire)
        from ....models_install import Installer

        self.installer = Installer(settings, self)  # POST /models/install: jobs of kind "install"
        self.ledger = FileLedger(Path(settings.queue_dir) / ".tenants.json")  # limits and usage survive restarts
        # Owners of jobs read and forgotten, for a while: a stream reconnecting for its final
        # event is still its owner's (and still nobody else's).
        self._gone_owners: OrderedDict[str, str | None] = OrderedDict()

    # Long-poll: GET /queue/{id}?wait=N returns as soon as the job is final.
    def _notify(self, job_id: str) -> None:
        self._waiters.notify(job_id)

    async def wait_final(self, job_id: str, timeout: float) -> None:
        def is_final() -> bool:
            st = self.store.read_status(job_id)
            return st is None or st.is_final

        await self._waiters.wait(job_id, timeout, is_final)

    def start(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()  # the final-event hand-off below runs on it
        except RuntimeError:
            self._loop = None
        self._waiters.bind()
        recovered = self.store.recover()
        self.store.recover_idem([record for record, _ in recovered])
        for record, status in recovered:
            job_id = record["job_id"]
            if status is not None and status.is_final:
                continue  # finished, not yet read: served once as usual
            if status is None:
                self.store.write_status(job_id, JobStatus.queued())
            elif status.state == "processing":
                log.warning("job %s was interrupted by a restart; running it again", job_id)
                self.store.write_status(job_id, JobStatus.queued())
            owner = record.get("owner") or {}
            if record.get("kind") == INSTALL:
                self.installer.put(job_id)  # resumes from its partial file
            else:
                self.queue.put(job_id, force=True, owner=owner.get("name"), priority=owner.get("priority", 0),
                               share=owner.get("share", 1.0))
        self.live.start()
        self.worker.start()
        self.janitor.start()
        self.installer.start()

    def stop(self) -> None:
        self.installer.stop()
        self.janitor.stop()
        self.worker.stop()
        self.live.stop()

    def keyed_job(self, owner: str | None, idempotency_key: str) -> tuple[str, str | None] | None:
        return self.store.idem_entry(idempotency_hash(owner, idempotency_key))

    def submit(self, kind: str, payload: dict, owner: JobOwner | None = None,
               idempotency_key: str | None = None, fingerprint: str | None = None) -> str:
        if not idempotency_key:
            return self._submit(kind, payload, owner, None)
        key = idempotency_hash(owner.name if owner else None, idempotency_key)
        with self._idem_lock:  # two submits with one key at once: the second waits and finds the first
            prior = self.store.idem_entry(key)
            if prior is not None:
                if prior[1] is not None and fingerprint is not None and prior[1] != fingerprint:
                    raise IdempotencyConflict(prior[0])
                return prior[0]
            idem = {"key": key, "expires": time.time() + self.settings.idempotency_window_sec}
            return self._submit(kind, payload, owner, dict(idem, fp=fingerprint) if fingerprint else idem)

    def _submit(self, kind: str, payload: dict, owner: JobOwner | None, idem: dict | None) -> str:
        if self.queue.size() >= self.settings.max_queued_jobs:
            raise QueueFull(f"the queue is full ({self.settings.max_queued_jobs} jobs); retry later")
        low = free_space_problem(self.settings)
        if low:  # refused before anything is written
            raise BackendUnavailable(low)
        owner = owner or JobOwner()
        job_id = str(uuid.uuid4())
        try:
            self.store.create(job_id, payload, kind, {"name": owner.name, "priority": owner.priority,
                                                      "share": owner.share}, idem)
        except OSError as e:
            self.store.delete(job_id, missing_ok_errors=True)  # whatever part was written
            if idem:
                self.store.idem_path(idem["key"]).unlink(missing_ok=True)
            raise BackendUnavailable(f"cannot record the job in the queue directory: {e.strerror or e}") from e
        if kind == INSTALL:  # downloads run on the installer's thread, never the GPU worker's
            self.installer.put(job_id)
            return job_id
        try:
            self.queue.put(job_id, owner=owner.name, priority=owner.priority, share=owner.share)
        except QueueFull:
            self.store.delete(job_id)
            if idem:
                self.store.idem_path(idem["key"]).unlink(missing_ok=True)
            raise
        self.live.queued(job_id, self.queue.position(job_id))
        self.live.positions(self.queue.snapshot())  # a fair turn or a priority may put it ahead of others
        return job_id

    def owner(self, job_id: str) -> str | None:
        owner = self.store.owner(job_id)
        return owner if owner is not None else self._gone_owners.get(job_id)

    def active_count(self, owner: str | None) -> int:
        return sum(1 for e in self.store.index().values() if e.owner == owner and e.state not in FINAL_STATES)

    def status(self, job_id: str) -> JobStatus | None:
        st = self.store.read_status(job_id)
        if st is not None and st.state == "processing":
            latest = self.live.latest_preview(job_id)
            if latest:
                st.preview, st.preview_step = latest
            step = self.live.latest_step(job_id)
            if step:  # extra fields: A1111's /progress reports sampling_step / sampling_steps
                st.step, st.total = step
        return st

    def position(self, job_id: str) -> int | None:
        return self.queue.position(job_id)

    def current_job(self) -> str | None:
        return self.queue.running()

    def take_final(self, job_id: str) -> FinalJob | None:
        with self._final_lock:  # exactly one reader gets the final response
            st = self.store.read_status(job_id)
            if st is None or not st.is_final:
                return None
            final = _peek_final(st)
            self._gone_owners[job_id] = self.store.owner(job_id)
            while len(self._gone_owners) > 10_000:
                self._gone_owners.popitem(last=False)
            self.store.delete(job_id)
        self._final_event(job_id, final)
        return final

    def cancel(self, job_id: str) -> str | None:
        st = self.store.read_status(job_id)
        if st is None:
            return None
        if st.is_final:
            return st.state
        if self.installer.cancel(job_id):
            return "cancelling"
        if self.queue.remove_waiting(job_id):
            status = JobStatus.failed("cancelled", "cancelled by request")
            self.store.write_status(job_id, status, fsync=True)
            self._ended(job_id, status, (self.store.read_job(job_id) or {}).get("payload"))
            self._notify(job_id)
            self.live.positions(self.queue.snapshot())
            return "cancelled"
        if self.queue.cancel_running(job_id):
            return "cancelling"
        return st.state

    # ------------------------------------------------------------------ live progress
    def _ended(self, job_id: str, status: JobStatus, payload: dict | None) -> None:
        """A job just became final (worker thread, or a cancel): its log record and metrics,
        webhooks, and the final event for the clients following it now."""
        observe.ended(job_id, (self.store.read_job(job_id) or {}).get("kind", "txt2img"), status, payload)
        self.janitor.poke()
        self.live.ended(job_id, payload, status.state, lambda: self.final_view(job_id, _peek_final(status)))
        record = self.store.read_job(job_id) or {}
        self.ledger.record_usage(self.store.owner(job_id), (payload or record.get("payload") or {}).get("model"),
                                 **usage_of(record.get("kind", "txt2img"), payload or record.get("payload"), status))
        loop = self._loop
        if loop is not None and self.live.events.listening(job_id):
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(asyncio.to_thread(self.take_final, job_id)))

    def _final_event(self, job_id: str, final: FinalJob) -> None:
        """Whoever consumed the final job (a poll or a stream): streams get it as their final event."""
        self.live.forget(job_id)
        if self.live.events.listened(job_id):
            self.live.events.publish(job_id, final.status.state, self.final_view(job_id, final))
        else:
            self.live.events.forget(job_id)

    async def events(self, job_id: str, after_id: str | None = None):
        if self.store.read_status(job_id) is None and self.live.events.final(job_id) is None:
            return None
        return self.live.events.follow(job_id, after_id, ready=lambda: self._catch_up(job_id))

    async def _catch_up(self, job_id: str) -> bool:
        """Bring the job's log up to date for a new listener: the current state when the log
        knows nothing (after a restart), the final event when the job is already final."""
        log = self.live.events
        st = self.store.read_status(job_id)
        if st is not None and st.state == "queued":  # positions are sent only to followed jobs
            self.live.queued(job_id, self.queue.position(job_id))
        elif st is not None and not log.after(job_id, None):
            if st.state == "processing":
                self.live.started(job_id)
                self.live.progress(job_id, None, st.current_phase, st.progress)
        if st is not None and st.is_final and log.final(job_id) is None:
            await asyncio.to_thread(self.take_final, job_id)
        return st is not None or log.final(job_id) is not None

    def webhook_deliveries(self) -> list[dict]:
        return self.live.webhooks.deliveries()

    # ------------------------------------------------------------------ operating it
    def install_started(self, job_id: str, record: dict) -> None:
        record["attempts"] = record.get("attempts", 0) + 1
        self.store.write_job(job_id, record)
        observe.started(job_id, INSTALL, record.get("payload"), "installer", record["attempts"],
                        record.get("created_at"))
        self.live.started(job_id)

    def install_progress(self, job_id: str, phase: str, percent: float) -> None:
        self.store.write_status(job_id, JobStatus.processing(phase, percent))
        self.live.progress(job_id, None, phase, percent)

    def install_interrupted(self, job_id: str) -> None:
        """A stop cut the download short: queued again, it resumes from its partial file at the next start."""
        self.store.write_status(job_id, JobStatus.queued(), fsync=True)
        observe.interrupted(job_id)

    def install_ended(self, job_id: str, status: JobStatus, payload: dict) -> None:
        self.store.write_status(job_id, status, fsync=True)
        self._ended(job_id, status, payload)
        self._notify(job_id)

    def expire(self, job_id: str, reason: str) -> bool:
        """Forget an unread final job (retention): its id answers 410 with ``reason`` from now on."""
        with self._final_lock:  # never while a reader takes it
            st = self.store.read_status(job_id)
            if st is None or not st.is_final:
                return False
            self.store.mark_expired(job_id, reason)
            self.store.delete(job_id)
        self.live.forget(job_id)
        self.live.events.forget(job_id)
        observe.expired(job_id, reason)
        return True

    def expire_finals(self, before: float, reason: str) -> int:
        """Expire the unread final jobs that ended before ``before``; prune old tombstones."""
        n = sum(self.expire(job_id, reason) for job_id in self.store.final_ids_before(before))
        self.store.prune_expired(before - max(self.settings.result_ttl or 0, TOMBSTONE_SEC))
        return n

    def expired(self, job_id: str) -> str | None:
        return self.store.expired_reason(job_id)

    def queue_stats(self) -> dict:
        snapshot = self.queue.snapshot()
        waiting = [j for j, pos in snapshot if pos > 0]
        oldest = 0.0
        if waiting:
            created = (self.store.read_job(waiting[0]) or {}).get("created_at")
            oldest = max(0.0, time.time() - created) if created else 0.0
        return {"waiting": len(waiting), "running": len(snapshot) - len(waiting), "oldest_wait_sec": oldest}

    def readiness(self) -> dict[str, str | None]:
        alive, silent = self.worker.health()
        stall = self.settings.worker_stall_sec
        if not alive:
            worker = "the worker thread is not running"
        elif silent is not None and silent > stall:
            worker = (f"wedged: the running job {self.queue.running()} has reported nothing for {silent:.0f} s "
                      f"(DIFFUSIONAPI_WORKER_STALL_SEC={stall:g})")
        else:
            worker = None
        return {"worker": worker, "queue_dir": _writable(self.store.dir)}

    def listing(self) -> list[QueueEntry]:
        positions = dict(self.queue.snapshot())
        # From memory: no record is parsed. A job recorded but not yet in the waiting line (a
        # submit in progress) is not listed until it is, so positions are always whole.
        out = [QueueEntry(job_id=job_id, state=e.state, current_phase=e.current_phase, progress=e.progress,
                          queue_position=positions.get(job_id), kind=e.kind, owner=e.owner)
               for job_id, e in self.store.index().items()
               if not (e.state == "queued" and job_id not in positions)]
        out.sort(key=lambda j: (j.queue_position is None, j.queue_position or 0))
        return out


def _writable(folder: Path) -> str | None:
    """None when a file can be created in ``folder`` (a read-only or full disk says why not)."""
    probe = folder / f".ready-probe.{os.getpid()}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
        return None
    except OSError as e:
        return f"cannot write to {folder}: {e.strerror or e}"


def _peek_final(status: JobStatus) -> FinalJob:
    """A final job with the bytes of its images (reading does not consume it)."""
    images: list[bytes | None] = []
    if status.state == "done":
        files = [r.output_file for r in status.images] if status.images else [status.output_file or status.output_path]
        for f in files:
            try:
                images.append(Path(f).read_bytes())
            except (OSError, TypeError):
                images.append(None)
    return FinalJob(status, images)


__all__ = ["EmbeddedBackend"]
