"""What the engine is asked to do and what it gives back: plain dataclasses, no wire types.

``resolve.py`` turns a validated request (native or A1111 dialect) into a ``GenerationPlan``
once; the worker hands the plan to an ``Engine`` and gets a ``GenerationResult``. Nothing in
here knows about HTTP, pydantic or job records, so an engine (real, or a fake in tests)
can be driven with nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from PIL import Image

from ..vocabulary import EmbeddingEntry, LoraEntry, ModelEntry, StepCache, UpscalerEntry
from .samplers import ResolvedSampler

# report(phase, progress): progress in 0..100 for the whole job, never going backwards.
Report = Callable[[str, float], None]
# cancelled(): True when the job should stop at the next model evaluation.
Cancelled = Callable[[], bool]


class GenerationError(RuntimeError):
    """A job failed for a reason the user can act on; the message says which."""


# Raised inside the engine when ``cancelled()`` said so; defined with the other lifecycle facts.
from ..jobs.states import JobCancelled  # noqa: E402,F401


@dataclass(frozen=True)
class LoraUse:
    entry: LoraEntry
    weight: float


@dataclass(frozen=True)
class HiresPlan:
    """A1111's hires fix: upscale the first pass, then re-denoise the last ``steps`` steps
    of a schedule entered at ``denoising_strength``."""
    upscaler: UpscalerEntry
    scale: float
    steps: int
    denoising_strength: float
    width: int    # the final size
    height: int


@dataclass(frozen=True)
class PreviewPlan:
    """Preview images while sampling (README "Live progress")."""
    method: str = "approx"   # "approx" | "taesd"
    every: int = 1           # sampler steps between previews


class StepObserver(Protocol):
    """What the runner of a job learns while sampling, beyond ``report``."""

    def step(self, phase: str, step: int, total: int) -> None: ...

    def preview(self, jpeg: bytes, step: int, total: int) -> None: ...


@dataclass(frozen=True)
class InitImagePlan:
    """img2img: start from ``image`` (decoded, checked) instead of noise; with ``mask`` (same size,
    white = repaint) only the masked part is repainted. A1111's fields and meanings."""
    image: Image.Image
    denoising_strength: float = 0.75
    resize_mode: int = 0              # 0 just resize, 1 crop and resize, 2 resize and fill, 3 latent upscale
    mask: Image.Image | None = None
    mask_blur: int = 4
    inpainting_fill: int = 1          # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = False    # "only masked": generate the masked area at width x height, paste back
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: bool = False


@dataclass
class GenerationPlan:
    model: ModelEntry
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    cfg_scale: float
    sampler: ResolvedSampler
    loras: tuple[LoraUse, ...] = ()
    refiner: ModelEntry | None = None
    refiner_switch_at: float = 0.8
    hires: HiresPlan | None = None
    batch_size: int = 1   # images generated in one UNet batch
    n_iter: int = 1       # batches one after another; image k has seed ``seed + k``
    preview: PreviewPlan | None = None  # previews for a StepObserver, when one is given
    clip_skip: int = 1    # A1111's "Clip skip" (engine/conditioning.py)
    embeddings: tuple[EmbeddingEntry, ...] = ()  # textual inversions the prompts may call
    init: InitImagePlan | None = None  # img2img / inpainting
    cfg_rescale: float = 0.0  # A1111's CFG rescale phi (0 = off): engine/sampling.rescale_cfg
    distilled_cfg_scale: float = 3.5  # Forge's name: the guidance fed to guidance-distilled models (Flux.1-dev)
    controlnets: tuple = ()  # engine/controlnet/units.ControlUnitPlan, applied in order
    ip_adapters: tuple = ()  # engine/controlnet/units.IPAdapterPlan
    # A cancel returns the image of the last denoised state instead of ending the job (A1111's
    # interrupt: /sdapi jobs set it).
    keep_partial: bool = False
    # Instruction editing (an edit job): the reference images (decoded, checked), in order; the
    # model sees them at every step (engine/flow.py's FluxKontextDenoiser).
    references: tuple[Image.Image, ...] = ()
    step_cache: StepCache | None = None  # opt-in step caching (engine/stepcache.py)

    @property
    def final_width(self) -> int:
        return self.hires.width if self.hires else self.width

    @property
    def final_height(self) -> int:
        return self.hires.height if self.hires else self.height

    @property
    def refiner_switch_step(self) -> int:
        return int(round(self.steps * self.refiner_switch_at))

    @property
    def image_count(self) -> int:
        return self.batch_size * self.n_iter


@dataclass
class UpscalePlan:
    """Upscale one image (``/upscale``): an upscaler file, or ``method`` "Lanczos" / "Nearest"
    when ``upscaler`` is None; the result is exactly width x height."""
    image: Image.Image
    upscaler: UpscalerEntry | None
    method: str
    width: int
    height: int
    scale: float | None = None        # as requested (None: width and height were given)
    prompt: str = ""                  # no prompt: the infotext has only the parameters line
    negative_prompt: str = ""


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    params: dict  # infotext key/values after the prompt lines (None values are left out)


@dataclass
class GenerationResult:
    images: list[GeneratedImage]
    load_time_sec: float = 0.0  # time spent loading models for this job (0: all were resident)
    decode_time_sec: float = 0.0  # time spent in the VAE decoding final latents (a metrics phase)
    warnings: list[str] = field(default_factory=list)

    @property
    def image(self) -> Image.Image:
        return self.images[0].image


class Engine(Protocol):
    """The engine's face, as the worker sees it."""

    def generate(self, plan: GenerationPlan | UpscalePlan, report: Report, cancelled: Cancelled,
                 observer: StepObserver | None = None) -> GenerationResult: ...


def hires_total_steps(steps: int, strength: float) -> int:
    """A1111: a hires pass of ``steps`` steps at ``strength`` is the tail of a schedule this long."""
    return max(int(steps / min(strength, 0.999)), steps)
