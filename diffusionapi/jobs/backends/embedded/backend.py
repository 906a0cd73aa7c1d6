"""The default backend: job records on disk (store.py), an in-process queue (queue.py), one
worker thread (worker.py), live events and webhooks (jobs/live.py) -- all in this process."""
from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from pathlib import Path


from ...status import JobStatus
from ...live import LiveFeed
from ...runner import JobRunner
from .queue import JobQueue
from .store import JobStore
from .worker import Worker
from ..base import BackendUnavailable, FinalJob, FinalWaiters, JobBackend, QueueEntry, QueueFull

log = logging.getLogger(__name__)


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
        self._loop = None
        self._waiters = FinalWaiters()

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
        for record, status in self.store.recover():
            job_id = record["job_id"]
            if status is not None and status.is_final:
                continue  # finished, not yet read: served once as usual
            if status is None:
                self.store.write_status(job_id, JobStatus.queued())
            elif status.state == "processing":
                log.warning("job %s was interrupted by a restart; running it again", job_id)
                self.store.write_status(job_id, JobStatus.queued())
            self.queue.put(job_id, force=True)
        self.live.start()
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()
        self.live.stop()

    def submit(self, kind: str, payload: dict) -> str:
        if self.queue.size() >= self.settings.max_queued_jobs:
            raise QueueFull(f"the queue is full ({self.settings.max_queued_jobs} jobs); retry later")
        job_id = str(uuid.uuid4())
        try:
            self.store.create(job_id, payload, kind)
        except OSError as e:
            self.store.delete(job_id, missing_ok_errors=True)  # whatever part was written
            raise BackendUnavailable(f"cannot record the job in the queue directory: {e.strerror or e}") from e
        try:
            self.queue.put(job_id)
        except QueueFull:
            self.store.delete(job_id)
            raise
        self.live.queued(job_id, self.queue.position(job_id))
        return job_id

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
            self.store.delete(job_id)
        self._final_event(job_id, final)
        return final

    def cancel(self, job_id: str) -> str | None:
        st = self.store.read_status(job_id)
        if st is None:
            return None
        if st.is_final:
            return st.state
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
        """A job just became final (worker thread, or a cancel): webhooks, and the final event
        for the clients following it now."""
        self.live.ended(job_id, payload, status.state, lambda: self.final_view(job_id, _peek_final(status)))
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

    def listing(self) -> list[QueueEntry]:
        positions = dict(self.queue.snapshot())
        out = [QueueEntry(job_id=job_id, state=e.state, current_phase=e.current_phase, progress=e.progress,
                          queue_position=positions.get(job_id), kind=e.kind)
               for job_id, e in self.store.index().items()]  # from memory: no record is parsed
        out.sort(key=lambda j: (j.queue_position is None, j.queue_position or 0))
        return out


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
