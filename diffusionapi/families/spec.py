"""The types every family module fills in (kept apart from the table in ``__init__`` so that
family modules and the table do not import each other)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Detected:
    """What a model's files say it is."""
    family: str
    prediction: str = "epsilon"   # "epsilon" | "v_prediction" | "flow" (flow matching)
    ztsnr: bool = False           # zero terminal SNR: the noise schedule's betas are rescaled


@dataclass(frozen=True)
class FolderConfigs:
    """The configs of a diffusers folder that detection reads (missing files are {})."""
    index: dict
    unet: dict
    transformer: dict
    scheduler: dict
    text_encoder: dict


@dataclass(frozen=True)
class FamilySpec:
    id: str                                   # the id in /models, /sdapi/v1/sd-models and ModelEntry.family
    label: str
    pipeline: str                             # diffusers pipeline class name for txt2img
    conditioning: str                         # text-encoder layout the engine encodes prompts for:
                                              # "clip" (one CLIP), "sdxl" (CLIP-L + CLIP-G),
                                              # "sdxl-refiner" (CLIP-G alone)
    matches_checkpoint: Callable[[set[str]], bool]        # original-layout single file, by its keys
    matches_folder: Callable[[FolderConfigs], bool]       # diffusers folder, by its configs
    steps: int = 30
    cfg_scale: float = 7.0                    # used when a request leaves cfg_scale out
    sampler: str = "DPM++ 2M Karras"          # used when a request leaves sampler_name out
    size: int = 512                           # native resolution (width = height)
    latent_channels: int = 4
    vae_scale_factor: int = 8
    prediction: str = "epsilon"               # when neither config nor markers say otherwise
    base_model: bool = True                   # False: only usable as a refiner
    embedding_family: str | None = None       # which textual-inversion files fit (their family)
    lora_family: str | None = None            # which LoRA files fit
    packaged_config: str | None = None        # diffusionapi/configs/<name> for single files
    preview: str = "sd15"                     # latent -> RGB factors / TAESD decoder to use
    runnable: str | None = None               # None: the engine runs it; else why it cannot (yet)
    single_files: str | None = None           # None: single files load; else why not (yet)
    gpu_dtype: str = "float16"                # weights' type on GPUs (Flux overflows fp16: bfloat16)
    distilled_guidance: bool = False          # guidance-distilled models take distilled_cfg_scale
    empirical_shift: bool = False             # flow shift from image tokens and step count (Flux.2)
    checkpoint_prediction: Callable[[set[str], Path], "tuple[str, bool] | None"] | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
