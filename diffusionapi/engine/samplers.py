"""The sampler table: every A1111 sampler name and scheduler type, and how each runs.

This module is the one place that knows which combinations exist. ``kind`` says which
runner executes a sampler: "k" samplers run on ``engine.kdiffusion`` (our own
implementation of the k-diffusion family over sigmas), "timestep" samplers run a
diffusers scheduler class over discrete timesteps, as A1111 does for DDIM/PLMS/UniPC.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The seed's order, which /sampling_methods must keep.
SAMPLER_NAMES: tuple[str, ...] = (
    "Euler", "Euler a", "Heun", "DPM2", "DPM++ 2S a", "DPM++ 2M", "DPM++ 2M Karras",
    "DPM++ SDE", "DPM++ SDE Karras", "DPM fast", "DPM adaptive", "LMS", "LMS Karras",
    "DDIM", "PLMS", "UniPC",
)
# The seed's five, then A1111 1.10's (and ComfyUI's) Simple, SGM Uniform, Beta and KL Optimal,
# which Flux and SD 3 users pick; the k-diffusion samplers take them on every family.
TIMESTEP_SCHEDULER_TYPES: tuple[str, ...] = ("default", "karras", "exponential", "ddim", "pndm")
SCHEDULER_TYPES: tuple[str, ...] = TIMESTEP_SCHEDULER_TYPES + ("simple", "sgm_uniform", "beta", "kl_optimal")

# What the infotext's "Schedule type:" says for each resolved schedule.
SCHEDULE_LABELS = {
    "default": "Normal", "karras": "Karras", "exponential": "Exponential",
    "ddim": "DDIM", "pndm": "PNDM", "logsnr": "Automatic",
    "simple": "Simple", "sgm_uniform": "SGM Uniform", "beta": "Beta", "kl_optimal": "KL Optimal",
}


@dataclass(frozen=True)
class SamplerSpec:
    name: str            # the A1111 name a request uses
    base_name: str       # what the infotext's "Sampler:" says (A1111 writes "DPM++ 2M" + "Schedule type: Karras")
    kind: str            # "k" or "timestep"
    algorithm: str       # key in kdiffusion.FIXED_ALGORITHMS (or dpm_fast/dpm_adaptive), or a diffusers scheduler class name
    schedules: tuple[str, ...]
    implicit_schedule: str  # used when the request names no scheduler_type
    stochastic: bool = False
    discard_penultimate_sigma: bool = False  # A1111 does this for DPM2
    scheduler_kwargs: dict[str, Any] = field(default_factory=dict)


def _k(name, algorithm, *, base=None, schedules=SCHEDULER_TYPES, implicit="karras", **kw):
    return SamplerSpec(name, base or name, "k", algorithm, schedules, implicit, **kw)


_KARRAS_ONLY = ("karras", "default")

SAMPLERS: dict[str, SamplerSpec] = {s.name: s for s in (
    _k("Euler", "euler"),
    _k("Euler a", "euler_ancestral", stochastic=True),
    _k("Heun", "heun"),
    _k("DPM2", "dpm_2", discard_penultimate_sigma=True),
    _k("DPM++ 2S a", "dpmpp_2s_ancestral", stochastic=True),
    _k("DPM++ 2M", "dpmpp_2m"),
    _k("DPM++ 2M Karras", "dpmpp_2m", base="DPM++ 2M", schedules=_KARRAS_ONLY),
    _k("DPM++ SDE", "dpmpp_sde", stochastic=True),
    _k("DPM++ SDE Karras", "dpmpp_sde", base="DPM++ SDE", schedules=_KARRAS_ONLY, stochastic=True),
    # DPM fast/adaptive step uniformly in log-SNR between the model's sigma bounds: they
    # have no sigma schedule to choose, so only "default" is accepted.
    _k("DPM fast", "dpm_fast", schedules=("default",), implicit="default", stochastic=True),
    _k("DPM adaptive", "dpm_adaptive", schedules=("default",), implicit="default", stochastic=True),
    _k("LMS", "lms"),
    _k("LMS Karras", "lms", base="LMS", schedules=_KARRAS_ONLY),
    SamplerSpec("DDIM", "DDIM", "timestep", "DDIMScheduler", ("default", "ddim", "pndm"), "ddim",
                scheduler_kwargs={"set_alpha_to_one": False, "clip_sample": False}),
    SamplerSpec("PLMS", "PLMS", "timestep", "PNDMScheduler", ("default", "pndm", "ddim"), "pndm",
                scheduler_kwargs={"skip_prk_steps": True}),
    SamplerSpec("UniPC", "UniPC", "timestep", "UniPCMultistepScheduler", TIMESTEP_SCHEDULER_TYPES, "karras"),
)}
assert tuple(SAMPLERS) == SAMPLER_NAMES


class SamplerChoiceError(ValueError):
    """A sampler/scheduler combination that cannot run exactly as named."""


@dataclass(frozen=True)
class ResolvedSampler:
    spec: SamplerSpec
    schedule: str  # one of SCHEDULER_TYPES after defaults, or "logsnr" for DPM fast/adaptive

    @property
    def infotext_sampler(self) -> str:
        return self.spec.base_name

    @property
    def infotext_schedule(self) -> str:
        return SCHEDULE_LABELS[self.schedule]


def resolve_sampler(name: str, scheduler_type: str | None) -> ResolvedSampler:
    """Turn a request's (sampler_name, scheduler_type) into exactly what will run."""
    spec = SAMPLERS.get(name)
    if spec is None:
        raise SamplerChoiceError(f"unknown sampler {name!r}; valid choices: {', '.join(SAMPLER_NAMES)}")
    if scheduler_type is not None and scheduler_type not in SCHEDULER_TYPES:
        raise SamplerChoiceError(
            f"unknown scheduler type {scheduler_type!r}; valid choices: {', '.join(SCHEDULER_TYPES)}")
    requested = scheduler_type or spec.implicit_schedule
    if requested not in spec.schedules:
        raise SamplerChoiceError(
            f"sampler {name!r} cannot run with scheduler_type {requested!r}; "
            f"valid choices for it: {', '.join(spec.schedules)}")
    schedule = requested
    if spec.name.endswith("Karras"):
        schedule = "karras"
    elif spec.kind == "timestep" and requested == "default":
        schedule = spec.implicit_schedule if spec.implicit_schedule != "karras" else "default"
    if spec.algorithm in ("dpm_fast", "dpm_adaptive"):
        schedule = "logsnr"
    return ResolvedSampler(spec, schedule)


def resolved_scheduler_type(r: ResolvedSampler) -> str:
    """The value to echo back in the payload's scheduler_type."""
    return "default" if r.schedule == "logsnr" else r.schedule
