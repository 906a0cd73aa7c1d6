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
from typing import Callable

import torch

# Fields that differ per row; every other plan field must be equal for two jobs to share a batch.
ROW_FIELDS = frozenset({"prompt", "negative_prompt", "seed"})
# A job with any of these set (not None / False / empty) runs alone.
SOLO_IF_SET = ("refiner", "hires", "init_image", "mask", "preview")


def _frozen(value):
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


def batch_key(plan) -> tuple | None:
    """What a job must share with others to run in one batch, or None when it must run alone."""
    if not dataclasses.is_dataclass(plan):
        return None
    for name in SOLO_IF_SET:
        if getattr(plan, name, None):
            return None
    if getattr(plan, "batch_size", 1) != 1 or getattr(plan, "n_iter", 1) != 1:
        return None
    sampler = getattr(plan, "sampler", None)
    spec = getattr(sampler, "spec", None)
    if spec is not None and getattr(spec, "algorithm", None) == "dpm_adaptive":
        return None
    return tuple((f.name, _frozen(getattr(plan, f.name))) for f in dataclasses.fields(plan)
                 if f.name not in ROW_FIELDS)


class BatchNoise:
    """The noise interface of one job's ``NoiseFactory`` over several jobs: row i draws from job i's
    generator exactly what job i would draw alone."""

    def __init__(self, factories):
        self.factories = list(factories)

    def initial(self, shape, device) -> torch.Tensor:
        one = (1,) + tuple(shape[1:])
        return torch.cat([f.initial(one, device) for f in self.factories])

    def source(self, algorithm: str, x: torch.Tensor, sigmas: torch.Tensor):
        rows = [f.source(algorithm, x[i:i + 1], sigmas) for i, f in enumerate(self.factories)]
        return RowNoise(rows)


class RowNoise:
    def __init__(self, rows):
        self.rows = rows

    def __call__(self, sigma=None, sigma_next=None) -> torch.Tensor:
        return torch.cat([r(sigma, sigma_next) for r in self.rows])


def stack_conditioning(conds):
    """Several jobs' [uncond; cond] conditionings as one: [uncond_1..uncond_n; cond_1..cond_n],
    the layout the CFG denoiser splits in two. None when their shapes differ (e.g. a long prompt
    encoded in more 77-token chunks than the others): those jobs run alone."""
    from .sampling import Conditioning

    if len({tuple(c.embeds.shape) for c in conds}) != 1:
        return None

    def stack(tensors):
        halves = [t.chunk(2) for t in tensors]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])

    added = None
    if conds[0].added is not None:
        added = {k: stack([c.added[k] for c in conds]) for k in conds[0].added}
    return Conditioning(stack([c.embeds for c in conds]), added)


class Rows:
    """Per-job cancel and progress for the rows of one batch. A cancelled row stops reporting at
    once (the worker ends that job then); the batch stops only when every row is cancelled."""

    def __init__(self, cancelled: list[Callable[[], bool]]):
        self.cancelled = cancelled
        self.alive = [True] * len(cancelled)

    def check(self) -> None:
        from .sampling import JobCancelled

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
