"""The embedded backend's one worker thread: runs jobs (or batches of them) through the runner."""
from __future__ import annotations

import logging
import threading
import time

from ... import observe
from ...live import LiveFeed
from ...runner import JobRunner
from ...states import (MAX_ATTEMPTS, JobCancelled, JobFailed, JobInterrupted, ProgressThrottle,
                       attempts_exhausted_message, final_state_of)
from ...status import JobStatus
from .queue import JobQueue, RunningJob
from .store import JobStore

log = logging.getLogger(__name__)


class Worker:
    """The one thread that runs jobs, in order, through the runner."""

    def __init__(self, store: JobStore, queue: JobQueue, runner: JobRunner, on_final=None,
                 live: LiveFeed | None = None, on_ended=None):
        self.on_final = on_final or (lambda job_id: None)
        self.live = live
        self.on_ended = on_ended or (lambda job_id, status, payload: None)  # status, for webhooks/streams
        self._payloads: dict[str, dict | None] = {}  # running jobs' payloads (webhooks), for on_ended
        self.store = store
        self.queue = queue
        self.runner = runner
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        # Signs of life for /readyz: when the running job last reported progress (or started);
        # None while idle. A job silent longer than worker_stall_sec means a wedged worker.
        self.last_sign: float | None = None

    def health(self) -> tuple[bool, float | None]:
        """(thread alive, seconds the running job has been silent -- None when idle)."""
        alive = self._thread is not None and self._thread.is_alive()
        sign = self.last_sign
        return alive, (time.monotonic() - sign) if sign is not None else None

    @property
    def engine(self):
        return self.runner.engine

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="diffusionapi-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        self._stopping.set()
        self.queue.close()
        if self._thread:
            self._thread.join(timeout)

    def _loop(self) -> None:
        try:
            self.runner.engine  # import torch and pick the device now, not in the first job's time
            self.runner.warm_up()  # DIFFUSIONAPI_WARMUP_SHAPES: load and compile before the first job
        except Exception:  # noqa: BLE001 - reported again by the first job that needs it
            log.exception("engine failed to start")
        while not self._stopping.is_set():
            running = self.queue.take()
            if running is None:
                break
            if self.live:
                self.live.positions(self.queue.snapshot())  # everyone behind moved up one
            self.last_sign = time.monotonic()
            try:
                batch = self._gather(running)
                if batch:
                    self.run_batch(batch)
                else:
                    self.run_job(running.job_id, running.cancel)
            except Exception:  # noqa: BLE001 - the worker must survive anything
                log.exception("job %s: unexpected failure outside the job", running.job_id)
            finally:
                self.last_sign = None
                self.queue.finish()

    # ------------------------------------------------------------------ dynamic batching
    def _gather(self, head: RunningJob) -> list | None:
        """``head`` and the jobs among the next ``max_batch_jobs - 1`` waiting ones (the batch
        window: no job moves ahead of more than that many) that can share its UNet batch
        (engine/batching.py's batch_key). None: run ``head`` alone."""
        from ....engine.batching import batch_key, max_batch_jobs

        n = max_batch_jobs(self.runner.settings, getattr(self.runner.engine, "device", None))
        if n <= 1:
            return None
        first = self._prepare(head.job_id)
        key = batch_key(first[1].plan) if first else None
        if key is None:
            return None
        wait_ms = getattr(self.runner.settings, "batch_wait_ms", 0)
        if wait_ms > 0:
            self.queue.wait_for_waiting(n - 1, wait_ms / 1000)
        chosen = {}
        for job_id in self.queue.peek(n - 1):
            prepared = self._prepare(job_id)
            if prepared and batch_key(prepared[1].plan) == key:
                chosen[job_id] = prepared
        claimed = self.queue.claim(list(chosen))
        if not claimed:
            return None
        return [(head, first)] + [(r, chosen[r.job_id]) for r in claimed]

    def _prepare(self, job_id: str):
        """(record, resolved job) for a job that may join a batch, else None (it runs alone,
        where a record, status or resolution problem is reported as usual)."""
        record = self.store.read_job(job_id)
        status = self.store.read_status(job_id)
        if record is None or (status is not None and status.is_final) \
                or record.get("attempts", 0) + 1 > MAX_ATTEMPTS:
            return None
        try:
            return record, self.runner.resolve(record.get("kind", "txt2img"), record["payload"])
        except (JobFailed, KeyError):
            return None

    def run_batch(self, batch: list) -> None:
        """One UNet batch of several jobs; each ends on its own (done, error or cancelled)."""
        from ....engine.plan import GenerationError, GenerationResult
        from ...runner import rss_mb

        t0 = time.perf_counter()
        mem_before = rss_mb()
        ended: set[str] = set()  # ended before the batch did (cancelled)
        reports, cancels = [], []
        for running, (record, _job) in batch:
            record["attempts"] = record.get("attempts", 0) + 1
            self.store.write_job(running.job_id, record)
            reports.append(self._begin(running.job_id, record)[0])  # no step events in a batch
            cancels.append(self._batched_canceller(running, ended, t0))
        try:
            results = self.runner.engine.generate_batch([job.plan for _, (_, job) in batch], reports, cancels)
        except JobInterrupted:  # a graceful stop: every job of the batch goes back to the queue
            for running, (record, _job) in batch:
                self._payloads.pop(running.job_id, None)
                if running.job_id not in ended:
                    observe.interrupted(running.job_id)
                    record["attempts"] -= 1
                    self.store.write_job(running.job_id, record)
                    self.store.write_status(running.job_id, JobStatus.queued(), fsync=True)
            return
        except Exception as e:  # noqa: BLE001 - a failure of the whole batch is each job's failure
            log.exception("batch of %d jobs failed", len(batch))
            results = [e] * len(batch)
        for (running, (_record, job)), result in zip(batch, results):
            job_id = running.job_id
            if job_id in ended:
                continue
            try:
                if isinstance(result, GenerationResult):
                    final = self.runner.finish(job_id, job, result, t0, mem_before)
                    self.store.write_status(job_id, final, fsync=True)
                    self._ended(job_id, final)
                else:
                    if isinstance(result, GenerationError):
                        result = JobFailed(str(result))
                    self._final_error(job_id, *final_state_of(result, job_id), t0)
            except JobFailed as e:
                self._final_error(job_id, *final_state_of(e, job_id), t0)

    def _batched_canceller(self, running: RunningJob, ended: set, t0: float):
        def cancelled() -> bool:
            if self._stopping.is_set():
                raise JobInterrupted()
            if running.cancel.is_set():
                if running.job_id not in ended:  # ends now; its row's remaining work is discarded
                    ended.add(running.job_id)
                    self._final_error(running.job_id, *final_state_of(JobCancelled(), running.job_id), t0)
                return True
            return False
        return cancelled

    def _reporter(self, job_id: str, payload: dict | None = None, observer: "_LiveObserver | None" = None):
        throttle = ProgressThrottle()

        def report(phase: str, progress: float) -> None:
            self.last_sign = time.monotonic()
            if observer:
                observer.report(payload, phase, progress)
            if throttle.due(phase):
                self.store.write_status(job_id, JobStatus.processing(phase, progress))
        return report

    # ------------------------------------------------------------------ one job
    def run_job(self, job_id: str, cancel: threading.Event) -> None:
        record = self.store.read_job(job_id)
        if record is None:
            return  # finished and read, or cancelled before it started
        status = self.store.read_status(job_id)
        if status is not None and status.is_final:
            return
        record["attempts"] = record.get("attempts", 0) + 1
        self.store.write_job(job_id, record)
        t0 = time.perf_counter()
        report, observer = self._begin(job_id, record)

        def cancelled() -> bool:
            if self._stopping.is_set():
                raise JobInterrupted()
            return cancel.is_set()

        try:
            if record["attempts"] > MAX_ATTEMPTS:
                raise JobFailed(attempts_exhausted_message())
            final = self.runner.run(job_id, record.get("kind", "txt2img"), record["payload"], report, cancelled,
                                    **({"observer": observer} if observer else {}))
            self.store.write_status(job_id, final, fsync=True)
            self._ended(job_id, final)
        except JobInterrupted:  # a graceful stop is not a failed attempt: back to the queue as it was
            self._payloads.pop(job_id, None)
            observe.interrupted(job_id)
            record["attempts"] -= 1
            self.store.write_job(job_id, record)
            self.store.write_status(job_id, JobStatus.queued(), fsync=True)
        except Exception as e:  # noqa: BLE001 - a job's failure must not stop the worker
            self._final_error(job_id, *final_state_of(e, job_id), t0)

    def _final_error(self, job_id: str, state, message: str, t0: float) -> None:
        from ....engine.pipelines import free_memory

        free_memory()
        status = JobStatus.failed(state, message, round(time.perf_counter() - t0, 3))
        self.store.write_status(job_id, status, fsync=True)
        self._ended(job_id, status)

    def _ended(self, job_id: str, status: JobStatus) -> None:
        """A final status is written: streams and webhooks first, then the long-polls."""
        self.on_ended(job_id, status, self._payloads.pop(job_id, None))
        self.on_final(job_id)

    def _begin(self, job_id: str, record: dict):
        """A job starts running: its ``started`` record and event; the reporter that also feeds
        live progress."""
        payload = record.get("payload")
        self._payloads[job_id] = payload
        # Running from now, not from the engine's first report (a model load can take a while):
        # /queue says "processing", as the Celery backend's claim does.
        self.store.write_status(job_id, JobStatus.processing("starting", 0.0))
        observe.started(job_id, record.get("kind", "txt2img"), payload, "embedded", record.get("attempts", 1),
                        record.get("created_at"))
        observer = _LiveObserver(self.live, job_id) if self.live else None
        if self.live:
            self.live.started(job_id)
        return self._reporter(job_id, payload, observer), observer


class _LiveObserver:
    """The engine's step/preview callbacks for one job, published as live events."""

    def __init__(self, live: LiveFeed, job_id: str):
        self.live, self.job_id = live, job_id
        self._step: tuple[str, int, int] | None = None

    def step(self, phase: str, step: int, total: int) -> None:
        self._step = (phase, step, total)

    def preview(self, jpeg: bytes, step: int, total: int) -> None:
        self.live.preview(self.job_id, jpeg, step, total)

    def report(self, payload, phase: str, progress: float) -> None:
        s = self._step if self._step and self._step[0] == phase else None
        self.live.progress(self.job_id, payload, phase, progress, s[1] if s else None, s[2] if s else None)
