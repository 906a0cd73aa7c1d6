"""One job from its recorded payload to its final status: resolve -> engine -> images on disk.

Shared by every backend's worker (the embedded thread today, Celery workers later): they
differ in where jobs wait and where status goes, not in how a job runs.
"""
from __future__ import annotations

import gc
import inspect
import logging
import time
from pathlib import Path

import psutil

from ..engine.plan import Cancelled, Engine, GenerationError, Report, StepObserver, UpscalePlan
from ..files import write_atomic
from ..images import VERSION_TAG, build_infotext, encode_image
from .states import JobFailed, JobInterrupted  # noqa: F401 - re-exported for the workers
from .status import ImageRecord, JobStatus
from ..registry import display_path
from .resolve import RequestError, resolve_job

log = logging.getLogger(__name__)


def rss_mb() -> float:
    return round(psutil.Process().memory_info().rss / 2**20, 2)


def freeze_imports() -> None:
    """Move every object alive now (torch, diffusers and transformers just imported: ~370,000 of
    them, alive for the whole process) out of the garbage collector's reach. Otherwise each full
    collection walks them all: pauses of 0.2-0.5 s in the middle of requests on a small CPU.
    Once per process, before any pipeline loads: pipelines stay collectable (a model switch must
    free them)."""
    global _imports_frozen
    if _imports_frozen:
        return
    _imports_frozen = True
    gc.collect()
    gc.freeze()


_imports_frozen = False


def output_name(job_id: str, index: int, count: int, ext: str) -> str:
    # One image keeps the seed's name; several are numbered.
    return f"{job_id}.{ext}" if count == 1 else f"{job_id}-{index}.{ext}"


def _takes_observer(engine) -> bool:
    try:
        return "observer" in inspect.signature(engine.generate).parameters
    except (TypeError, ValueError):
        return False


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
            freeze_imports()
        return self._engine

    def resolve(self, kind: str, payload: dict):
        try:
            return resolve_job(kind, payload, self.registry, self.settings)
        except RequestError as e:
            raise JobFailed(f"cannot run any more: {e}") from e
        except ValueError as e:  # a payload that no longer validates (pydantic) after an upgrade
            raise JobFailed(f"cannot run any more: {e}") from e

    def run(self, job_id: str, kind: str, payload: dict, report: Report, cancelled: Cancelled,
            observer: StepObserver | None = None) -> JobStatus:
        """The job's final ``done`` status. Raises JobFailed, engine.plan.JobCancelled or
        JobInterrupted (from ``cancelled``); anything else is a bug the caller records."""
        t0 = time.perf_counter()
        mem_before = rss_mb()
        job = self.resolve(kind, payload)
        try:
            if observer is not None and _takes_observer(self.engine):
                result = self.engine.generate(job.plan, report, cancelled, observer)
            else:  # an engine without step reporting (a test double): progress still flows
                result = self.engine.generate(job.plan, report, cancelled)
        except GenerationError as e:
            raise JobFailed(str(e)) from e
        return self.finish(job_id, job, result, t0, mem_before)

    def finish(self, job_id: str, job, result, t0: float, mem_before: float) -> JobStatus:
        """The images of ``result`` written to the outputs directory, as the job's ``done`` status."""
        plan, out = job.plan, job.output
        out_dir = Path(self.settings.outputs_dir)
        records, encoded = [], []
        t_encode = time.perf_counter()
        # Generation time (since t0) less what the model load and the VAE decode took is sampling.
        decode = getattr(result, "decode_time_sec", 0.0) or 0.0
        work = max(0.0, t_encode - t0 - (result.load_time_sec or 0.0) - decode)
        for i, gen in enumerate(result.images):
            infotext = build_infotext(plan.prompt, plan.negative_prompt, {**gen.params, "Version": VERSION_TAG})
            data = encode_image(gen.image, out.file_type, out.jpeg_quality, infotext)
            path = out_dir / output_name(job_id, i, len(result.images), out.file_type)
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                write_atomic(path, data)
            except OSError as e:
                raise JobFailed(f"could not write the output image {display_path(path)}: {e.strerror or e}") from e
            encoded.append(data)
            records.append(ImageRecord(output_path=display_path(path), output_file=str(path.resolve()),
                                       seed=gen.seed, infotext=infotext, width=gen.image.width,
                                       height=gen.image.height))
        first = records[0]
        phases = {"upscale" if isinstance(plan, UpscalePlan) else "sampling": round(work, 3)}
        if decode:
            phases["decode"] = round(decode, 3)
        phases["encode"] = round(time.perf_counter() - t_encode, 3)
        status = JobStatus(
            state="done", current_phase="done", progress=100.0, payload=job.echo,
            output_path=first.output_path, output_file=first.output_file, width=first.width, height=first.height,
            file_type=out.file_type, jpeg_quality=out.jpeg_quality,
            generation_time_sec=round(time.perf_counter() - t0, 3), load_time_sec=result.load_time_sec,
            memory_before_mb=mem_before, memory_after_mb=rss_mb(), seed=first.seed, infotext=first.infotext,
            images=records if len(records) > 1 else None, warnings=result.warnings or None, phase_sec=phases)
        status._encoded = encoded
        return status

    def warm_up(self) -> None:
        """Run each of ``settings.warmup_shapes`` once (2 steps) before the first job: the model
        loads and torch.compile compiles that shape now, not in a user's job. A batch of N runs
        N rows in one UNet batch, the shape of N batched jobs."""
        from ..engine.fastmode import parse_warmup_shapes

        try:
            shapes = parse_warmup_shapes(getattr(self.settings, "warmup_shapes", ""))
        except ValueError as e:
            log.error("%s; no warm-up", e)
            return
        for shape in shapes:
            t0 = time.perf_counter()
            payload = {"prompt": "warm-up", "width": shape.width, "height": shape.height, "steps": 2, "seed": 0}
            if shape.model:
                payload["model"] = shape.model
            try:
                plan = self.resolve("txt2img", payload).plan
                plans = [plan] * shape.batch
                results = self.engine.generate_batch(plans, [lambda phase, p: None] * shape.batch,
                                                     [lambda: False] * shape.batch)
                failed = next((r for r in results if isinstance(r, BaseException)), None)
                if failed is not None:
                    raise failed
            except Exception as e:  # noqa: BLE001 - a bad shape must not keep the server from serving
                log.error("warm-up %s failed: %s", shape, e)
                continue
            log.info("warm-up %s done in %.1f s", shape, time.perf_counter() - t0)
