"""The default backend: job records on disk, an in-process queue, one worker thread.

Files, per the seed: ``QUEUE_DIR/<id>_job.json`` (the request as understood, written
with fsync before the submit answers, so a job survives a crash from that moment) and
``QUEUE_DIR/<id>.json`` (its ``JobStatus``). Both are replaced atomically (temp file +
rename): a reader never sees half a file. After the final read of a finished job both are
deleted; the images stay in the outputs directory.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from ..files import write_atomic
from ..jobstatus import FINAL_STATES, JobStatus
from ..live import LiveFeed
from ..runner import JobFailed, JobInterrupted, JobRunner
from .base import BackendUnavailable, FinalJob, FinalWaiters, JobBackend, QueueEntry, QueueFull

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # a job that keeps killing the server is not retried forever


class JobStore:
    def __init__(self, queue_dir: Path):
        self.dir = Path(queue_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def job_path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}_job.json"

    def status_path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.json"

    def create(self, job_id: str, payload: dict, kind: str = "txt2img") -> None:
        record = {"job_id": job_id, "kind": kind, "payload": payload, "created_at": time.time(), "attempts": 0}
        self.write_status(job_id, JobStatus.queued(), fsync=True)
        write_atomic(self.job_path(job_id), json.dumps(record).encode(), fsync=True)

    def read_job(self, job_id: str) -> dict | None:
        return _read_json(self.job_path(job_id))

    def write_job(self, job_id: str, record: dict) -> None:
        write_atomic(self.job_path(job_id), json.dumps(record).encode(), fsync=True)

    def read_status(self, job_id: str) -> JobStatus | None:
        data = _read_json(self.status_path(job_id))
        if data is None:
            return None
        try:
            return JobStatus.model_validate(data)
        except ValidationError:
            return None

    def write_status(self, job_id: str, status: JobStatus | dict, *, fsync: bool = False) -> None:
        if isinstance(status, dict):
            status = JobStatus.model_validate(status)
        write_atomic(self.status_path(job_id), json.dumps(status.to_record()).encode(), fsync=fsync)

    def delete(self, job_id: str, *, missing_ok_errors: bool = False) -> None:
        for p in (self.status_path(job_id), self.job_path(job_id)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                if not missing_ok_errors:
                    raise

    def set_aside(self, path: Path, reason: str) -> None:
        """Move a torn or corrupt record out of the way so start-up goes on."""
        bad = self.dir / "corrupt"
        bad.mkdir(exist_ok=True)
        log.error("job record %s is unreadable (%s); moved to %s", path.name, reason, bad)
        os.replace(path, bad / path.name)

    def recover(self) -> list[tuple[dict, JobStatus | None]]:
        """Every job record on disk with its status, oldest first; corrupt ones set aside."""
        out = []
        for p in sorted(self.dir.glob("*_job.json")):
            try:
                record = json.loads(p.read_text())
                if not isinstance(record, dict) or "job_id" not in record or "payload" not in record:
                    raise ValueError("missing fields")
            except (OSError, ValueError) as e:
                self.set_aside(p, str(e))
                continue
            status = None
            sp = self.status_path(record["job_id"])
            try:
                status = JobStatus.model_validate_json(sp.read_bytes())
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as e:  # pydantic's ValidationError is a ValueError
                self.set_aside(sp, str(e).splitlines()[0])
            out.append((record, status))
        for stray in self.dir.glob(".*.tmp"):  # temp files of writes a crash cut short
            stray.unlink(missing_ok=True)
        out.sort(key=lambda rs: rs[0].get("created_at", 0))
        return out


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        return None


@dataclass
class RunningJob:
    job_id: str
    cancel: threading.Event


class JobQueue:
    """The waiting line and the running jobs (one, or a batch); positions are 0 for running, then 1, 2, ..."""

    def __init__(self, max_jobs: int):
        self.max_jobs = max_jobs
        self._waiting: deque[str] = deque()
        self._running: list[RunningJob] = []
        self._cond = threading.Condition()
        self._closed = False

    def put(self, job_id: str, *, force: bool = False) -> None:
        with self._cond:
            if not force and self.size() >= self.max_jobs:
                raise QueueFull()
            self._waiting.append(job_id)
            self._cond.notify()

    def size(self) -> int:
        return len(self._waiting) + len(self._running)

    def take(self) -> RunningJob | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            self._running = [RunningJob(self._waiting.popleft(), threading.Event())]
            return self._running[0]

    def peek(self, n: int) -> list[str]:
        """The first ``n`` waiting jobs: the batch window."""
        with self._cond:
            return list(self._waiting)[:n]

    def wait_for_waiting(self, n: int, timeout: float) -> None:
        """Until ``n`` jobs wait (or ``timeout`` seconds passed): a batch may fill up."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._waiting) >= n or self._closed, timeout)

    def claim(self, job_ids: list[str]) -> list[RunningJob]:
        """Those of ``job_ids`` still waiting, now running beside the taken one."""
        with self._cond:
            claimed = []
            for job_id in job_ids:
                if job_id in self._waiting:
                    self._waiting.remove(job_id)
                    claimed.append(RunningJob(job_id, threading.Event()))
            self._running.extend(claimed)
            return claimed

    def finish(self) -> None:
        with self._cond:
            self._running = []

    def running(self) -> str | None:
        with self._cond:
            return self._running[0].job_id if self._running else None

    def position(self, job_id: str) -> int | None:
        with self._cond:
            if any(r.job_id == job_id for r in self._running):
                return 0
            try:
                return self._waiting.index(job_id) + 1
            except ValueError:
                return None

    def remove_waiting(self, job_id: str) -> bool:
        with self._cond:
            try:
                self._waiting.remove(job_id)
                return True
            except ValueError:
                return False

    def cancel_running(self, job_id: str) -> bool:
        with self._cond:
            for r in self._running:
                if r.job_id == job_id:
                    r.cancel.set()
                    return True
            return False

    def snapshot(self) -> list[tuple[str, int]]:
        with self._cond:
            out = [(r.job_id, 0) for r in self._running]
            return out + [(j, i + 1) for i, j in enumerate(self._waiting)]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for r in self._running:
                r.cancel.set()
            self._cond.notify_all()


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
            try:
                batch = self._gather(running)
                if batch:
                    self.run_batch(batch)
                else:
                    self.run_job(running.job_id, running.cancel)
            except Exception:  # noqa: BLE001 - the worker must survive anything
                log.exception("job %s: unexpected failure outside the job", running.job_id)
            finally:
                self.queue.finish()

    # ------------------------------------------------------------------ dynamic batching
    def _gather(self, head: RunningJob) -> list | None:
        """``head`` and the jobs among the next ``max_batch_jobs - 1`` waiting ones (the batch
        window: no job moves ahead of more than that many) that can share its UNet batch
        (engine/batching.py's batch_key). None: run ``head`` alone."""
        from ..engine.batching import batch_key

        n = getattr(self.runner.settings, "max_batch_jobs", 1)
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
        from ..engine.plan import GenerationError, JobCancelled, GenerationResult
        from ..runner import rss_mb

        t0 = time.perf_counter()
        mem_before = rss_mb()
        ended: set[str] = set()  # ended before the batch did (cancelled)
        reports, cancels = [], []
        for running, (record, _job) in batch:
            record["attempts"] = record.get("attempts", 0) + 1
            self.store.write_job(running.job_id, record)
            reports.append(self._begin(running.job_id, record.get("payload"))[0])  # no step events in a batch
            cancels.append(self._batched_canceller(running, ended, t0))
        try:
            results = self.runner.engine.generate_batch([job.plan for _, (_, job) in batch], reports, cancels)
        except JobInterrupted:  # a graceful stop: every job of the batch goes back to the queue
            for running, (record, _job) in batch:
                self._payloads.pop(running.job_id, None)
                if running.job_id not in ended:
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
                elif isinstance(result, JobCancelled):
                    self._final_error(job_id, "cancelled", "cancelled by request", t0)
                elif isinstance(result, GenerationError):
                    self._final_error(job_id, "error", str(result), t0)
                else:
                    self._final_error(job_id, "error", f"{type(result).__name__}: {result}", t0)
            except JobFailed as e:
                self._final_error(job_id, "error", str(e), t0)

    def _batched_canceller(self, running: RunningJob, ended: set, t0: float):
        def cancelled() -> bool:
            if self._stopping.is_set():
                raise JobInterrupted()
            if running.cancel.is_set():
                if running.job_id not in ended:  # ends now; its row's remaining work is discarded
                    ended.add(running.job_id)
                    self._final_error(running.job_id, "cancelled", "cancelled by request", t0)
                return True
            return False
        return cancelled

    def _reporter(self, job_id: str, payload: dict | None = None, observer: "_LiveObserver | None" = None):
        last = {"t": 0.0, "phase": None}

        def report(phase: str, progress: float) -> None:
            if observer:
                observer.report(payload, phase, progress)
            now = time.perf_counter()
            # Throttled: a status write per step would cost more than tiny steps themselves.
            if phase != last["phase"] or now - last["t"] >= 0.05:
                last["t"], last["phase"] = now, phase
                self.store.write_status(job_id, JobStatus.processing(phase, progress))
        return report

    # ------------------------------------------------------------------ one job
    def run_job(self, job_id: str, cancel: threading.Event) -> None:
        from ..engine.plan import JobCancelled

        record = self.store.read_job(job_id)
        if record is None:
            return  # finished and read, or cancelled before it started
        status = self.store.read_status(job_id)
        if status is not None and status.is_final:
            return
        record["attempts"] = record.get("attempts", 0) + 1
        self.store.write_job(job_id, record)
        t0 = time.perf_counter()
        report, observer = self._begin(job_id, record.get("payload"))

        def cancelled() -> bool:
            if self._stopping.is_set():
                raise JobInterrupted()
            return cancel.is_set()

        try:
            if record["attempts"] > MAX_ATTEMPTS:
                raise JobFailed(f"interrupted by restart {MAX_ATTEMPTS} times; not retried again")
            final = self.runner.run(job_id, record.get("kind", "txt2img"), record["payload"], report, cancelled,
                                    **({"observer": observer} if observer else {}))
            self.store.write_status(job_id, final, fsync=True)
            self._ended(job_id, final)
        except JobInterrupted:  # a graceful stop is not a failed attempt: back to the queue as it was
            self._payloads.pop(job_id, None)
            record["attempts"] -= 1
            self.store.write_job(job_id, record)
            self.store.write_status(job_id, JobStatus.queued(), fsync=True)
        except JobCancelled:
            self._final_error(job_id, "cancelled", "cancelled by request", t0)
        except JobFailed as e:
            self._final_error(job_id, "error", str(e), t0)
        except Exception as e:  # noqa: BLE001 - a job's failure must not stop the worker
            log.exception("job %s failed", job_id)
            self._final_error(job_id, "error", f"{type(e).__name__}: {e}", t0)

    def _final_error(self, job_id: str, state, message: str, t0: float) -> None:
        from ..engine.pipelines import free_memory

        free_memory()
        status = JobStatus.failed(state, message, round(time.perf_counter() - t0, 3))
        self.store.write_status(job_id, status, fsync=True)
        self._ended(job_id, status)

    def _ended(self, job_id: str, status: JobStatus) -> None:
        """A final status is written: streams and webhooks first, then the long-polls."""
        self.on_ended(job_id, status, self._payloads.pop(job_id, None))
        self.on_final(job_id)

    def _begin(self, job_id: str, payload: dict | None):
        """A job starts running: its ``started`` event; the reporter that also feeds live progress."""
        self._payloads[job_id] = payload
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
            raise QueueFull()
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
        out = []
        for p in sorted(self.store.dir.glob("*_job.json")):
            job_id = p.name[: -len("_job.json")]
            st = self.store.read_status(job_id)
            record = self.store.read_job(job_id) or {}
            out.append(QueueEntry(job_id=job_id, state=st.state if st else "unknown",
                                  current_phase=st.current_phase if st else "",
                                  progress=st.progress if st else 0.0, queue_position=positions.get(job_id),
                                  kind=record.get("kind", "txt2img")))
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


__all__ = ["EmbeddedBackend", "JobQueue", "JobStore", "MAX_ATTEMPTS", "QueueFull", "Worker", "FINAL_STATES"]
