"""AUTOMATIC1111's `/sdapi/v1` wire format (v1.10 `modules/api/models.py`), and its conversion,
in one place, into the native request this service queues.

Clients send A1111's whole processing object, often with fields we do not model: unknown fields
are ignored, numbers may come as strings ("1.0"), and a value A1111 would have accepted never
becomes a 4xx here when there is a faithful fallback (an unknown sampler runs the default one,
with a warning, as A1111 does).
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ...engine.samplers import SAMPLER_NAMES, SamplerChoiceError, resolve_sampler

log = logging.getLogger("diffusionapi.sdapi")


def _lenient_number(v):
    """'32' -> 32, '1.0' -> 1.0 (text-generation-webui sends hr_scale as a string)."""
    if isinstance(v, str):
        s = v.strip()
        try:
            f = float(s)
        except ValueError:
            return v
        return int(f) if f.is_integer() and "." not in s and "e" not in s.lower() else f
    return v


class _Wire(BaseModel):
    # No NaN or infinity, also not as strings ("1e999"): a 422 naming the field, never an OverflowError.
    model_config = ConfigDict(extra="ignore", populate_by_name=True, protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _coerce(cls, v, info):
        v = _lenient_number(v)
        ann = cls.model_fields[info.field_name].annotation
        if ann in (int, int | None) and isinstance(v, float) and v.is_integer():
            return int(v)
        return v


class Txt2ImgAPIRequest(_Wire):
    """A1111's StableDiffusionProcessingTxt2Img, as its API accepts it (defaults are A1111's)."""
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    # Not A1111's: the job's place in the fair line (docs/tenants.md), capped to the key's
    # max_priority. Also read from override_settings.priority, the one free-form field clients
    # with fixed signatures (webuiapi) can set.
    priority: Any = None
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict | None = None
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    force_task_id: str | None = None
    script_name: str | None = None
    script_args: list = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict = Field(default_factory=dict)
    infotext: str | None = None
    clip_skip: int | None = None  # SD.Next's top-level field; SillyTavern sends it too
    # CFG rescale phi: A1111's dev-branch/Forge option name (also an override_setting), and the native name.
    rescale_cfg: float | None = None
    cfg_rescale: float | None = None
    # Forge's Flux fields (../shared/a1111-extensions.md): the distilled guidance, and a preset name
    # Forge's UI uses (nothing to do here: the model's family decides).
    distilled_cfg_scale: float | None = None
    forge_preset: str | None = None


class Img2ImgAPIRequest(Txt2ImgAPIRequest):
    """A1111's StableDiffusionProcessingImg2Img, as its API accepts it."""
    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float | None = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class GenerationResponse(BaseModel):
    images: list[str] | None = None
    parameters: dict
    info: str


class ExtrasSingleImageRequest(_Wire):
    image: str = ""
    resize_mode: int = 0  # 0: by upscaling_resize, 1: to upscaling_resize_w x _h
    show_extras_results: bool = True
    gfpgan_visibility: float = 0
    codeformer_visibility: float = 0
    codeformer_weight: float = 0
    upscaling_resize: float = Field(2.0, gt=0)
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0
    upscale_first: bool = False


class ExtrasSingleImageResponse(BaseModel):
    image: str | None = None
    html_info: str


class PNGInfoRequest(_Wire):
    image: str


class PNGInfoResponse(BaseModel):
    info: str
    items: dict
    parameters: dict


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict
    current_image: str | None = None
    textinfo: str | None = None


# A1111's built-in upscalers that are plain resizes (listed first; SillyTavern assumes item 0 is "None").
BUILTIN_UPSCALERS = ("None", "Lanczos", "Nearest")


# ---------------------------------------------------------------------- samplers and schedulers
# A1111 1.10 lists samplers by base name and takes the schedule separately; old names such as
# "DPM++ 2M Karras" still arrive (Dify, old configs). Our table has both kinds of names.
SAMPLER_ALIASES: dict[str, list[str]] = {
    "Euler": ["k_euler"], "Euler a": ["k_euler_a", "k_euler_ancestral"], "Heun": ["k_heun"],
    "DPM2": ["k_dpm_2"], "DPM++ 2S a": ["k_dpmpp_2s_a"], "DPM++ 2M": ["k_dpmpp_2m"],
    "DPM++ SDE": ["k_dpmpp_sde"], "DPM fast": ["k_dpm_fast"], "DPM adaptive": ["k_dpm_ad"], "LMS": ["k_lms"],
    "DDIM": ["ddim"], "PLMS": ["plms"], "UniPC": ["unipc"],
}


@dataclass(frozen=True)
class Scheduler:
    name: str                # A1111's name
    label: str               # A1111's label (also accepted)
    native: str | None       # our scheduler_type; None: the sampler's own ("Automatic")
    aliases: tuple[str, ...] = ()
    default_rho: float = -1
    need_inner_model: bool = False


# The schedules this service can run, under A1111's names. "uniform" and "normal" both mean
# timesteps evenly spaced over the whole range here (A1111's two differ in the last step only).
SCHEDULERS: tuple[Scheduler, ...] = (
    Scheduler("automatic", "Automatic", None),
    Scheduler("uniform", "Uniform", "default", need_inner_model=True),
    Scheduler("karras", "Karras", "karras", default_rho=7.0),
    Scheduler("exponential", "Exponential", "exponential"),
    Scheduler("normal", "Normal", "default", need_inner_model=True),
    Scheduler("ddim", "DDIM", "ddim", need_inner_model=True),
    Scheduler("pndm", "PNDM", "pndm"),  # not in A1111: the spacing of the model's own scheduler config
    Scheduler("sgm_uniform", "SGM Uniform", "sgm_uniform", need_inner_model=True),
    Scheduler("kl_optimal", "KL Optimal", "kl_optimal"),
    Scheduler("simple", "Simple", "simple", need_inner_model=True),
    Scheduler("beta", "Beta", "beta", need_inner_model=True),
)


def _scheduler(name: str | None) -> Scheduler | None:
    key = (name or "").strip().casefold()
    for s in SCHEDULERS:
        if key in (s.name, s.label.casefold(), *(a.casefold() for a in s.aliases)):
            return s
    return None


def _sampler_name(name: str | None) -> str | None:
    key = (name or "").strip().casefold()
    for n in SAMPLER_NAMES:
        if key == n.casefold() or key in SAMPLER_ALIASES.get(n, ()):
            return n
    return None


def resolve_sampler_choice(sampler: str | None, scheduler: str | None, default_sampler: str,
                           warnings: list[str]) -> tuple[str, str | None]:
    """A1111's (sampler, scheduler) -> our (sampler_name, scheduler_type); never fails."""
    requested = (sampler or "").strip() or default_sampler
    sched = _scheduler(scheduler)
    if scheduler and sched is None:
        warnings.append(f"scheduler {scheduler!r} is not available; using the sampler's own schedule")
    name = _sampler_name(requested)
    if name is None:
        # "<sampler> <Schedule>" as A1111 still accepts it: "DPM++ 2M Exponential", "Euler a Karras".
        for s in SCHEDULERS[1:]:
            for suffix in (s.label, s.name):
                if requested.casefold().endswith(" " + suffix.casefold()):
                    base = _sampler_name(requested[: -len(suffix) - 1])
                    if base is not None:
                        name, sched = base, s
                        break
            if name:
                break
    if name is None:
        warnings.append(f"sampler {requested!r} is not available; using {default_sampler!r}")
        name = default_sampler
    scheduler_type = sched.native if sched else None
    try:
        resolve_sampler(name, scheduler_type)
    except SamplerChoiceError:
        warnings.append(f"sampler {name!r} cannot run with schedule {sched.label!r}; using its own schedule")
        scheduler_type = None
    return name, scheduler_type


# ---------------------------------------------------------------------- conversion
_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]\s*$")


def checkpoint_key(value: str) -> str:
    """A1111 names a checkpoint by title "dir/file.safetensors [hash]", file name, or model name."""
    v = _TITLE_HASH.sub("", value.strip())
    for ext in (".safetensors", ".ckpt"):
        if v.lower().endswith(ext):
            v = v[: -len(ext)]
    return v


class FieldError(ValueError):
    """A value that names something not installed: the field and the choices go to the client."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _checkpoint(ctx: "Context", value: str, field: str) -> str:
    try:
        return ctx.resolve_checkpoint(value)
    except LookupError as e:
        raise FieldError(field, str(e.args[0] if e.args else e)) from None


def _modules(overrides: dict, model: str | None, ctx: "Context", body: dict) -> None:
    """Forge's ``forge_additional_modules`` (full paths or file names: matched by file name) and
    A1111's ``sd_vae`` ("Automatic" / "None": the model's own) -> the native ``modules``."""
    modules = overrides.get("forge_additional_modules", ctx.modules) or []
    if isinstance(modules, str):
        modules = [modules]
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise FieldError("override_settings.forge_additional_modules", "must be a list of file names or paths")
    if modules and not ctx.takes_modules(model):
        # A model with its own VAE and text encoders (a diffusers folder): Forge's UI sends its
        # module selection with every request; said, not silently dropped.
        ctx.warnings.append(f"override_settings.forge_additional_modules {modules!r} ignored: the model's own "
                            "VAE and text encoders are used")
        modules = []
    vae = overrides.get("sd_vae", ctx.vae)
    if isinstance(vae, str) and vae.strip() and vae.strip() not in ("Automatic", "None"):
        modules = [*modules, vae.strip()]
    if modules:
        body["modules"] = modules


@dataclass
class Context:
    """What a conversion needs besides the request: set once per request by the route."""
    default_sampler: str
    model: str | None               # the /sdapi options model (a native name), None: the service default
    clip_skip: int | None           # the /sdapi options CLIP_stop_at_last_layers
    resolve_checkpoint: Any         # callable(str) -> native model name (raises LookupError)
    # callable(native model name or None) -> whether it runs with component files (Flux.1 / SD 3.x single files)
    takes_modules: Any = lambda model: False
    vae: str | None = None          # the /sdapi options sd_vae ("Automatic": the model's own)
    modules: list = field(default_factory=list)  # the /sdapi options forge_additional_modules
    warnings: list[str] = field(default_factory=list)


def to_native(req: Txt2ImgAPIRequest, ctx: Context) -> dict:
    """The native /txt2img (or /img2img) request body for an A1111 request."""
    overrides = req.override_settings or {}
    sampler, scheduler_type = resolve_sampler_choice(req.sampler_name or req.sampler_index, req.scheduler,
                                                     ctx.default_sampler, ctx.warnings)
    body: dict[str, Any] = {
        "prompt": req.prompt, "negative_prompt": req.negative_prompt or "",
        "steps": req.steps, "cfg_scale": req.cfg_scale, "width": req.width, "height": req.height,
        "sampler_name": sampler, "scheduler_type": scheduler_type,
        "seed": req.seed if req.seed is not None and req.seed >= 0 else None,
        "fileType": "png",  # A1111 answers PNGs; the infotext rides in their text chunk
    }
    checkpoint = overrides.get("sd_model_checkpoint")
    model = _checkpoint(ctx, str(checkpoint), "override_settings.sd_model_checkpoint") if checkpoint else ctx.model
    if model:
        body["model"] = model
    if req.refiner_checkpoint and req.refiner_checkpoint.strip() not in ("", "None"):
        body["refiner_checkpoint"] = _checkpoint(ctx, req.refiner_checkpoint, "refiner_checkpoint")
        if req.refiner_switch_at:
            body["refiner_switch_at"] = req.refiner_switch_at
    clip_skip = overrides.get("CLIP_stop_at_last_layers", req.clip_skip if req.clip_skip else ctx.clip_skip)
    clip_skip = _lenient_number(clip_skip)
    if isinstance(clip_skip, float) and not math.isfinite(clip_skip):
        raise FieldError("override_settings.CLIP_stop_at_last_layers", "must be a finite number")
    if isinstance(clip_skip, (int, float)) and clip_skip >= 1:
        body["clip_skip"] = int(clip_skip)
    _cfg_rescale(req, overrides, body)
    _priority(req, overrides, body)
    if req.distilled_cfg_scale is not None:
        body["distilled_cfg_scale"] = req.distilled_cfg_scale
    _modules(overrides, model, ctx, body)
    body["batch_size"], body["n_iter"] = req.batch_size, req.n_iter
    # feeds /progress's current_image, as A1111's live previews do
    body["preview"] = {"every": PREVIEW_EVERY_N_STEPS, "method": "approx"}
    body["keep_partial"] = True  # /interrupt answers with the last denoised state, as A1111 does
    if req.enable_hr and not isinstance(req, Img2ImgAPIRequest):
        body["hires"] = _hires(req)
    if req.alwayson_scripts:  # sd-webui-controlnet's units
        from .controlnet import UnitError, controlnet_units

        ips: list = []
        try:
            units = controlnet_units(req.alwayson_scripts, ctx.warnings, ips)
        except UnitError as e:
            raise FieldError(e.field, str(e).split(": ", 1)[1]) from None
        if units:
            body["controlnets"] = units
        if ips:
            body["ip_adapters"] = ips
    for unused in ("hr_checkpoint_name", "hr_sampler_name", "hr_prompt", "hr_negative_prompt"):
        if getattr(req, unused) and getattr(req, unused) not in ("Use same checkpoint", "Use same sampler"):
            ctx.warnings.append(f"{unused} is not supported; the second pass uses the first pass's")
    return body


def _priority(req: Txt2ImgAPIRequest, overrides: dict, body: dict) -> None:
    """``priority`` (top level first, else ``override_settings.priority``): an integer in the
    native range; the job service caps it to the key's max_priority."""
    from ...jobs.service import PRIORITY_RANGE

    for name, value in (("priority", req.priority), ("override_settings.priority", overrides.get("priority"))):
        if value is None:
            continue
        number = _lenient_number(value)
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number != int(number) \
                or not PRIORITY_RANGE[0] <= number <= PRIORITY_RANGE[1]:
            raise FieldError(name, f"{value!r} is not an integer from {PRIORITY_RANGE[0]} to {PRIORITY_RANGE[1]}")
        body["priority"] = int(number)
        return


def _cfg_rescale(req: Txt2ImgAPIRequest, overrides: dict, body: dict) -> None:
    """CFG rescale phi from ``override_settings.rescale_cfg``, ``rescale_cfg`` or ``cfg_rescale``."""
    for field_name, value in (("override_settings.rescale_cfg", overrides.get("rescale_cfg")),
                              ("rescale_cfg", req.rescale_cfg), ("cfg_rescale", req.cfg_rescale)):
        if value is None:
            continue
        phi = _lenient_number(value)
        if not isinstance(phi, (int, float)) or isinstance(phi, bool) or not 0 <= phi <= 1:
            raise FieldError(field_name, f"CFG rescale must be a number from 0 to 1, not {value!r}")
        body["cfg_rescale"] = float(phi)
        return


PREVIEW_EVERY_N_STEPS = 10  # A1111's show_progress_every_n_steps default
HIRES_DENOISING_DEFAULT = 0.75  # A1111's txt2img default; 0 or absent means "not set" here


def _hires(req: Txt2ImgAPIRequest) -> dict:
    scale = req.hr_scale
    # A1111: a resize target wins over the scale. With both sides given it crops to fit; here the
    # scale that covers the target is used (same size when the aspect ratios agree).
    if req.hr_resize_x or req.hr_resize_y:
        for name in ("width", "height"):  # the resize target is divided by them
            if getattr(req, name) < 8:
                raise FieldError(name, "must be at least 8 (hires fix scales from it)")
        ratios = [r for r in ((req.hr_resize_x / req.width) if req.hr_resize_x else 0,
                              (req.hr_resize_y / req.height) if req.hr_resize_y else 0) if r]
        scale = max(ratios)
    hires: dict[str, Any] = {"enabled": True, "scale": scale, "upscaler": hires_upscaler(req.hr_upscaler),
                             # A1111: 0 second-pass steps means as many as the first pass
                             "steps": req.hr_second_pass_steps or req.steps}
    hires["denoising_strength"] = req.denoising_strength if req.denoising_strength else HIRES_DENOISING_DEFAULT
    return hires


def hires_upscaler(name: str | None) -> str:
    """A1111's hr_upscaler as ours. Left out: A1111's default latent mode ("Latent"). "None": A1111
    decodes the first pass and resizes the image with Lanczos (images.resize_image with
    upscaler_name "None"), so it is "Lanczos" here; "Lanczos" and "Nearest" are plain resizes."""
    if name is None or not name.strip():
        return "Latent"
    return "Lanczos" if name.strip() == "None" else name


def img2img_native(req: Img2ImgAPIRequest, ctx: Context) -> dict:
    body = to_native(req, ctx)
    images = req.init_images or []
    body.update({
        "init_image": images[0] if images else None,
        "denoising_strength": req.denoising_strength if req.denoising_strength is not None else 0.75,
        "resize_mode": req.resize_mode,
        "inpainting_fill": req.inpainting_fill,
        "inpaint_full_res": req.inpaint_full_res,
        "inpaint_full_res_padding": req.inpaint_full_res_padding,
        "inpainting_mask_invert": req.inpainting_mask_invert,
    })
    if req.mask:
        body["mask"] = req.mask
        body["mask_blur"] = req.mask_blur if req.mask_blur is not None else max(req.mask_blur_x, req.mask_blur_y)
    if len(images) > 1:
        ctx.warnings.append(f"{len(images)} init images given; the first is used")
    return body


def edit_request(req: Img2ImgAPIRequest, ctx: Context):
    """img2img on an instruction-editing model, as Forge runs Kontext from its img2img tab: the
    typed native edit (schemas.EditRequest) with ``init_images`` as the reference images (all of
    them, in order) and ``mask`` as the edit's mask. An edit starts from noise, so
    ``denoising_strength`` and the inpainting fields have no part in it."""
    from pydantic import ValidationError

    from ...schemas import EditRequest

    if not req.init_images:
        raise FieldError("init_images", "at least one image is required")
    body = to_native(req, ctx)
    body["reference_images"] = list(req.init_images)
    if req.mask:
        body["mask"] = req.mask
        body["mask_blur"] = req.mask_blur if req.mask_blur is not None else max(req.mask_blur_x, req.mask_blur_y)
    ctx.warnings.append("the model edits: init_images are its reference images; denoising_strength is not used")
    try:
        return EditRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        field_name = ".".join(str(x) for x in err.get("loc", ())) or "body"
        field_name = "init_images" + field_name[len("reference_images"):] \
            if field_name.startswith("reference_images") else NATIVE_TO_A1111.get(field_name, field_name)
        raise FieldError(field_name, str(err.get("msg", "invalid")).removeprefix("Value error, ")) from None


def native_request(req: Txt2ImgAPIRequest, ctx: Context):
    """The typed native request (schemas.Txt2ImgRequest / Img2ImgRequest) the job service takes
    for an A1111 request; a value the native type refuses is a FieldError naming the A1111 field."""
    from pydantic import ValidationError

    from ...schemas import Img2ImgRequest, Txt2ImgRequest

    is_img2img = isinstance(req, Img2ImgAPIRequest)
    if is_img2img and not req.init_images:
        raise FieldError("init_images", "at least one image is required")
    body = img2img_native(req, ctx) if is_img2img else to_native(req, ctx)
    try:
        return (Img2ImgRequest if is_img2img else Txt2ImgRequest).model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        field_name = ".".join(str(x) for x in err.get("loc", ())) or "body"
        raise FieldError(NATIVE_TO_A1111.get(field_name, field_name),
                         str(err.get("msg", "invalid")).removeprefix("Value error, ")) from None


# Native field -> the A1111 field a client sent it as (error messages name what the client sent).
NATIVE_TO_A1111 = {"init_image": "init_images", "hires.scale": "hr_scale", "hires.steps": "hr_second_pass_steps",
                   "hires.upscaler": "hr_upscaler", "hires.denoising_strength": "denoising_strength"}
