"""A cluster worker runs a job exactly as the embedded worker does (``runner.JobRunner``: resolve
against this host's files, generate, write ``outputs/``), then hands the final status and the
image bytes to Redis, so API nodes need no shared filesystem."""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("diffusionapi.worker")


def runner_of(worker):
    runner = getattr(worker, "_runner", None)
    if runner is None:
        from ...runner import JobRunner

        runner = worker._runner = JobRunner(worker.settings, worker.registry, lambda: worker.engine)
    runner.registry = worker.registry  # refreshed by the heartbeat's rescans
    return runner


def preload(worker, model_name: str) -> None:
    """Load the worker's home model now (real engine only), so its first job does not pay for it."""
    engine = worker.engine
    cache = getattr(engine, "cache", None)
    entry = next((m for m in worker.models if m.name == model_name), None)
    if cache is not None and entry is not None and hasattr(cache, "get"):
        cache.get(entry, keep=(entry.name,))
    worker.loaded_model = model_name


def _free_memory() -> None:
    if "torch" in sys.modules:  # the sleep engine never imports torch
        from ....engine.pipelines import free_memory

        free_memory()


def execute_job(worker, job_id: str, record: dict, progress) -> tuple[dict, list[bytes]]:
    """``progress``: the job's ``worker.JobProgress`` (report + step observer)."""
    from ...states import final_state_of
    from ...status import JobStatus

    t0 = time.perf_counter()
    kind, payload = record.get("kind", "txt2img"), record["payload"]

    def failed(state: str, message: str) -> tuple[dict, list[bytes]]:
        _free_memory()
        return JobStatus.failed(state, message, round(time.perf_counter() - t0, 3)).to_record(), []

    try:
        final = runner_of(worker).run(job_id, kind, payload, progress.report, worker.cancel_check(job_id),
                                      observer=progress)
    except Exception as e:  # noqa: BLE001 - a job's failure must not stop the worker
        return failed(*final_state_of(e, job_id))
    finally:
        if payload.get("model"):
            worker.loaded_model = payload["model"]
    return final.to_record(), list(final._encoded)
