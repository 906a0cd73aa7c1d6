"""From a validated request to exactly what will run: names resolved, limits checked.

The API calls this at submit (so bad input is a 4xx and nothing is queued) and the
worker calls it again when it starts the job (the files may have changed meanwhile).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

from .config import Settings
from .engine.live import check_preview
from .engine.plan import GenerationPlan, HiresPlan, InitImagePlan, LoraUse, PreviewPlan, UpscalePlan
from .engine.prompts import PromptError, extract_extra_networks
from .engine.samplers import SamplerChoiceError, resolve_sampler, resolved_scheduler_type
from .registry import Registry, UnknownName
from .imageinput import PIXEL_RESIZERS, ImageInputError, decode_image, describe
from .schemas import Img2ImgRequest, PreviewRequest, Txt2ImgRequest, UpscaleRequest
from .families import spec as family_spec
from .vocabulary import FAMILY_LABELS, SDXL, SDXL_REFINER


class RequestError(ValueError):
    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


@dataclass(frozen=True)
class OutputSpec:
    """How the worker encodes the images (not the engine's business)."""
    file_type: str = "jpg"
    jpeg_quality: int = 85


@dataclass
class ResolvedJob:
    kind: str                # "txt2img" (the job record's kind; later: "img2img", "upscale")
    echo: dict               # the request as understood (defaults filled, names resolved): the payload echo
    plan: GenerationPlan | UpscalePlan
    output: OutputSpec
    # What the job record keeps, when it differs from the echo: img2img and upscale jobs keep
    # their images there, while the echo (returned with the result) only describes them.
    record: dict | None = None

    @property
    def payload(self) -> dict:
        return self.record if self.record is not None else self.echo


def round8(v: float) -> int:
    return max(8, int(round(v / 8)) * 8)


def resolve_request(req: Txt2ImgRequest, registry: Registry, settings: Settings, *,
                    model_given: bool = True) -> GenerationPlan:
    """Just the plan (tests and benchmarks drive the engine with it)."""
    return resolve_txt2img(req, registry, settings, model_given=model_given).plan


def resolve_job(kind: str, payload: dict, registry: Registry, settings: Settings) -> ResolvedJob:
    """A job record's payload (validated again: files may have changed since submit) -> what runs."""
    if kind == "img2img":
        return resolve_img2img(Img2ImgRequest.model_validate(payload), registry, settings)
    if kind == "upscale":
        return resolve_upscale(UpscaleRequest.model_validate(payload), registry, settings)
    if kind != "txt2img":
        raise RequestError("kind", f"unknown job kind {kind!r}")
    return resolve_txt2img(Txt2ImgRequest.model_validate(payload), registry, settings)


def resolve_txt2img(req: Txt2ImgRequest, registry: Registry, settings: Settings, *,
                    model_given: bool = True) -> ResolvedJob:
    if len(req.prompt) > settings.max_prompt_chars:
        raise RequestError("prompt", f"longer than {settings.max_prompt_chars} characters")
    if len(req.negative_prompt) > settings.max_prompt_chars:
        raise RequestError("negative_prompt", f"longer than {settings.max_prompt_chars} characters")
    if req.steps > settings.max_steps:
        raise RequestError("steps", f"must be <= {settings.max_steps}")
    w, h = round8(req.width), round8(req.height)
    if w > settings.max_width:
        raise RequestError("width", f"must be <= {settings.max_width}")
    if h > settings.max_height:
        raise RequestError("height", f"must be <= {settings.max_height}")
    if req.batch_size > settings.max_batch_size:
        raise RequestError("batch_size", f"must be <= {settings.max_batch_size}")
    if req.n_iter > settings.max_n_iter:
        raise RequestError("n_iter", f"must be <= {settings.max_n_iter}")
    # One UNet batch holds batch_size images: the pixel limits count all of them.
    if w * h * req.batch_size > settings.max_pixels:
        raise RequestError("width", f"width x height{' x batch_size' if req.batch_size > 1 else ''} "
                                    f"must be <= {settings.max_pixels} pixels")
    if len(req.loras) > settings.max_loras:
        raise RequestError("loras", f"at most {settings.max_loras} LoRAs per request")

    try:
        sampler = resolve_sampler(req.sampler_name, req.scheduler_type)
    except SamplerChoiceError as e:
        raise RequestError("scheduler_type" if "scheduler" in str(e) else "sampler_name", str(e)) from None

    problems: dict[str, str] = {}
    models = registry.models(problems)
    bases = [m for m in models if m.family != SDXL_REFINER]
    try:
        model = registry.resolve_model(req.model if model_given else settings.default_model, models=models,
                                       problems=problems)
    except UnknownName as e:
        if model_given or not bases:
            raise RequestError("model", str(e)) from None
        # No model named and the default is not installed: the first installed one (e.g. the demo).
        model = bases[0]
    if model.family == SDXL_REFINER:
        raise RequestError("model", f"{model.name!r} is an SDXL refiner; use it as refiner_checkpoint "
                                    "with an SDXL base model")
    w, h = _family_size(model, w, h, req)
    family = family_spec(model.family)
    # Family defaults for what the request left out: Flux runs at CFG 1 (no negative pass) on
    # the "Simple" schedule, as Forge does.
    cfg_scale = req.cfg_scale if "cfg_scale" in req.model_fields_set else family.cfg_scale
    sampler_name = req.sampler_name if "sampler_name" in req.model_fields_set else family.sampler
    if sampler_name != req.sampler_name:
        try:
            sampler = resolve_sampler(sampler_name, req.scheduler_type)
        except SamplerChoiceError as e:
            raise RequestError("scheduler_type", str(e)) from None
    if (req.scheduler_type is None and family.prediction == "flow" and sampler.spec.kind == "k"
            and "simple" in sampler.spec.schedules):
        sampler = resolve_sampler(sampler_name, "simple")

    refiner = None
    if req.refiner_checkpoint:
        try:
            refiner = registry.resolve_model(req.refiner_checkpoint, models=models, problems=problems)
        except UnknownName as e:
            raise RequestError("refiner_checkpoint", str(e)) from None
        if model.family != SDXL:
            raise RequestError("refiner_checkpoint", f"a refiner needs an SDXL base model; {model.name!r} is "
                                                     f"{FAMILY_LABELS.get(model.family, model.family)}")
        if refiner.family not in (SDXL, SDXL_REFINER):
            raise RequestError("refiner_checkpoint", f"{refiner.name!r} is not an SDXL-family model")
        switch_step = int(round(req.steps * req.refiner_switch_at))  # as GenerationPlan.refiner_switch_step
        if not 1 <= switch_step <= req.steps - 1:
            raise RequestError("refiner_switch_at", f"with {req.steps} steps, switching at "
                                                    f"{req.refiner_switch_at} leaves no steps for the base or the refiner")

    try:  # <lora:name:weight> tags in the prompt: A1111's way of naming LoRAs
        encoded_prompt, lora_tags, _ = extract_extra_networks(req.prompt)
    except PromptError as e:
        raise RequestError("prompt", str(e)) from None
    lora_entries = registry.loras() if req.loras or lora_tags else []
    loras: list[LoraUse] = []
    for i, item in enumerate(req.lora_list()):
        try:
            loras.append(LoraUse(registry.resolve_lora(item.name, loras=lora_entries), item.scale))
        except UnknownName as e:
            raise RequestError(f"loras[{i}]", str(e)) from None
    own_loras = len(loras)
    loras += _tag_loras(lora_tags, loras, registry, lora_entries, settings)

    hires_plan = None
    hires = req.hires
    if hires is not None and hires.enabled:
        if hires.scale > settings.max_hires_scale:
            raise RequestError("hires.scale", f"must be <= {settings.max_hires_scale}")
        if hires.steps > settings.max_steps:
            raise RequestError("hires.steps", f"must be <= {settings.max_steps}")
        fw, fh = _family_size(model, round8(w * hires.scale), round8(h * hires.scale), req)
        if fw * fh * req.batch_size > settings.max_hires_pixels:
            raise RequestError("hires.scale", f"final size {fw}x{fh} exceeds {settings.max_hires_pixels} pixels")
        try:
            upscaler = registry.resolve_upscaler(hires.upscaler)
        except UnknownName as e:
            raise RequestError("hires.upscaler", str(e)) from None
        hires_plan = HiresPlan(upscaler, hires.scale, hires.steps, hires.denoising_strength, fw, fh)

    preview = resolve_preview(req, model.family, settings)
    seed = req.seed if req.seed is not None and req.seed >= 0 else secrets.randbelow(2**32)
    understood = Txt2ImgRequest.model_validate({
        **req.model_dump(exclude=set(req.model_extra or ())), "model": model.name, "width": w, "height": h, "seed": seed,
        "cfg_scale": cfg_scale, "sampler_name": sampler_name,
        "scheduler_type": resolved_scheduler_type(sampler),
        "refiner_checkpoint": refiner.name if refiner else None,
        # The prompt keeps its LoRA tags, so the echo lists only the request's own LoRAs.
        "loras": [{"name": u.entry.name, "scale": u.weight} for u in loras[:own_loras]],
        "preview": preview.model_dump() if preview else None})
    plan = GenerationPlan(model=model, prompt=req.prompt, negative_prompt=req.negative_prompt, seed=seed,
                          width=w, height=h, steps=req.steps, cfg_scale=cfg_scale, sampler=sampler,
                          loras=tuple(loras), refiner=refiner, refiner_switch_at=req.refiner_switch_at,
                          hires=hires_plan, clip_skip=req.clip_skip,
                          embeddings=_called_embeddings(registry, encoded_prompt, req.negative_prompt),
                          batch_size=req.batch_size, n_iter=req.n_iter, cfg_rescale=req.cfg_rescale,
                          distilled_cfg_scale=req.distilled_cfg_scale,
                          preview=PreviewPlan(preview.method, preview.every) if preview and preview.every else None)
    return ResolvedJob("txt2img", understood.model_dump(mode="json"), plan,
                       OutputSpec(req.fileType, req.jpeg_quality))


def _family_size(model, w: int, h: int, req) -> tuple[int, int]:
    """Flow families pack 2x2 latent patches: their sizes are multiples of 16 (rounded down,
    so the limits checked on the 8-rounded size still hold)."""
    multiple = family_spec(model.family).vae_scale_factor * (2 if family_spec(model.family).prediction == "flow" else 1)
    if multiple == 8:
        return w, h
    w2, h2 = max(multiple, w // multiple * multiple), max(multiple, h // multiple * multiple)
    return w2, h2


def resolve_preview(req, family: str, settings: Settings) -> PreviewRequest | None:
    """The request's ``preview``, or the operator's default when the request left it out."""
    if "preview" in req.model_fields_set or not settings.previews_default:
        spec = req.preview
    else:
        try:
            spec = PreviewRequest.model_validate(settings.previews_default)
        except ValueError as e:
            raise RequestError("preview", f"DIFFUSIONAPI_PREVIEWS_DEFAULT is invalid: {e}", 500) from None
    if spec is not None and spec.every:
        why = check_preview(spec.method, family, settings.vae_approx_dir)
        if why:
            raise RequestError("preview.method", why)
    return spec


def _tag_loras(tags, named: list[LoraUse], registry: Registry, entries, settings: Settings) -> list[LoraUse]:
    """The prompt's LoRA tags; a LoRA named twice (in tags, or in tags and ``loras``) is
    ambiguous, so it is refused rather than guessed."""
    out: list[LoraUse] = []
    seen = {u.entry.path for u in named}
    for tag in tags:
        try:
            entry = registry.resolve_lora(tag.name, loras=entries)
        except UnknownName as e:
            raise RequestError("prompt", f"{tag.text}: {e}") from None
        if entry.path in seen:
            raise RequestError("prompt", f"{tag.text}: LoRA {entry.name!r} is named more than once "
                                         "(in the prompt, or also in loras); name it once")
        if not -10.0 <= tag.weight <= 10.0:
            raise RequestError("prompt", f"{tag.text}: the weight must be between -10 and 10")
        seen.add(entry.path)
        out.append(LoraUse(entry, tag.weight))
    if len(named) + len(out) > settings.max_loras:
        raise RequestError("prompt", f"at most {settings.max_loras} LoRAs per request (tags included)")
    return out


def _called_embeddings(registry: Registry, prompt: str, negative: str) -> tuple:
    """Embeddings whose name occurs in a prompt (a cheap superset; the tokenizer decides)."""
    text = f"{prompt}\n{negative}".lower()
    if not text.strip():
        return ()
    return tuple(e for e in registry.embeddings() if e.name.lower() in text)


def input_image(text: str, field: str, settings: Settings):
    """A request image decoded and checked (format, truncation, size) or a RequestError naming it.
    The largest image the service makes is also the largest it takes in."""
    try:
        return decode_image(text, field, settings.max_hires_pixels)
    except ImageInputError as e:
        raise RequestError(e.field, e.message, e.status) from None


def resolve_img2img(req: Img2ImgRequest, registry: Registry, settings: Settings, *,
                    model_given: bool = True) -> ResolvedJob:
    init = input_image(req.init_image, "init_image", settings)
    mask = input_image(req.mask, "mask", settings) if req.mask else None
    if mask is not None and mask.size != init.size:
        raise RequestError("mask", f"mask is {mask.width}x{mask.height} but init_image is "
                                   f"{init.width}x{init.height}; they must be the same size")
    if req.hires is not None and req.hires.enabled:
        raise RequestError("hires", "hires fix is for txt2img; img2img makes width x height directly")
    sized = req.model_copy(update={"width": req.width or init.width, "height": req.height or init.height})
    if req.width is None and round8(init.width) > settings.max_width or \
            req.height is None and round8(init.height) > settings.max_height:
        raise RequestError("width", f"init_image is {init.width}x{init.height}, over the size limit "
                                    f"{settings.max_width}x{settings.max_height}; give width and height")
    job = resolve_txt2img(sized, registry, settings, model_given=model_given)
    plan = job.plan
    plan.init = InitImagePlan(init, req.denoising_strength, req.resize_mode, mask, req.mask_blur, req.inpainting_fill,
                              req.inpaint_full_res, req.inpaint_full_res_padding, bool(req.inpainting_mask_invert))
    fields = ("denoising_strength", "resize_mode", "mask_blur", "inpainting_fill", "inpaint_full_res",
              "inpaint_full_res_padding", "inpainting_mask_invert")
    echo = {**job.echo, **{f: getattr(req, f) for f in fields},
            "init_image": describe(init), "mask": describe(mask) if mask is not None else None}
    record = {**echo, "init_image": req.init_image, "mask": req.mask}
    return ResolvedJob("img2img", echo, plan, job.output, record)


def resolve_upscale(req: UpscaleRequest, registry: Registry, settings: Settings) -> ResolvedJob:
    image = input_image(req.image, "image", settings)
    if req.width is not None:
        w, h, scale = req.width, req.height, None
    else:
        scale = req.scale if req.scale is not None else 2.0
        w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    if w * h > settings.max_hires_pixels:
        raise RequestError("scale" if scale is not None else "width",
                           f"result {w}x{h} exceeds {settings.max_hires_pixels} pixels")
    builtin = {k.lower(): k for k in PIXEL_RESIZERS}
    entry = None
    if req.upscaler.strip().lower() in builtin:
        method = builtin[req.upscaler.strip().lower()]
    else:
        try:
            entry = registry.resolve_upscaler(req.upscaler)
        except UnknownName as e:
            raise RequestError("upscaler", f"{e}; or one of: {', '.join(PIXEL_RESIZERS)}") from None
        if entry.is_latent:
            raise RequestError("upscaler", f"{entry.name!r} works on latents (hires fix only); use an upscaler "
                                           f"file or one of: {', '.join(PIXEL_RESIZERS)}")
        method = entry.name
    plan = UpscalePlan(image, entry, method, w, h, scale)
    echo = {**req.model_dump(mode="json", exclude=set(req.model_extra or ())), "image": describe(image),
            "upscaler": method, "scale": scale, "width": w, "height": h}
    record = {**echo, "image": req.image, "width": req.width, "height": req.height}
    return ResolvedJob("upscale", echo, plan, OutputSpec(req.fileType, req.jpeg_quality), record)
