"""The native API's wire types: the seed's request and response types (../shared/seed-api.md).

Static rules (types, ranges that never change) live here; limits that an operator
configures are checked in ``resolve.py`` against the Settings.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .config import SEED_DEFAULT_MODEL
from .vocabulary import STEP_CACHE_METHODS, StepCache
from .engine.controlnet.request import ControlNetUnitRequest, IPAdapterUnitRequest
from .jobs.states import FINAL_STATES, WEBHOOK_EVENTS
from .engine.samplers import SAMPLER_NAMES, SCHEDULER_TYPES



def file_type_spelling(v):
    # "JPG", "jpeg" and "PNG" mean what they say; the echo uses the seed's spelling.
    if isinstance(v, str):
        v = v.strip().lower()
        return "jpg" if v == "jpeg" else v
    return v


# No float field takes NaN or infinity (also not as the strings "inf", "1e999"): a 422 naming it.
class LoRA(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = Field(min_length=1, max_length=512)
    scale: float = Field(1.0, ge=-10.0, le=10.0)


class HiresConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    enabled: bool = False
    scale: float = Field(2.0, ge=1.0)
    upscaler: str = Field("Latent", min_length=1, max_length=512)
    steps: int = Field(20, ge=1)
    denoising_strength: float = Field(0.4, gt=0.0, le=1.0)


class PreviewRequest(BaseModel):
    """Live previews while the job runs (README "Live progress")."""
    model_config = ConfigDict(extra="forbid")
    every: int = Field(1, ge=0, le=1000, description="sampler steps between previews; 0 = off")
    method: Literal["approx", "taesd"] = "approx"


class StepCacheRequest(BaseModel):
    """Step caching (docs/performance.md): reuse work between sampler steps, for speed, at a small
    documented change to the image. One method of vocabulary.STEP_CACHE_METHODS and its knob."""
    model_config = ConfigDict(extra="forbid")
    method: str = Field(description="one of: " + "; ".join(f"`{m.name}` ({m.denoiser}s, `{m.knob}`, default "
                                                            f"{m.default:g}): {m.description}"
                                                            for m in STEP_CACHE_METHODS.values()))
    threshold: float | None = Field(None, description="first_block: the relative change of the first block's "
                                    "output under which the step is reused")
    interval: int | None = Field(None, description="taylorseer, deepcache: full computations every this many "
                                 "steps (evaluations)")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in STEP_CACHE_METHODS:
            raise ValueError(f"unknown step cache method {v!r}; valid choices: {', '.join(STEP_CACHE_METHODS)}")
        return v

    @model_validator(mode="after")
    def _its_knob(self):
        m = STEP_CACHE_METHODS[self.method]
        for knob in ("threshold", "interval"):
            value = getattr(self, knob)
            if value is None:
                continue
            if knob != m.knob:
                raise ValueError(f"{knob} does not apply to {m.name}, whose knob is {m.knob}")
            if not m.low <= value <= m.high:
                raise ValueError(f"{knob} must be within {m.low:g}..{m.high:g} for {m.name}")
        return self

    def filled(self) -> dict:
        """The request with its method's knob set (the default when left out): the payload echo."""
        cache = self.resolved()
        m = STEP_CACHE_METHODS[cache.method]
        return {"method": m.name, m.knob: int(cache.value) if m.knob == "interval" else cache.value}

    def resolved(self) -> StepCache:
        m = STEP_CACHE_METHODS[self.method]
        value = getattr(self, m.knob)
        return StepCache(m.name, float(m.default if value is None else value))


class WebhookRequest(BaseModel):
    """A signed POST to ``url`` when the job reaches one of ``events`` (README "Live progress")."""
    model_config = ConfigDict(extra="forbid")
    url: str = Field(min_length=1, max_length=2048)
    events: list[Literal[WEBHOOK_EVENTS]] = Field(default_factory=lambda: list(FINAL_STATES))
    include_image: bool = True


class Txt2ImgRequest(BaseModel):
    # Unknown fields are accepted and ignored (A1111 clients send many extras); /txt2img names
    # them in its answer so that a typo does not go unnoticed.
    model_config = ConfigDict(extra="allow", populate_by_name=True, allow_inf_nan=False)

    prompt: str
    negative_prompt: str = ""
    steps: int = Field(30, ge=1)
    cfg_scale: float = Field(7.0, ge=0.0, le=100.0)
    width: int = Field(512, ge=8)
    height: int = Field(512, ge=8)
    # Left out: DIFFUSIONAPI_DEFAULT_MODEL (the seed's "stable-diffusion-v1-5" unless set), else the
    # first installed base model. No schema default: the one shown would not be the one applied.
    model: str | None = Field(None, min_length=1, max_length=512,
                              description=f"an installed model's name or label; left out: the server's default "
                                          f"model (DIFFUSIONAPI_DEFAULT_MODEL, {SEED_DEFAULT_MODEL!r} unless set), "
                                          "else the first installed base model")
    sampler_name: str = "DPM++ 2M Karras"
    # None means "not given": the sampler's own schedule applies where karras cannot
    # (see engine.samplers.resolve_sampler); the payload echoes what was resolved.
    scheduler_type: str | None = None
    fileType: Literal["jpg", "png"] = "jpg"
    jpeg_quality: int = Field(85, ge=1, le=100)
    loras: list[LoRA | str] = Field(default_factory=list)
    hires: HiresConfig | None = None
    refiner_checkpoint: str | None = Field(None, max_length=512)
    modules: list[Annotated[str, Field(min_length=1, max_length=1024)]] = Field(
        default_factory=list, max_length=8,
        description="component files (GET /modules: text encoders, VAE) for a model file that lacks them, by "
                    "name, file name or path (matched by file name); left out: the only compatible one of each "
                    "kind")
    refiner_switch_at: float = Field(0.8, gt=0.0, lt=1.0)
    seed: int | None = Field(None, ge=-1, le=2**64 - 1)
    preview: PreviewRequest | None = None  # added: when left out, DIFFUSIONAPI_PREVIEWS_DEFAULT
    webhook: WebhookRequest | None = None  # added
    clip_skip: int = Field(1, ge=1, le=12)  # added: A1111's "Clip skip"; 1 = the text encoder's last layer
    batch_size: int = Field(1, ge=1, description="images made in one UNet batch; seeds seed, seed+1, ...")
    n_iter: int = Field(1, ge=1, description="batches made one after another")
    distilled_cfg_scale: float = Field(3.5, ge=0.0, le=100.0, description="Forge's name: the guidance a "
                                       "guidance-distilled model (Flux.1-dev) is given; others ignore it. "
                                       "Left out on Flux.1 Fill: 30 (BFL's value)")
    cfg_rescale: float = Field(0.0, ge=0.0, le=1.0, description="CFG rescale phi (0 = off): keeps v-prediction "
                                                                  "/ zero-SNR models from over-exposing; 0.7 is usual")
    # added: image guidance (README "ControlNet"), applied in order
    controlnets: list[ControlNetUnitRequest] = Field(default_factory=list, max_length=8)
    ip_adapters: list[IPAdapterUnitRequest] = Field(default_factory=list, max_length=4)  # added
    priority: int = Field(0, ge=-10, le=10, description="added: moves the job ahead of (or behind) others; "
                          "capped to the API key's max_priority (docs/tenants.md)")
    step_cache: StepCacheRequest | None = Field(None, description="added: opt-in step caching (faster, changes the "
                                                "image slightly); left out: DIFFUSIONAPI_STEP_CACHE_DEFAULT")
    keep_partial: bool = Field(False, description="a cancel ends the job `done` with the image of its last "
                                                  "denoised state and a warning (A1111's interrupt), not "
                                                  "`cancelled`")  # added

    @field_validator("fileType", mode="before")
    @classmethod
    def _file_type_spelling(cls, v):
        return file_type_spelling(v)

    @field_validator("sampler_name")
    @classmethod
    def _known_sampler(cls, v: str) -> str:
        if v not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {v!r}; valid choices: {', '.join(SAMPLER_NAMES)}")
        return v

    @field_validator("scheduler_type")
    @classmethod
    def _known_scheduler(cls, v: str | None) -> str | None:
        if v is not None and v not in SCHEDULER_TYPES:
            raise ValueError(f"unknown scheduler type {v!r}; valid choices: {', '.join(SCHEDULER_TYPES)}")
        return v

    @field_validator("loras")
    @classmethod
    def _normalise_loras(cls, v: list[LoRA | str]) -> list[LoRA | str]:
        for item in v:
            if isinstance(item, str) and not item.strip():
                raise ValueError("LoRA name must not be empty")
        return v

    @model_validator(mode="after")
    def _empty_refiner_is_none(self) -> "Txt2ImgRequest":
        if self.refiner_checkpoint is not None and not self.refiner_checkpoint.strip():
            self.refiner_checkpoint = None
        return self

    def lora_list(self) -> list[LoRA]:
        return [LoRA(name=x) if isinstance(x, str) else x for x in self.loras]


class Img2ImgRequest(Txt2ImgRequest):
    """Everything of txt2img, starting from ``init_image`` (A1111's img2img/inpainting fields)."""
    init_image: str = Field(min_length=1, description="base64 or data URL: PNG, JPEG or WebP")
    denoising_strength: float = Field(0.75, gt=0.0, le=1.0)
    resize_mode: int = Field(0, ge=0, le=3, description="0 just resize, 1 crop and resize, 2 resize and fill, "
                                                        "3 just resize (latent upscale)")
    # None: the init image's size (rounded to a multiple of 8).
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
    mask: str | None = Field(None, description="base64 or data URL, same size as init_image; white = repaint")
    mask_blur: int = Field(4, ge=0, le=64)
    inpainting_fill: int = Field(1, ge=0, le=3, description="0 fill, 1 original, 2 latent noise, 3 latent nothing")
    inpaint_full_res: bool = Field(False, description="only masked: generate the masked area at width x height")
    inpaint_full_res_padding: int = Field(32, ge=0, le=1024)
    inpainting_mask_invert: int = Field(0, ge=0, le=1, description="1: repaint what the mask leaves black")

    @field_validator("mask", mode="before")
    @classmethod
    def _empty_mask_is_none(cls, v):
        return None if isinstance(v, str) and not v.strip() else v


class EditRequest(Txt2ImgRequest):
    """Instruction editing (``POST /edit``): change the reference images as the prompt says, on an
    editing model (family flux1-kontext). Everything of txt2img applies; the result starts from
    noise, the references condition every step."""
    reference_images: list[str] = Field(min_length=1, description="1..max_reference_images images, each base64 "
                                        "or a data URL (PNG, JPEG or WebP), as img2img's init_image")
    # None: the first reference's size (rounded down to what the model allows).
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
    mask: str | None = Field(None, description="base64 or data URL, the size of the first reference image; "
                                               "white = edit, black = keep the first reference's pixels")
    mask_blur: int = Field(4, ge=0, le=64)

    @field_validator("reference_images")
    @classmethod
    def _no_empty_reference(cls, v: list[str]) -> list[str]:
        for i, item in enumerate(v):
            if not item.strip():
                raise ValueError(f"reference image {i} is empty")
        return v

    @field_validator("mask", mode="before")
    @classmethod
    def _empty_mask_is_none(cls, v):
        return None if isinstance(v, str) and not v.strip() else v


class UpscaleRequest(BaseModel):
    """One image upscaled by an upscaler file or "Lanczos" / "Nearest": by ``scale``, or to
    ``width`` x ``height`` (both given)."""
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    image: str = Field(min_length=1, description="base64 or data URL: PNG, JPEG or WebP")
    upscaler: str = Field(min_length=1, max_length=512)
    scale: float | None = Field(None, gt=0.0, le=16.0, description="default 2 when width/height are not given")
    width: int | None = Field(None, ge=1)
    height: int | None = Field(None, ge=1)
    fileType: Literal["jpg", "png"] = "png"
    jpeg_quality: int = Field(85, ge=1, le=100)
    priority: int = Field(0, ge=-10, le=10, description="added: moves the job ahead of (or behind) others; "
                          "capped to the API key's max_priority (docs/tenants.md)")

    @field_validator("fileType", mode="before")
    @classmethod
    def _file_type_spelling(cls, v):
        return file_type_spelling(v)

    @model_validator(mode="after")
    def _size_or_scale(self) -> "UpscaleRequest":
        if (self.width is None) != (self.height is None):
            raise ValueError("width and height go together (or give scale)")
        if self.width is not None and self.scale is not None:
            raise ValueError("give scale or width and height, not both")
        return self


class Txt2ImgResponse(BaseModel):
    job_id: str
    status: Literal["queued"] = "queued"
    ignored_fields: list[str] | None = None  # request fields this API does not know


class ImageOut(BaseModel):
    """One image of a job that made several."""
    image: str | None  # base64; None if its file could no longer be read
    seed: int
    output_path: str
    infotext: str
    width: int
    height: int


class QueueStatusResponse(BaseModel):
    """GET /queue/{id}: built from ``jobstatus.JobStatus`` (api/jobs.py); unset fields are left out."""
    model_config = ConfigDict(extra="allow")
    status: Literal["success", "error"]
    job_id: str
    progress: float
    current_phase: str
    state: str
    error: str | None = None
    queue_position: int | None = None
    payload: dict[str, Any] | None = None
    image: str | None = None
    output_path: str | None = None
    width: int | None = None
    height: int | None = None
    file_type: Literal["jpg", "png"] | None = None
    jpeg_quality: int | None = None
    generation_time_sec: float | None = None
    load_time_sec: float | None = None  # added: part of generation_time_sec spent loading models
    memory_before_mb: float | None = None
    memory_after_mb: float | None = None
    seed: int | None = None
    infotext: str | None = None  # added: the A1111 "parameters" text embedded in the image
    images: list[ImageOut] | None = None  # added: every image, only when a job made more than one
    preview: str | None = None  # added: the latest preview (base64 JPEG) while the job runs
    preview_step: int | None = None  # added: the sampler step that preview shows
    warnings: list[str] | None = None  # added: what a done job skipped (e.g. an embedding for another family)


class ModelInfo(BaseModel):
    name: str
    label: str
    type: str | None = None     # the family id (the seed's field name); same as family
    format: str | None = None
    family: str | None = None   # sd15, sd2, sdxl, sdxl-refiner (diffusionapi/families)
    prediction: str | None = None  # epsilon | v_prediction
    ztsnr: bool | None = None   # zero-terminal-SNR noise schedule


class ModelsResponse(BaseModel):
    status: Literal["success", "error"] = "success"
    models: list[ModelInfo]
    error: str | None = None


class ModelAliasesResponse(BaseModel):
    status: Literal["success", "error"] = "success"
    models: list[ModelInfo]
    message: str


class LoraInfo(BaseModel):
    name: str
    scale: float = 1.0
    family: str | None = None


class LorasResponse(BaseModel):
    status: Literal["success", "error"] = "success"
    loras: list[LoraInfo]
    error: str | None = None


class EmbeddingInfo(BaseModel):
    name: str
    family: str | None  # "sd15" | "sdxl"; None: the file could not be read
    vectors: int


class EmbeddingsResponse(BaseModel):
    status: Literal["success", "error"] = "success"
    embeddings: list[EmbeddingInfo]


class ModuleInfo(BaseModel):
    """A component file (text encoder or VAE) that model files lacking it run with."""
    name: str                 # what `modules` (and /sdapi's forge_additional_modules, sd_vae) name
    kind: Literal["clip_l", "clip_g", "t5xxl", "vae"]
    role: Literal["text_encoder", "vae"]
    families: list[str]       # the model families it serves
    width: int                # text encoders: hidden width; VAEs: latent channels
    storage: str              # the stored weight type ("F16", "BF16", "F8_E4M3", ...)
    path: str


class ModulesResponse(BaseModel):
    status: Literal["success", "error"] = "success"
    modules: list[ModuleInfo]


class UpscalerInfo(BaseModel):
    name: str
    path: str


class UpscalersResponse(BaseModel):
    status: Literal["success", "error"] = "success"
    upscalers: list[UpscalerInfo]
    error: str | None = None


class SamplingMethodsResponse(BaseModel):
    status: Literal["success", "error"] = "success"
    sampling_methods: list[str]
    scheduler_types: list[str]
    error: str | None = None


class HelloResponse(BaseModel):
    ok: bool = True


class ErrorResponse(BaseModel):
    status: Literal["error"] = "error"
    error: str
    detail: Any | None = None


class QueueListEntry(BaseModel):
    job_id: str
    state: str
    current_phase: str
    progress: float
    queue_position: int | None = None
    owner: str | None = None  # added: the name of the key that submitted it


class WebhookAttempt(BaseModel):
    at: float
    status_code: int | None = None
    error: str | None = None


class WebhookDelivery(BaseModel):
    id: str
    job_id: str
    event: str
    url: str
    state: Literal["pending", "delivered", "failed"]
    max_tries: int
    next_attempt_at: float
    attempts: list[WebhookAttempt]


class QueueListResponse(BaseModel):
    status: Literal["success"] = "success"
    jobs: list[QueueListEntry]
    webhooks: list[WebhookDelivery] = Field(default_factory=list)  # added: deliveries, pending and recent
    others: int | None = Field(None, description="added: with named keys, jobs of other keys (a user sees only a count)")
