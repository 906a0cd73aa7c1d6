"""One job from its recorded payload to its final status: resolve -> engine -> images on disk.

Shared by every backend's worker (the embedded thread today, Celery workers later): they
differ in where jobs wait and where status goes, not in how a job runs.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import psutil

from .engine.plan import Cancelled, Engine, GenerationError, Report
from .files import write_atomic
from .images import VERSION_TAG, build_infotext, encode_image
from .jobstatus import ImageRecord, JobStatus
from .registry import display_path
from .resolve import RequestError, resolve_job

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """The job ends in ``error`` with this message (the user can act on it)."""


class JobInterrupted(Exception):
    """The server is shutting down: the job goes back to the queue, not to an error."""


def rss_mb() -> float:
    return round(psutil.Process().memory_info().rss / 2**20, 2)


def output_name(job_id: str, index: int, count: int, ext: str) -> str:
    # One image keeps the seed's name; several are numbered.
    return f"{job_id}.{ext}" if count == 1 else f"{job_id}-{index}.{ext}"


class JobRunner:
    def __init__(self, settings, registry, engine_factory):
        self.settings = settings
        self.registry = registry
        self._engine_factory = engine_factory
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:  # torch and the pipelines load on the worker, not at import
            self._engine = self._engine_factory()
        return self._engine

    def run(self, job_id: str, kind: str, payload: dict, report: Report, cancelled: Cancelled) -> JobStatus:
        """The job's final ``done`` status. Raises JobFailed, engine.plan.JobCancelled or
        JobInterrupted (from ``cancelled``); anything else is a bug the caller records."""
        t0 = time.perf_counter()
        mem_before = rss_mb()
        try:
            job = resolve_job(kind, payload, self.registry, self.settings)
        except RequestError as e:
            raise JobFailed(f"cannot run any more: {e}") from e
        except ValueError as e:  # a payload that no longer validates (pydantic) after an upgrade
            raise JobFailed(f"cannot run any more: {e}") from e
        try:
            result = self.engine.generate(job.plan, report, cancelled)
        except GenerationError as e:
            raise JobFailed(str(e)) from e
        plan, out = job.plan, job.output
        out_dir = Path(self.settings.outputs_dir)
        records = []
        for i, gen in enumerate(result.images):
            infotext = build_infotext(plan.prompt, plan.negative_prompt, {**gen.params, "Version": VERSION_TAG})
            data = encode_image(gen.image, out.file_type, out.jpeg_quality, infotext)
            path = out_dir / output_name(job_id, i, len(result.images), out.file_type)
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                write_atomic(path, data)
            except OSError as e:
                raise JobFailed(f"could not write the output image {display_path(path)}: {e.strerror or e}") from e
            records.append(ImageRecord(output_path=display_path(path), output_file=str(path.resolve()),
                                       seed=gen.seed, infotext=infotext, width=gen.image.width,
                                       height=gen.image.height))
        first = records[0]
        return JobStatus(
            state="done", current_phase="done", progress=100.0, payload=job.echo,
            output_path=first.output_path, output_file=first.output_file, width=first.width, height=first.height,
            file_type=out.file_type, jpeg_quality=out.jpeg_quality,
            generation_time_sec=round(time.perf_counter() - t0, 3), load_time_sec=result.load_time_sec,
            memory_before_mb=mem_before, memory_after_mb=rss_mb(), seed=first.seed, infotext=first.infotext,
            images=records if len(records) > 1 else None)
