"""Running a sampler over a loaded model: conditioning, the CFG denoiser, sampling schedules.

A *schedule* is the part of a noise schedule one stage runs. Everything between stages is
exchanged in the variance-exploding form x = x0 + sigma * eps, so a base model can hand
its half-denoised latents to a refiner, and a hires pass can re-noise an upscaled image,
with any sampler.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..vocabulary import SDXL_REFINER
from . import kdiffusion as kd
from .conditioning import PromptEncoder, StageConditioning
from .flow import TIME_SPACE_SCHEDULES, sigmas_in_flow_time
from .guidance import rescale_cfg
from .samplers import ResolvedSampler


def encode(loaded, prompt: str, negative: str, width: int, height: int, *, prompts: PromptEncoder | None = None,
           clip_skip: int = 1, total_steps: int = 1, hires_steps: int | None = None, embeddings=(),
           extra_key: tuple = ()) -> StageConditioning:
    """One stage's conditioning in A1111's prompt language (engine/conditioning.py; ``prompt``
    without its LoRA tags; ``prompts`` holds the cache); for SDXL also the micro-conditioning
    (original = target size)."""
    prompts = prompts or PromptEncoder(0)
    pipe = loaded.pipe
    xl = loaded.xl
    cond = prompts.build(pipe, xl=xl, prompt=prompt, negative=negative, clip_skip=clip_skip,
                         total_steps=total_steps, hires_steps=hires_steps, embeddings=embeddings,
                         extra_key=extra_key,
                         zero_empty_negative=xl and bool(pipe.config.get("force_zeros_for_empty_prompt", False)))
    if not xl:
        return cond
    device = pipe._execution_device  # the compute device, also under CPU offload
    size = (height, width)
    proj = pipe.text_encoder_2.config.projection_dim
    dtype = pipe.text_encoder_2.dtype
    if loaded.family == SDXL_REFINER:
        ids, uids = pipe._get_add_time_ids(size, (0, 0), size, 6.0, 2.5, size, (0, 0), size,
                                           dtype=dtype, text_encoder_projection_dim=proj)
    else:
        ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=proj)
        uids = ids
    cond.time_ids, cond.neg_time_ids = ids.to(device), uids.to(device)
    return cond


class CFGDenoiser:
    """Classifier-free-guided UNet, usable as a k-diffusion denoiser D(x, sigma) -> x0
    and as a diffusers-style model output eps(x, t).

    Each model evaluation takes the conditioning of its step (prompt editing, alternation),
    counting evaluations from ``step_offset`` as A1111 does, and combines AND parts as A1111
    does: uncond + cfg * sum(w_i * (cond_i - uncond))."""

    def __init__(self, loaded, cond: StageConditioning, cfg_scale: float, on_eval: Callable[[], None],
                 step_offset: int = 0, cfg_rescale: float = 0.0):
        self.unet = loaded.pipe.unet
        self.ms = loaded.sigmas
        self.cond = cond
        self.cfg = cfg_scale
        self.rescale = float(cfg_rescale)
        self.vpred = loaded.prediction_type == "v_prediction"
        self.on_eval = on_eval
        self.dtype = self.unet.dtype
        self.evals = 0
        self.step_offset = step_offset
        self._x0 = None  # the latest denoised estimate (or a function making it), for previews
        # A1111's sampling step (engine/controlnet/units.StepClock), set when ControlNet units need it.
        self.clock = None

    def latest_x0(self) -> torch.Tensor | None:
        x0 = self._x0
        return x0() if callable(x0) else x0

    def model_output(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.on_eval()
        embeds, added = self.cond.batch(self.step_offset + self.evals)
        self.evals += 1
        t = t.reshape(-1)[:1].to(torch.float32)
        rows, b = embeds.shape[0], x_in.shape[0]
        per_row = getattr(self.cond, "per_row", False)  # batched jobs: one conditioning row per image
        if per_row:
            rows //= b
        xin = x_in.repeat(rows, *([1] * (x_in.dim() - 1))).to(self.dtype)
        if b > 1 and not per_row:  # several images of one job: each conditioning row once per image
            embeds = embeds.repeat_interleave(b, 0)
            added = {k: v.repeat_interleave(b, 0) for k, v in added.items()} if added else added
        out = self.unet(xin, t.to(x_in.device).expand(rows * b), encoder_hidden_states=embeds,
                        added_cond_kwargs=added, return_dict=False)[0]
        outs = out.float().split(b)
        uncond = outs[0]
        guided = uncond
        for weight, cond in zip(self.cond.weights, outs[1:]):
            guided = guided + (cond - uncond) * (weight * self.cfg)
        if self.rescale:
            guided = rescale_cfg(guided, uncond, outs[1:], self.cond.weights, self.rescale)
        return guided

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = float(sigma.reshape(-1)[0])
        c_in = 1 / math.sqrt(s * s + 1)
        t = self.ms.sigma_to_t(torch.tensor(s, dtype=torch.float64))
        out = self.model_output(x * c_in, t)
        if self.vpred:
            x0 = x * (1 / (s * s + 1)) - out * (s * c_in)
        else:
            x0 = x - out * s
        self._x0 = x0
        return x0


@dataclass
class NoiseFactory:
    """Seeded Gaussian noise from CPU generators, one per image of a batch (``more`` holds the
    (generator, seed) of images 2..n), so an image is the same alone or in a batch."""
    generator: torch.Generator
    seed: int
    more: tuple = ()

    @classmethod
    def for_seeds(cls, seeds) -> "NoiseFactory":
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        return cls(gens[0], int(seeds[0]), tuple(zip(gens[1:], (int(s) for s in seeds[1:]))))

    @property
    def streams(self) -> list:
        return [(self.generator, self.seed), *self.more]

    def draw(self, shape) -> torch.Tensor:
        if not self.more:
            return torch.randn(shape, generator=self.generator, dtype=torch.float32)
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32) for g, _ in self.streams])

    def initial(self, shape, device) -> torch.Tensor:
        return self.draw(shape).to(device)

    def sampler_noise(self, like: torch.Tensor):
        """Fresh noise per step (ancestral and SDE samplers)."""
        return lambda sigma=None, sigma_next=None: self.draw(like.shape).to(like.device, like.dtype)

    def brownian(self, like: torch.Tensor, sigma_min: float, sigma_max: float):
        """DPM++ SDE's Brownian-tree noise, one tree per image seeded by its seed."""
        if not self.more:
            return kd.BrownianNoise(like, sigma_min, sigma_max, self.seed)
        trees = [kd.BrownianNoise(like[i:i + 1], sigma_min, sigma_max, seed) for i, (_, seed) in enumerate(self.streams)]
        return lambda sigma, sigma_next: torch.cat([tree(sigma, sigma_next) for tree in trees])


# ---------------------------------------------------------------------------- schedules

@dataclass
class SigmaSchedule:
    """A slice of a sigma schedule for one of our k-diffusion samplers."""
    sampler: ResolvedSampler
    sigmas: torch.Tensor  # descending; the stage ends at sigmas[-1]

    @property
    def start_sigma(self) -> float:
        return float(self.sigmas[0])

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def split(self, k: int) -> tuple["SigmaSchedule", "SigmaSchedule"]:
        return SigmaSchedule(self.sampler, self.sigmas[:k + 1]), SigmaSchedule(self.sampler, self.sigmas[k:])

    def run(self, denoiser: CFGDenoiser, x: torch.Tensor, noise: NoiseFactory, progress) -> torch.Tensor:
        spec = self.sampler.spec
        eta = 1.0 if spec.stochastic else 0.0
        if spec.algorithm == "dpmpp_sde":
            positive = self.sigmas[self.sigmas > 0]
            src = noise.brownian(x, float(positive.min()), float(positive.max()))
        else:
            src = noise.sampler_noise(x)
        if spec.algorithm == "dpm_adaptive":  # step count unknown: progress is the log-sigma covered
            ctx = kd.RunContext(noise=src, progress=progress, eta=eta)
            lo = float(self.sigmas[-1]) if float(self.sigmas[-1]) > 0 else denoiser.ms.sigma_min
            return kd.sample_dpm_adaptive(denoiser, x, lo, float(self.sigmas[0]), ctx)
        clock = _start_clock(denoiser, self.steps)
        # Progress counts model evaluations, so two-evaluation steps weigh double.
        total = kd.expected_evals(spec.algorithm, self.sigmas, eta)
        done = 0

        def counted(x_, sigma_):
            nonlocal done
            out = denoiser(x_, sigma_)
            done += 1
            progress(min(done / total, 1.0))
            return out

        n = self.steps

        def after_step(fraction):  # A1111's callback: state.sampling_step = i after step i
            if clock is not None:
                clock.step = max(int(round(fraction * n)) - 1, 0)

        ctx = kd.RunContext(noise=src, progress=after_step, eta=eta)
        if spec.algorithm == "dpm_fast":
            lo = float(self.sigmas[-1]) if float(self.sigmas[-1]) > 0 else denoiser.ms.sigma_min
            return kd.sample_dpm_fast(counted, x, lo, float(self.sigmas[0]), self.steps, ctx)
        return kd.FIXED_ALGORITHMS[spec.algorithm](counted, x, self.sigmas, ctx)


@dataclass
class TimestepSchedule:
    """A slice of a diffusers scheduler's timesteps (DDIM, PLMS, UniPC)."""
    sampler: ResolvedSampler
    factory: Callable[..., object]     # factory(device): a fresh scheduler with set_timesteps done
    timesteps: torch.Tensor            # the full list of the fresh scheduler
    sigma_at: list[float]              # VE sigma at each timestep index, plus 0 at the end
    start: int = 0
    end: int | None = None

    @property
    def _end(self) -> int:
        return len(self.timesteps) if self.end is None else self.end

    @property
    def start_sigma(self) -> float:
        return self.sigma_at[self.start]

    @property
    def steps(self) -> int:
        return self._end - self.start

    def split(self, k: int):
        mid = self.start + k
        return (TimestepSchedule(self.sampler, self.factory, self.timesteps, self.sigma_at, self.start, mid),
                TimestepSchedule(self.sampler, self.factory, self.timesteps, self.sigma_at, mid, self._end))

    def run(self, denoiser: CFGDenoiser, x: torch.Tensor, noise: NoiseFactory, progress) -> torch.Tensor:
        sched = self.factory(x.device)  # a fresh instance per stage: schedulers carry state
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(self.start)
        x = x / math.sqrt(1 + self.start_sigma ** 2)
        n = self.steps
        clock = _start_clock(denoiser, n)
        for i, t in enumerate(sched.timesteps[self.start:self._end]):
            model_in = sched.scale_model_input(x, t)
            out = denoiser.model_output(model_in, t.to(torch.float32))
            # x0 only when a preview asks for it: most steps never compute it.
            denoiser._x0 = functools.partial(x0_from_model_output, x, out, self.sigma_at[self.start + i],
                                             denoiser.vpred)
            x = sched.step(out, t, x, return_dict=False)[0]
            if clock is not None:
                clock.step = i
            progress((i + 1) / n)
        end_sigma = self.sigma_at[self._end] if self._end < len(self.timesteps) else 0.0
        return x * math.sqrt(1 + end_sigma ** 2)


def _start_clock(denoiser, steps: int):
    """The denoiser's step clock (None without ControlNet units), reset for a stage of ``steps``."""
    clock = getattr(denoiser, "clock", None)
    if clock is not None:
        clock.step = 0
        if clock.total is None:
            clock.total = steps
    return clock


def x0_from_model_output(x_vp: torch.Tensor, out: torch.Tensor, sigma: float, vpred: bool) -> torch.Tensor:
    """The denoised estimate at a diffusers-style step: VP-scaled x, eps or v output, VE sigma."""
    scale = math.sqrt(1 + sigma * sigma)
    if vpred:
        return (x_vp - out * sigma) / scale
    return x_vp * scale - out * sigma


def make_schedule(loaded, sampler: ResolvedSampler, steps: int, size: tuple[int, int] | None = None):
    """The whole schedule of ``steps`` steps of ``sampler`` on ``loaded``'s noise schedule
    (for an image of ``size`` = (width, height): a flow model's shift depends on it)."""
    flow = getattr(loaded, "is_flow", False)
    ms = loaded.sigmas_at(*size, steps=steps) if flow and size else loaded.sigmas
    cfg = loaded.scheduler_config
    spacing, offset = cfg.get("timestep_spacing", "leading"), int(cfg.get("steps_offset", 0))
    spec = sampler.spec
    if spec.kind == "k":
        if sampler.schedule == "logsnr":
            lo, hi = ms.sigma_min, ms.sigma_max
            ts = torch.linspace(-math.log(hi), -math.log(lo), steps + 1, dtype=torch.float64)
            return SigmaSchedule(sampler, (-ts).exp())
        n = steps + 1 if spec.discard_penultimate_sigma else steps
        if flow and sampler.schedule in TIME_SPACE_SCHEDULES:
            sigmas = sigmas_in_flow_time(ms, sampler.schedule, n)
        else:
            sigmas = kd.build_sigmas(ms, sampler.schedule, n, model_spacing=spacing, model_offset=offset)
        if spec.discard_penultimate_sigma:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return SigmaSchedule(sampler, sigmas)
    if flow:
        from .flow import timestep_scheduler_config

        return _timestep_schedule(ms, timestep_scheduler_config(ms), sampler, steps, "linspace", 0)
    return _timestep_schedule(ms, loaded.scheduler_config, sampler, steps, spacing, offset)


def _timestep_schedule(ms, scheduler_config: dict, sampler: ResolvedSampler, steps: int, spacing: str, offset: int):
    import diffusers

    spec = sampler.spec
    cls = getattr(diffusers, spec.algorithm)
    kwargs = dict(spec.scheduler_kwargs)
    sched_name = sampler.schedule
    if sched_name == "default":
        kwargs.update(timestep_spacing="linspace", steps_offset=0)
    elif sched_name == "ddim":
        kwargs.update(timestep_spacing="leading", steps_offset=1)
    elif sched_name == "pndm":
        kwargs.update(timestep_spacing=spacing, steps_offset=offset)
    elif sched_name in ("karras", "exponential"):
        kwargs.update(timestep_spacing="linspace", steps_offset=0)
        kwargs["use_karras_sigmas" if sched_name == "karras" else "use_exponential_sigmas"] = True
    base_cfg = {k: v for k, v in scheduler_config.items()
                if k not in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "skip_prk_steps")}

    def factory(device="cpu"):
        s = cls.from_config(base_cfg, **kwargs)
        for flag in ("use_karras_sigmas", "use_exponential_sigmas"):
            if kwargs.get(flag) and not s.config.get(flag):
                raise ValueError(f"{spec.name} cannot use the {sched_name} schedule")
        s.set_timesteps(steps, device=device)
        return s

    probe = factory()
    ts = probe.timesteps.clone()
    if getattr(probe, "sigmas", None) is not None and len(probe.sigmas) >= len(ts):
        sig = [float(v) for v in probe.sigmas[:len(ts)]]
    else:
        sig = [float(ms.sigmas[int(t)]) for t in ts]
    return TimestepSchedule(sampler, factory, ts, sig + [0.0])


def img2img_tail(schedule, steps_to_run: int):
    """The last ``steps_to_run`` steps of ``schedule`` (A1111's hires/img2img semantics)."""
    k = max(schedule.steps - steps_to_run, 0)
    return schedule.split(k)[1] if k else schedule
