"""Dynamic batching: queued jobs that differ only in prompt, negative prompt and seed run as one UNet batch.

Each job is a *row* of the batch: its own conditioning, its own seeded CPU generator (initial noise
and every ancestral draw come from it, in the order a solo run draws them), its own progress, cancel
and result. What must be equal for two jobs to share a batch is everything else in the plan: model,
size, sampler and schedule, steps, CFG scale, LoRA set and scales, and every other plan field; jobs
with a refiner, hires fix, several images, or DPM adaptive (its step sizes depend on the whole batch's
error) always run alone.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

# Fields that differ per row; every other plan field must be equal for two jobs to share a batch.
ROW_FIELDS = frozenset({"prompt", "negative_prompt", "seed"})
# A job with any of these set (not None / False / empty) runs alone.
SOLO_IF_SET = ("refiner", "hires", "init", "init_image", "mask", "preview", "controlnets", "ip_adapters",
               "keep_partial", "step_cache")  # step_cache: its hooks and state are per run


def _frozen(value):
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


# MAX_BATCH_JOBS when unset: batching pays on a GPU (2.95x images/s with 8 clients on an H100,
# docs/performance.md); a CPU gains nothing from larger batches, so there jobs run one by one.
GPU_MAX_BATCH_JOBS = 8


def max_batch_jobs(settings, device) -> int:
    """The batch window: MAX_BATCH_JOBS, else GPU_MAX_BATCH_JOBS on CUDA and 1 elsewhere."""
    chosen = getattr(settings, "max_batch_jobs", None)
    if chosen:
        return int(chosen)
    return GPU_MAX_BATCH_JOBS if getattr(device, "type", None) == "cuda" else 1


def batch_key(plan) -> tuple | None:
    """What a job must share with others to run in one batch, or None when it must run alone."""
    if not dataclasses.is_dataclass(plan):
        return None
    for name in SOLO_IF_SET:
        if getattr(plan, name, None):
            return None
    if getattr(plan, "batch_size", 1) != 1 or getattr(plan, "n_iter", 1) != 1:
        return None
    model = getattr(plan, "model", None)
    if model is not None and _flow_family(getattr(model, "family", "")):
        return None  # flow families (Flux) run their own denoiser: each job alone
    sampler = getattr(plan, "sampler", None)
    spec = getattr(sampler, "spec", None)
    if spec is not None and getattr(spec, "algorithm", None) == "dpm_adaptive":
        return None
    return tuple((f.name, _frozen(getattr(plan, f.name))) for f in dataclasses.fields(plan)
                 if f.name not in ROW_FIELDS)


def _flow_family(family: str) -> bool:
    from ..families import BY_ID

    fam = BY_ID.get(str(family))
    return fam is not None and fam.prediction == "flow"


def stack_conditioning(conds):
    """Several jobs' conditionings as one whose rows are per job: [negative_1..negative_n;
    part_1..part_n; ...], the layout the CFG denoiser splits by image. None unless every job's is
    static (no prompt editing) with the same AND weights and the same shapes: those run alone."""
    first = conds[0]
    if not all(getattr(c, "is_static", False) for c in conds) or any(c.weights != first.weights for c in conds):
        return None
    parts = [c.batch(0) for c in conds]
    if len({tuple(p[0].shape) for p in parts}) != 1:
        return None
    return StackedConditioning(conds, parts)


class StackedConditioning:
    per_row = True  # rows already hold one entry per image (CFGDenoiser must not repeat them)

    def __init__(self, conds, parts):
        self.weights = conds[0].weights
        rows = parts[0][0].shape[0]

        def interleave(tensors):  # row r of every job, then row r + 1 of every job
            return torch.cat([t[r:r + 1] for r in range(rows) for t in tensors])

        self._embeds = interleave([p[0] for p in parts])
        added = parts[0][1]
        self._added = None if added is None else {k: interleave([p[1][k] for p in parts]) for k in added}

    def batch(self, step: int):
        return self._embeds, self._added


class Rows:
    """Per-job cancel and progress for the rows of one batch. A cancelled row stops reporting at
    once (the worker ends that job then); the batch stops only when every row is cancelled."""

    def __init__(self, cancelled: list[Callable[[], bool]]):
        self.cancelled = cancelled
        self.alive = [True] * len(cancelled)

    def check(self) -> None:
        from .plan import JobCancelled

        for i, is_cancelled in enumerate(self.cancelled):
            if self.alive[i] and is_cancelled():
                self.alive[i] = False
        if not any(self.alive):
            raise JobCancelled()

    def fan_out(self, updates: list[Callable[[float], None]]) -> Callable[[float], None]:
        def update(fraction: float) -> None:
            for i, u in enumerate(updates):
                if self.alive[i]:
                    u(fraction)
        return update


def generate_batch(engine, plans, reports, cancelled, stage_progress, job_text) -> list:
    """Run ``plans`` (one ``batch_key``) as one UNet batch on ``engine``; a GenerationResult or an
    exception per plan (``stage_progress``, ``job_text``: the engine's per-job progress and text). Everything but the UNet (encoding, noise, decoding) runs per row, as
    alone, so a row's image differs from its solo image only by the batched kernels' rounding."""
    from . import fastmode
    from .plan import GeneratedImage, GenerationError, GenerationResult, JobCancelled
    from .sampling import CFGDenoiser, NoiseFactory, make_schedule

    if len(plans) == 1 or len({batch_key(p) for p in plans}) != 1 or batch_key(plans[0]) is None:
        return [_solo(engine, p, r, c) for p, r, c in zip(plans, reports, cancelled)]
    first = plans[0]
    engine.batches.append(len(plans))
    progresses = [stage_progress(r) for r in reports]
    rows = Rows(cancelled)
    t_load = time.perf_counter()
    try:
        loaded = engine.cache.is_loaded(first.model.name)
        for p in progresses:
            p.phase("generation" if loaded else "loading model")
        base = engine._load(first.model, progresses[0], keep=(first.model.name,))
        load_time = time.perf_counter() - t_load
        engine.loras.apply(base, first.loras)
        fastmode.set_fused(base.pipe.unet, not first.loras)
        rows.check()
        schedule = make_schedule(base, first.sampler, first.steps)
        noise = NoiseFactory.for_seeds([p.seed for p in plans])  # each row its own seeded streams
        shape = (len(plans), base.pipe.unet.config.in_channels, first.height // 8, first.width // 8)
        x = noise.initial(shape, engine.device) * schedule.start_sigma
        texts = [job_text(p, engine._lora_key(p.loras)) for p in plans]
        cond = stack_conditioning([engine._conditioning(base, t, p.width, p.height) for t, p in zip(texts, plans)])
        if cond is None:  # prompt editing, AND parts or lengths differ: no common batch
            engine.batches.pop()
            return [_solo(engine, p, r, c) for p, r, c in zip(plans, reports, cancelled)]
        den = CFGDenoiser(base, cond, first.cfg_scale, rows.check, cfg_rescale=first.cfg_rescale)
        latents = schedule.run(den, x, noise, rows.fan_out([p.stage("generation", 0.0, 100.0) for p in progresses]))
    except (JobCancelled, GenerationError) as e:  # every row cancelled, or a failure shared by all
        return [e if alive else JobCancelled() for alive in rows.alive]
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        from .pipelines import free_memory

        free_memory()
        err = GenerationError(f"out of GPU memory in a batch of {len(plans)} jobs: try a smaller size "
                              f"or fewer batched jobs (DIFFUSIONAPI_MAX_BATCH_JOBS)")
        err.__cause__ = e
        return [err] * len(plans)
    out: list = []
    for i, plan in enumerate(plans):
        if not rows.alive[i]:
            out.append(JobCancelled())
            continue
        try:
            image = engine._decode(base, latents[i:i + 1], plan.width, plan.height)
            out.append(GenerationResult([GeneratedImage(image, plan.seed, engine._params(plan, texts[i]))],
                                        round(load_time, 3) if i == 0 else 0.0, warnings=texts[i].warnings))
        except Exception as e:  # noqa: BLE001 - one row's failure (a NaN decode) is that job's alone
            out.append(e)
    return out


def _solo(engine, plan, report, cancelled):
    from .plan import GenerationError, JobCancelled

    try:
        return engine.generate(plan, report, cancelled)
    except (JobCancelled, GenerationError) as e:
        return e
