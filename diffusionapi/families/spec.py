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
    distilled_cfg_scale: float = 3.5          # used when a request leaves distilled_cfg_scale out
    # Single files carry no scheduler or VAE config: the family's published values (flow families).
    scheduler: dict = field(default_factory=dict)
    scheduler_undistilled: dict | None = None  # a file without guidance embedding (Flux.1 schnell)
    vae_scaling_factor: float = 0.18215
    vae_shift_factor: float | None = None
    empirical_shift: bool = False             # flow shift from image tokens and step count (Flux.2)
    checkpoint_prediction: Callable[[set[str], Path], "tuple[str, bool] | None"] | None = None
    # A family whose tensor names are another's (Flux.1 Fill, Flux.1): its single files match only
    # when their shapes ({name: shape}, from the safetensors / GGUF header) say so too.
    matches_shapes: Callable[[dict], bool] | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    # Instruction editing (POST /edit, and /sdapi/v1/img2img on such a model): "change the
    # reference images as the prompt says" (how many at once: the operator's
    # max_reference_images). ``text_to_image`` False: the model needs a reference image, so
    # txt2img requests are refused.
    edits: bool = False
    text_to_image: bool = True
    # An editing model that native POST /img2img still runs as img2img (Flux.2: its edit is an
    # option of a text-to-image model); on the others that is a 422 pointing to POST /edit. The
    # A1111 dialect's img2img is the edit on every editing model.
    native_img2img: bool = False
    # An inpainting model (Flux.1 Fill): it runs on an image and a mask only, so img2img without
    # a mask and txt2img are refused.
    inpainting_only: bool = False
    # Other pipeline classes a diffusers folder of this family may name (its model_index.json
    # decides which loads): Qwen-Image-Edit Plus beside Qwen-Image-Edit.
    pipeline_variants: tuple[str, ...] = ()
    # Families the engine runs through their diffusers pipeline and its own scheduler (not the
    # engine's samplers): the one (sampler, schedule type) pair that is; others are a 422.
    pipeline_sampling: tuple[str, str] | None = None
