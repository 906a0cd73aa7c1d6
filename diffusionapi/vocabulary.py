"""The words both sides share: model families and formats, and what the registry hands the engine.

Plain data only (no torch, no files): the registry (directory scanner), the resolver and the
engine all import this module, and it imports nothing of theirs.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class Family(StrEnum):
    """What a checkpoint is, read from its files (never guessed from its name)."""
    SD15 = "sd15"
    SD2 = "sd2"
    SDXL = "sdxl"
    SDXL_REFINER = "sdxl-refiner"
    SD3 = "sd3"
    FLUX1 = "flux1"
    FLUX1_KONTEXT = "flux1-kontext"
    FLUX1_FILL = "flux1-fill"
    QWEN_IMAGE_EDIT = "qwen-image-edit"
    QWEN_IMAGE = "qwen-image"
    Z_IMAGE = "z-image"
    CHROMA = "chroma"
    FLUX2 = "flux2"


class ModelFormat(StrEnum):
    """How a model is stored on disk."""
    DIFFUSERS = "diffusers"      # a folder with model_index.json
    HUB_CACHE = "hub-cache"      # models--org--repo/snapshots/<hash>/ as huggingface_hub leaves it
    SINGLE_FILE = "single-file"  # .safetensors / .ckpt in the original (CompVis/SGM) layout


SD15, SD2, SDXL, SDXL_REFINER = Family.SD15, Family.SD2, Family.SDXL, Family.SDXL_REFINER
SD3, FLUX1 = Family.SD3, Family.FLUX1
FLUX1_KONTEXT, QWEN_IMAGE_EDIT = Family.FLUX1_KONTEXT, Family.QWEN_IMAGE_EDIT
FLUX1_FILL = Family.FLUX1_FILL
QWEN_IMAGE, Z_IMAGE, CHROMA, FLUX2 = Family.QWEN_IMAGE, Family.Z_IMAGE, Family.CHROMA, Family.FLUX2
# How each family runs and is recognised: diffusionapi/families (one module per family).
FAMILY_LABELS = {SD15: "SD 1.5", SD2: "SD 2.x", SDXL: "SDXL", SDXL_REFINER: "SDXL refiner", SD3: "SD 3.x",
                 FLUX1: "Flux.1", FLUX1_KONTEXT: "Flux.1 Kontext", FLUX1_FILL: "Flux.1 Fill",
                 QWEN_IMAGE_EDIT: "Qwen-Image-Edit",
                 QWEN_IMAGE: "Qwen-Image", Z_IMAGE: "Z-Image", CHROMA: "Chroma", FLUX2: "Flux.2"}

# The demo model (diffusionapi.demo) has a label without a labels file.
DEMO_MODEL_NAME = "demo-tiny-sd15"
DEMO_MODEL_LABEL = "Demo (tiny random weights, noise images)"
BUILTIN_LABELS = {DEMO_MODEL_NAME: DEMO_MODEL_LABEL}

# A1111's latent hires modes: name -> (torch interpolate mode, antialias).
LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    label: str
    path: Path          # diffusers folder (snapshot for hub caches) or the single file
    family: Family
    format: ModelFormat
    # Read from the files (diffusers scheduler config, or a single file's v_pred / ztsnr marker
    # keys): "epsilon" | "v_prediction"; ztsnr: zero-terminal-SNR (rescaled betas).
    prediction: str = "epsilon"
    ztsnr: bool = False
    # Component files chosen for this job (components.py): text encoders / VAE that a
    # transformer-only file lacks, and the T5 tokenizer folder when a T5 runs.
    modules: tuple[Path, ...] = ()
    t5_tokenizer: Path | None = None


@dataclass(frozen=True)
class LoraEntry:
    name: str
    path: Path
    family: Family | None


@dataclass(frozen=True)
class EmbeddingEntry:
    """A textual-inversion file: its stem is the word that calls it in a prompt."""
    name: str
    path: Path
    family: Family | None   # SD15 or SDXL from the file's layout; None: unreadable (see error)
    vectors: int            # tokens it stands for
    error: str | None = None


# A1111's built-in upscalers that are plain image resizes (its UpscalerLanczos / UpscalerNearest);
# imageinput.PIXEL_RESIZERS holds their resampling filters.
PIXEL_RESIZE_UPSCALERS: tuple[str, ...] = ("Lanczos", "Nearest")


@dataclass(frozen=True)
class UpscalerEntry:
    name: str
    path: Path | None   # None for the internal latent modes and the plain resizes

    @property
    def is_latent(self) -> bool:
        return self.path is None and self.name in LATENT_UPSCALE_MODES

    @property
    def is_resize(self) -> bool:
        """A plain image resize ("Lanczos", "Nearest"): no model file."""
        return self.path is None and self.name in PIXEL_RESIZE_UPSCALERS


def sd15_loader_kwargs(family: Family) -> dict:
    """What SD 1.5 pipelines are loaded with, folder or single file: no safety checker
    (a server's operator decides on filtering; the checker costs memory and time)."""
    if family in (SD15, SD2):
        return dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return {}


# ---------------------------------------------------------------------------- step caching

@dataclass(frozen=True)
class StepCacheMethod:
    """A step-caching method a request may ask for (``step_cache``, engine/stepcache.py): the kind
    of network it works on, and its one knob ("threshold" or "interval") with default and bounds."""
    name: str
    denoiser: str  # "transformer" (flow families) or "unet"
    knob: str      # "threshold" or "interval"
    default: float
    low: float
    high: float
    description: str


# The one table of step-caching methods. Never on unless a request (or STEP_CACHE_DEFAULT) asks.
STEP_CACHE_METHODS = {m.name: m for m in (
    StepCacheMethod("first_block", "transformer", "threshold", 0.05, 0.0, 1.0,
                    "diffusers' First Block Cache: when the first block's output changed by less than `threshold` "
                    "(mean relative change) since the last full step, the other blocks reuse their last residual"),
    StepCacheMethod("taylorseer", "transformer", "interval", 3, 1, 20,
                    "diffusers' TaylorSeer: attention outputs computed every `interval` steps after 3 full ones, "
                    "extrapolated (first-order Taylor) in between"),
    StepCacheMethod("deepcache", "unet", "interval", 3, 1, 20,
                    "DeepCache: the UNet's deep blocks run every `interval` evaluations; in between only the "
                    "outermost down and up blocks run, on the deep features of the last full evaluation"),
)}


@dataclass(frozen=True)
class StepCache:
    """A job's step caching: the method and its knob's value."""
    method: str
    value: float

    @property
    def infotext(self) -> str:
        m = STEP_CACHE_METHODS[self.method]
        value = int(self.value) if m.knob == "interval" else self.value
        return f"{self.method}({m.knob}={value})"
