"""Job records on disk, the queue, and the one worker thread that owns the GPU.

Files, per the seed: ``QUEUE_DIR/<id>_job.json`` (the request as understood, written
with fsync before /txt2img answers, so a job survives a crash from that moment) and
``QUEUE_DIR/<id>.json`` (state, phase, progress, then the result). Both are replaced
atomically (temp file + rename): a reader never sees half a file. After the final read
of a finished job both are deleted; the image stays in the outputs directory.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import psutil

from .files import write_atomic
from .images import VERSION_TAG, build_infotext, encode_image
from .registry import display_path

log = logging.getLogger(__name__)

FINAL_STATES = ("done", "error", "cancelled")
MAX_ATTEMPTS = 3  # a job that keeps killing the server is not retried forever


class JobStore:
    def __init__(self, queue_dir: Path):
        self.dir = Path(queue_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def job_path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}_job.json"

    def status_path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.json"

    def create(self, job_id: str, payload: dict) -> None:
        record = {"job_id": job_id, "payload": payload, "created_at": time.time(), "attempts": 0}
        self.write_status(job_id, {"state": "queued", "current_phase": "queued", "progress": 0.0}, fsync=True)
        write_atomic(self.job_path(job_id), json.dumps(record).encode(), fsync=True)

    def read_job(self, job_id: str) -> dict | None:
        return _read_json(self.job_path(job_id))

    def write_job(self, job_id: str, record: dict) -> None:
        write_atomic(self.job_path(job_id), json.dumps(record).encode(), fsync=True)

    def read_status(self, job_id: str) -> dict | None:
        return _read_json(self.status_path(job_id))

    def write_status(self, job_id: str, status: dict, *, fsync: bool = False) -> None:
        write_atomic(self.status_path(job_id), json.dumps(status).encode(), fsync=fsync)

    def delete(self, job_id: str) -> None:
        for p in (self.status_path(job_id), self.job_path(job_id)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def set_aside(self, path: Path, reason: str) -> None:
        """Move a torn or corrupt record out of the way so start-up goes on."""
        bad = self.dir / "corrupt"
        bad.mkdir(exist_ok=True)
        log.error("job record %s is unreadable (%s); moved to %s", path.name, reason, bad)
        os.replace(path, bad / path.name)

    def recover(self) -> list[tuple[dict, dict | None]]:
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
                status = json.loads(sp.read_text())
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as e:
                self.set_aside(sp, str(e))
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


def rss_mb() -> float:
    return round(psutil.Process().memory_info().rss / 2**20, 2)


class QueueFull(Exception):
    pass


class JobInterrupted(Exception):
    """The server is shutting down: the job goes back to the queue, not to an error."""


@dataclass
class _Running:
    job_id: str
    cancel: threading.Event


class JobQueue:
    """The waiting line and the running job; positions are 0 for running, then 1, 2, ..."""

    def __init__(self, max_jobs: int):
        self.max_jobs = max_jobs
        self._waiting: deque[str] = deque()
        self._running: _Running | None = None
        self._cond = threading.Condition()
        self._closed = False

    def put(self, job_id: str, *, force: bool = False) -> None:
        with self._cond:
            if not force and self.size() >= self.max_jobs:
                raise QueueFull()
            self._waiting.append(job_id)
            self._cond.notify()

    def size(self) -> int:
        return len(self._waiting) + (1 if self._running else 0)

    def take(self) -> _Running | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            self._running = _Running(self._waiting.popleft(), threading.Event())
            return self._running

    def finish(self) -> None:
        with self._cond:
            self._running = None

    def position(self, job_id: str) -> int | None:
        with self._cond:
            if self._running and self._running.job_id == job_id:
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
            if self._running and self._running.job_id == job_id:
                self._running.cancel.set()
                return True
            return False

    def snapshot(self) -> list[tuple[str, int]]:
        with self._cond:
            out = [(self._running.job_id, 0)] if self._running else []
            return out + [(j, i + 1) for i, j in enumerate(self._waiting)]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            if self._running:
                self._running.cancel.set()
            self._cond.notify_all()


class Worker:
    """The one thread that runs jobs, in order, on the engine."""

    def __init__(self, settings, store: JobStore, queue: JobQueue, registry, engine_factory, on_final=None):
        self.settings = settings
        self.on_final = on_final or (lambda job_id: None)
        self.store = store
        self.queue = queue
        self.registry = registry
        self._engine_factory = engine_factory
        self._engine = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def engine(self):
        if self._engine is None:  # torch and the pipelines load on the worker, not at import
            self._engine = self._engine_factory()
        return self._engine

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
            self.engine  # import torch and pick the device now, not in the first job's time
        except Exception:  # noqa: BLE001 - reported again by the first job that needs it
            log.exception("engine failed to start")
        while not self._stopping.is_set():
            running = self.queue.take()
            if running is None:
                break
            try:
                self.run_job(running.job_id, running.cancel)
            except Exception:  # noqa: BLE001 - the worker must survive anything
                log.exception("job %s: unexpected failure outside the job", running.job_id)
            finally:
                self.queue.finish()

    # ------------------------------------------------------------------ one job
    def run_job(self, job_id: str, cancel: threading.Event) -> None:
        from .engine.sampling import JobCancelled
        from .resolve import RequestError, resolve_request
        from .schemas import Txt2ImgRequest

        record = self.store.read_job(job_id)
        if record is None:
            return  # finished and read, or cancelled before it started
        status = self.store.read_status(job_id) or {}
        if status.get("state") in FINAL_STATES:
            return
        record["attempts"] = record.get("attempts", 0) + 1
        self.store.write_job(job_id, record)
        t0 = time.perf_counter()
        mem_before = rss_mb()
        last = {"t": 0.0, "phase": None}

        def report(phase: str, progress: float) -> None:
            now = time.perf_counter()
            # Throttled: a status write per step would cost more than tiny steps themselves.
            if phase != last["phase"] or now - last["t"] >= 0.05:
                last["t"], last["phase"] = now, phase
                self.store.write_status(job_id, {"state": "processing", "current_phase": phase,
                                                 "progress": round(progress, 2)})

        def cancelled() -> bool:
            if self._stopping.is_set():
                raise JobInterrupted()
            return cancel.is_set()

        try:
            if record["attempts"] > MAX_ATTEMPTS:
                raise _Fail(f"interrupted by restart {MAX_ATTEMPTS} times; not retried again")
            try:
                req = Txt2ImgRequest.model_validate(record["payload"])
                spec = resolve_request(req, self.registry, self.settings)
            except RequestError as e:
                raise _Fail(f"cannot run any more: {e}") from e
            from .engine.engine import GenerationError

            try:
                result = self.engine.generate(spec, report, cancelled)
            except GenerationError as e:
                raise _Fail(str(e)) from e
            image = result.image
            infotext = build_infotext(req.prompt, req.negative_prompt, {**result.params, "Version": VERSION_TAG})
            data = encode_image(image, req.fileType, req.jpeg_quality, infotext)
            out_dir = Path(self.settings.outputs_dir)
            out_path = out_dir / f"{job_id}.{req.fileType}"
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                write_atomic(out_path, data)
            except OSError as e:
                raise _Fail(f"could not write the output image {display_path(out_path)}: {e.strerror or e}") from e
            final = {
                "state": "done", "current_phase": "done", "progress": 100.0,
                "payload": spec.request.model_dump(mode="json"),
                "output_path": display_path(out_path), "output_file": str(out_path.resolve()),
                "width": image.width, "height": image.height,
                "file_type": req.fileType, "jpeg_quality": req.jpeg_quality,
                "generation_time_sec": round(time.perf_counter() - t0, 3), "load_time_sec": result.load_time_sec,
                "memory_before_mb": mem_before, "memory_after_mb": rss_mb(), "seed": spec.seed,
                "infotext": infotext,
            }
            self.store.write_status(job_id, final, fsync=True)
            self.on_final(job_id)
        except JobInterrupted:  # a graceful stop is not a failed attempt: back to the queue as it was
            record["attempts"] -= 1
            self.store.write_job(job_id, record)
            self.store.write_status(job_id, {"state": "queued", "current_phase": "queued", "progress": 0.0},
                                    fsync=True)
        except JobCancelled:
            self._final_error(job_id, "cancelled", "cancelled by request", t0)
        except _Fail as e:
            self._final_error(job_id, "error", str(e), t0)
        except Exception as e:  # noqa: BLE001 - a job's failure must not stop the worker
            log.exception("job %s failed", job_id)
            self._final_error(job_id, "error", f"{type(e).__name__}: {e}", t0)

    def _final_error(self, job_id: str, state: str, message: str, t0: float) -> None:
        from .engine.pipelines import free_memory

        free_memory()
        self.store.write_status(job_id, {"state": state, "current_phase": state, "progress": 0.0,
                                         "error": message,
                                         "generation_time_sec": round(time.perf_counter() - t0, 3)}, fsync=True)
        self.on_final(job_id)


class _Fail(Exception):
    pass


class JobService:
    """What the routes call: submit, status, cancel, list. Owns store, queue and worker."""

    def __init__(self, settings, registry, engine_factory):
        self.settings = settings
        self.store = JobStore(settings.queue_dir)
        self.queue = JobQueue(settings.max_queued_jobs)
        self.worker = Worker(settings, self.store, self.queue, registry, engine_factory, on_final=self._notify)
        self._final_lock = threading.Lock()
        self._loop = None
        self._waiters: dict[str, list] = {}

    # Long-poll: GET /queue/{id}?wait=N returns as soon as the job is final.
    def _notify(self, job_id: str) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._wake, job_id)

    def _wake(self, job_id: str) -> None:
        for fut in self._waiters.pop(job_id, []):
            if not fut.done():
                fut.set_result(None)

    async def wait_final(self, job_id: str, timeout: float) -> None:
        st = self.store.read_status(job_id)
        if st is None or st.get("state") in FINAL_STATES or timeout <= 0:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(fut)
        st = self.store.read_status(job_id)  # it may have finished while we registered
        if st is None or st.get("state") in FINAL_STATES:
            self._wake(job_id)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pass
        finally:  # timed out or the client went away: forget this waiter
            waiters = self._waiters.get(job_id, [])
            if fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    self._waiters.pop(job_id, None)

    def start(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        for record, status in self.store.recover():
            job_id = record["job_id"]
            state = (status or {}).get("state")
            if state in FINAL_STATES:
                continue  # finished, not yet read: served once as usual
            if status is None:
                self.store.write_status(job_id, {"state": "queued", "current_phase": "queued", "progress": 0.0})
            elif state == "processing":
                log.warning("job %s was interrupted by a restart; running it again", job_id)
                self.store.write_status(job_id, {"state": "queued", "current_phase": "queued", "progress": 0.0})
            self.queue.put(job_id, force=True)
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()

    def submit(self, job_id: str, payload: dict) -> None:
        if self.queue.size() >= self.settings.max_queued_jobs:
            raise QueueFull()
        try:
            self.store.create(job_id, payload)
        except OSError:
            self.store.delete(job_id)
            raise
        try:
            self.queue.put(job_id)
        except QueueFull:
            self.store.delete(job_id)
            raise

    def status(self, job_id: str) -> dict | None:
        """The response for GET /queue/{id}; the final one deletes the job's files."""
        st = self.store.read_status(job_id)
        if st is None:
            return None
        state = st.get("state")
        resp = {"status": "error" if state == "error" else "success", "job_id": job_id,
                "progress": st.get("progress", 0.0), "current_phase": st.get("current_phase", state),
                "state": state, "error": st.get("error")}
        if state not in FINAL_STATES:
            pos = self.queue.position(job_id)
            if pos is not None:
                resp["queue_position"] = pos
            return resp
        with self._final_lock:  # exactly one reader gets the final response
            if not self.store.status_path(job_id).exists():
                return None
            if state == "done":
                try:
                    image = base64.b64encode(Path(st.get("output_file") or st["output_path"]).read_bytes()).decode()
                except OSError:
                    image = None
                resp.update({k: st.get(k) for k in ("payload", "output_path", "width", "height", "file_type",
                                                    "jpeg_quality", "generation_time_sec", "load_time_sec",
                                                    "memory_before_mb", "memory_after_mb", "seed", "infotext")})
                resp["image"] = image
            else:
                resp["generation_time_sec"] = st.get("generation_time_sec")
            self.store.delete(job_id)
        return resp

    def cancel(self, job_id: str) -> str | None:
        """'cancelled' (queued job, at once), 'cancelling' (running job), a final state, or None."""
        st = self.store.read_status(job_id)
        if st is None:
            return None
        if st.get("state") in FINAL_STATES:
            return st["state"]
        if self.queue.remove_waiting(job_id):
            self.store.write_status(job_id, {"state": "cancelled", "current_phase": "cancelled", "progress": 0.0,
                                             "error": "cancelled by request"}, fsync=True)
            self._notify(job_id)
            return "cancelled"
        if self.queue.cancel_running(job_id):
            return "cancelling"
        return st.get("state")

    def listing(self) -> list[dict]:
        positions = dict(self.queue.snapshot())
        out = []
        for p in sorted(self.store.dir.glob("*_job.json")):
            job_id = p.name[: -len("_job.json")]
            st = self.store.read_status(job_id) or {}
            out.append({"job_id": job_id, "state": st.get("state", "unknown"),
                        "current_phase": st.get("current_phase", ""), "progress": st.get("progress", 0.0),
                        "queue_position": positions.get(job_id)})
        out.sort(key=lambda j: (j["queue_position"] is None, j["queue_position"] or 0))
        return out
