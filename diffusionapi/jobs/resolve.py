"""From a validated request to exactly what will run: names resolved, limits checked.

The job service calls this once at submit (so bad input is a 4xx and nothing is queued); the
payload it returns (the request as understood: names resolved, seed drawn, defaults filled) is
the job record. The worker builds the plan from that record with ``resolve_job``, which looks
the files up again (they may have changed meanwhile) but applies no limit a second time: a job
accepted under the limits of its submit runs.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, replace

from ..components import T5_TOKENIZER_FOLDER, T5XXL, ComponentError, choose, choose_vae, text_encoders_dir
from ..config import FIELD_LIMITS, Settings
from ..errors import RequestError
from ..engine.live import check_preview
from ..engine.plan import GenerationPlan, HiresPlan, InitImagePlan, LoraUse, PreviewPlan, UpscalePlan
from ..engine.prompts import PromptError, extract_extra_networks
from ..engine.samplers import SamplerChoiceError, resolve_sampler, resolved_scheduler_type
from ..families import FAMILIES, spec as family_spec
from ..limits import LimitExceeded, check_plan
from ..registry import Registry, UnknownName
from ..imageinput import PIXEL_RESIZERS, ImageInputError, decode_image, describe
from ..schemas import EditRequest, Img2ImgRequest, PreviewRequest, StepCacheRequest, Txt2ImgRequest, UpscaleRequest
from ..vocabulary import (FAMILY_LABELS, SDXL, SDXL_REFINER, STEP_CACHE_METHODS, ModelEntry, ModelFormat,
                          UpscalerEntry)


@dataclass(frozen=True)
class OutputSpec:
    """How the worker encodes the images (not the engine's business)."""
    file_type: str = "jpg"
    jpeg_quality: int = 85


@dataclass
class ResolvedJob:
    kind: str                # the job record's kind: "txt2img", "img2img", "edit", "upscale"
    echo: dict               # the request as understood (defaults filled, names resolved): the payload echo
    plan: GenerationPlan | UpscalePlan
    output: OutputSpec
    # What the job record keeps, when it differs from the echo: img2img and upscale jobs keep
    # their images there, while the echo (returned with the result) only describes them.
    record: dict | None = None

    @property
    def payload(self) -> dict:
        return self.record if self.record is not None else self.echo


# Record fields that carry input images: the job record keeps them until the job ends (then the
# store drops them), the echo only describes them.
INPUT_FIELDS: tuple[str, ...] = ("init_image", "mask", "image", "reference_images")
# ... and the unit lists whose entries carry them (ControlNet and IP-Adapter units).
UNIT_INPUT_FIELDS: dict[str, tuple[str, ...]] = {"controlnets": ("image", "mask"), "ip_adapters": ("images",)}


def without_inputs(payload) -> dict | None:
    """A job record's payload with its input images dropped (the stores call this when the job
    ends: it never runs again); None when it carries none."""
    if not isinstance(payload, dict):
        return None
    out, dropped = dict(payload), False
    for f in INPUT_FIELDS:
        if out.get(f):
            out[f], dropped = None, True
    for f, keys in UNIT_INPUT_FIELDS.items():
        units = out.get(f)
        if isinstance(units, list) and any(isinstance(u, dict) and any(u.get(k) for k in keys) for u in units):
            out[f] = [{**u, **{k: None for k in keys}} if isinstance(u, dict) else u for u in units]
            dropped = True
    return out if dropped else None


def round8(v: float) -> int:
    if isinstance(v, int):  # exact for any int (v / 8 overflows a float past 10**308)
        q, r = divmod(v, 8)
        return max(8, (q + (r > 4 or (r == 4 and q % 2 == 1))) * 8)  # round half to even, as round()
    return max(8, int(round(v / 8)) * 8)


def resolve_request(req: Txt2ImgRequest, registry: Registry, settings: Settings) -> GenerationPlan:
    """Just the plan (tests and benchmarks drive the engine with it)."""
    return resolve_txt2img(req, registry, settings).plan


def resolve_job(kind: str, payload: dict, registry: Registry, settings: Settings) -> ResolvedJob:
    """A job record (written at submit) -> what runs. The record is read back into its type and
    its names looked up again (files may have changed since submit); limits are not re-applied."""
    types = {"txt2img": (Txt2ImgRequest, resolve_txt2img), "img2img": (Img2ImgRequest, resolve_img2img),
             "edit": (EditRequest, resolve_edit), "upscale": (UpscaleRequest, resolve_upscale)}
    if kind not in types:
        raise RequestError("kind", f"unknown job kind {kind!r}")
    request_type, resolver = types[kind]
    return resolver(request_type.model_validate(payload), registry, settings, limits=False)


def _field_value(req, field: str):
    value = req
    for part in field.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def check_field_limits(req, settings: Settings) -> None:
    """The configured per-field limits (config.FIELD_LIMITS), as 422s naming the field."""
    for limit in FIELD_LIMITS:
        value, cap = _field_value(req, limit.field), limit.value(settings)
        if value is None or (limit.field.startswith("hires.") and not req.hires.enabled):
            continue  # not given; hires limits apply only when hires runs
        if limit.keyword == "maxLength" and len(value) > cap:
            raise RequestError(limit.field, f"longer than {cap} characters")
        if limit.keyword == "maxItems" and len(value) > cap:
            raise RequestError(limit.field, f"at most {cap} {'LoRAs' if limit.field == 'loras' else 'items'} "
                                            "per request")
        if limit.keyword == "maximum":
            if limit.field in ("width", "height"):
                value = round8(value)
            if value > cap:
                raise RequestError(limit.field, f"must be <= {cap}")


def pick_model(name: str | None, registry: Registry, settings: Settings, models=None, problems=None):
    """The model a request names, or the default one (the first installed base model when the
    default is not installed); UnknownName when a named one is not there."""
    problems = {} if problems is None else problems
    models = registry.models(problems) if models is None else models
    bases = [m for m in models if m.family != SDXL_REFINER]
    try:
        return registry.resolve_model(name if name is not None else settings.default_model,
                                      models=models, problems=problems)
    except UnknownName:
        if name is not None or not bases:
            raise
        # No model named and the default is not installed: the first installed one (e.g. the demo).
        return bases[0]


def check_kind_fits_model(kind: str, model) -> None:
    """An edit job needs an editing model; an edit-only model (one that needs a reference image)
    serves no txt2img, and an editing model's img2img is its edit (POST /edit; /sdapi/v1/img2img
    turns into one) unless the family keeps native img2img (FamilySpec.native_img2img). A 422 naming the model field that says so."""
    family = family_spec(model.family)
    if kind == "edit" and not family.edits:
        editing = ", ".join(f.id for f in FAMILIES if f.edits)
        raise RequestError("model", f"{model.name!r} ({family.label}) cannot edit images: an edit job needs an "
                                    f"instruction-editing model (families: {editing})")
    if kind == "img2img" and family.edits and not family.native_img2img:
        raise RequestError("model", f"{model.name!r} is an instruction-editing model ({family.label}): send its "
                                    "image as reference_images to POST /edit (over /sdapi, img2img runs the edit)")
    if kind == "txt2img" and family.inpainting_only:
        raise RequestError("model", f"{model.name!r} ({family.label}) is an inpainting model and cannot make an "
                                    "image from text alone: it needs an image and a mask (POST /img2img with "
                                    "init_image and mask)")
    if kind == "txt2img" and not family.text_to_image:
        raise RequestError("model", f"{model.name!r} ({family.label}) edits images and cannot make one from text "
                                    "alone: POST /edit with reference_images")


def resolve_txt2img(req: Txt2ImgRequest, registry: Registry, settings: Settings, *,
                    limits: bool = True, kind: str = "txt2img") -> ResolvedJob:
    """``limits``: check the configured limits (at submit; a recorded job is not checked again).
    ``kind``: the job this is part of (img2img and edit jobs are txt2img plus their images)."""
    w, h = round8(req.width), round8(req.height)
    if limits:
        check_field_limits(req, settings)
        # One UNet batch holds batch_size images: the pixel limits count all of them.
        if w * h * req.batch_size > settings.max_pixels:
            raise RequestError("width", f"width x height{' x batch_size' if req.batch_size > 1 else ''} "
                                        f"must be <= {settings.max_pixels} pixels")

    try:
        sampler = resolve_sampler(req.sampler_name, req.scheduler_type)
    except SamplerChoiceError as e:
        raise RequestError("scheduler_type" if "scheduler" in str(e) else "sampler_name", str(e)) from None

    problems: dict[str, str] = {}
    models = registry.models(problems)
    try:
        model = pick_model(req.model, registry, settings, models, problems)
    except UnknownName as e:
        raise RequestError("model", str(e)) from None
    if model.family == SDXL_REFINER:
        raise RequestError("model", f"{model.name!r} is an SDXL refiner; use it as refiner_checkpoint "
                                    "with an SDXL base model")
    check_kind_fits_model(kind, model)
    w, h = _family_size(model, w, h, req)
    model, module_names = resolve_modules(model, req.modules, registry, settings)
    family = family_spec(model.family)
    # Family defaults for what the request left out: Flux runs at CFG 1 (no negative pass) on
    # the "Simple" schedule, as Forge does.
    cfg_scale = req.cfg_scale if "cfg_scale" in req.model_fields_set else family.cfg_scale
    # Flux.1 Fill: BFL's guidance 30 (FamilySpec.distilled_cfg_scale).
    distilled_cfg_scale = (req.distilled_cfg_scale if "distilled_cfg_scale" in req.model_fields_set
                           else family.distilled_cfg_scale)
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
    loras += _tag_loras(lora_tags, loras, registry, lora_entries, settings, limits)

    hires_plan = None
    hires = req.hires
    if hires is not None and hires.enabled:
        fw, fh = _family_size(model, round8(w * hires.scale), round8(h * hires.scale), req)
        if limits and fw * fh * req.batch_size > settings.max_hires_pixels:
            raise RequestError("hires.scale", f"final size {fw}x{fh} exceeds {settings.max_hires_pixels} pixels")
        builtin = {k.lower(): k for k in PIXEL_RESIZERS}
        try:  # a plain resize (A1111's "Lanczos", "Nearest"), a latent mode, or an upscaler file
            upscaler = UpscalerEntry(builtin[hires.upscaler.strip().lower()], None) \
                if hires.upscaler.strip().lower() in builtin else registry.resolve_upscaler(hires.upscaler)
        except UnknownName as e:
            raise RequestError("hires.upscaler", f"{e}; or one of: {', '.join(PIXEL_RESIZERS)}") from None
        hires_plan = HiresPlan(upscaler, hires.scale, hires.steps, hires.denoising_strength, fw, fh)

    preview = resolve_preview(req, model.family, settings)
    step_cache = resolve_step_cache(req, model.family, settings)
    seed = req.seed if req.seed is not None and req.seed >= 0 else secrets.randbelow(2**32)
    understood = Txt2ImgRequest.model_validate({
        **req.model_dump(exclude=set(req.model_extra or ())), "model": model.name, "width": w, "height": h, "seed": seed,
        "cfg_scale": cfg_scale, "sampler_name": sampler_name, "distilled_cfg_scale": distilled_cfg_scale,
        "scheduler_type": resolved_scheduler_type(sampler),
        "refiner_checkpoint": refiner.name if refiner else None, "modules": module_names,
        # The prompt keeps its LoRA tags, so the echo lists only the request's own LoRAs.
        "loras": [{"name": u.entry.name, "scale": u.weight} for u in loras[:own_loras]],
        "preview": preview.model_dump() if preview else None,
        "step_cache": step_cache.filled() if step_cache else None})
    plan = GenerationPlan(model=model, prompt=req.prompt, negative_prompt=req.negative_prompt, seed=seed,
                          width=w, height=h, steps=req.steps, cfg_scale=cfg_scale, sampler=sampler,
                          loras=tuple(loras), refiner=refiner, refiner_switch_at=req.refiner_switch_at,
                          hires=hires_plan, clip_skip=req.clip_skip,
                          embeddings=_called_embeddings(registry, encoded_prompt, req.negative_prompt),
                          batch_size=req.batch_size, n_iter=req.n_iter, cfg_rescale=req.cfg_rescale,
                          distilled_cfg_scale=distilled_cfg_scale, keep_partial=req.keep_partial,
                          step_cache=step_cache.resolved() if step_cache else None,
                          preview=PreviewPlan(preview.method, preview.every) if preview and preview.every else None)
    echo, record = understood.model_dump(mode="json"), None
    if req.controlnets or req.ip_adapters:  # the record keeps the units' images; the echo describes them
        from ..engine.controlnet.request import resolve_ip_adapters, resolve_units, txt2img_inpaint_init

        plan.controlnets, cn_echo, cn_record = resolve_units(req.controlnets, model, settings,
                                                             has_init=isinstance(req, Img2ImgRequest))
        if not isinstance(req, Img2ImgRequest) and plan.hires is None:  # (img2img has no hires pass)
            plan.init = txt2img_inpaint_init(plan.controlnets)
        plan.ip_adapters, ip_echo, ip_record = resolve_ip_adapters(req.ip_adapters, model, settings)
        record = {**echo, "controlnets": cn_record, "ip_adapters": ip_record}
        echo = {**echo, "controlnets": cn_echo, "ip_adapters": ip_echo}
    if limits:  # (after the units: their networks count in the cost)
        _within_limits(plan, settings)
    return ResolvedJob("txt2img", echo, plan, OutputSpec(req.fileType, req.jpeg_quality), record)


def resolve_modules(model: ModelEntry, named: list[str], registry: Registry,
                    settings: Settings) -> tuple[ModelEntry, list[str]]:
    """The component files (components.py) a single file of a flow family runs with, chosen once
    at submit: the record keeps their names, so every worker loads the same ones."""
    fam = family_spec(model.family)
    if model.format != ModelFormat.SINGLE_FILE or fam.prediction != "flow":
        if not named:
            return model, []
        try:  # a model with its own parts: a VAE file may replace its VAE (A1111's sd_vae)
            problems: dict[str, str] = {}
            vae = choose_vae(model.family, model.name, registry.components.files(problems), list(named), problems)
        except ComponentError as e:
            raise RequestError("modules", str(e)) from None
        return replace(model, modules=(vae.path,)), [vae.name]
    if model.path.suffix.lower() not in (".safetensors", ".gguf"):
        raise RequestError("model", f"{model.path.name}: {fam.label} files are read as .safetensors or .gguf only")
    try:
        parts = registry.model_parts(model)
        if parts.problem:
            raise RequestError("model", f"{model.path.name}: {parts.problem}")
        problems = {}
        installed = registry.components.files(problems)
        chosen = choose(model.family, model.path.name, parts, installed, list(named), settings, problems)
    except (ComponentError, OSError, ValueError) as e:
        raise RequestError("modules", str(e)) from None
    tokenizer = None
    if any(c.kind == T5XXL for c in chosen) or T5XXL in parts.inside:
        tokenizer = registry.components.t5_tokenizer()
        if tokenizer is None:
            raise RequestError("modules", f"{model.path.name} runs a T5 text encoder, whose tokenizer is in no model "
                                          f"file: add T5's spiece.model (or tokenizer.json with tokenizer_config.json) "
                                          f"to {text_encoders_dir(settings) / T5_TOKENIZER_FOLDER}/")
    return replace(model, modules=tuple(c.path for c in chosen), t5_tokenizer=tokenizer), [c.name for c in chosen]


def _within_limits(plan: GenerationPlan, settings: Settings) -> None:
    """The limits no single field shows: seeds, prompt nesting, the job's cost (limits.py)."""
    try:
        check_plan(plan, settings.max_cost)
    except LimitExceeded as e:
        raise RequestError(e.field, e.message, e.status) from None


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


def denoiser_kind(family: str) -> str:
    """"transformer" for the flow families (Flux, SD 3), else "unet": what a step cache works on."""
    return "transformer" if family_spec(family).prediction == "flow" else "unet"


def resolve_step_cache(req, family: str, settings: Settings) -> StepCacheRequest | None:
    """The request's ``step_cache``; when left out, the first of DIFFUSIONAPI_STEP_CACHE_DEFAULT's
    entries made for this model's kind of network (none: no caching)."""
    kind = denoiser_kind(family)
    if "step_cache" in req.model_fields_set:
        chosen = req.step_cache
        if chosen is not None and STEP_CACHE_METHODS[chosen.method].denoiser != kind:
            fits = [m.name for m in STEP_CACHE_METHODS.values() if m.denoiser == kind]
            raise RequestError("step_cache.method", f"{chosen.method!r} works on {STEP_CACHE_METHODS[chosen.method].denoiser}s; "
                               f"this model ({FAMILY_LABELS.get(family, family)}) has a {kind}; valid choices: "
                               f"{', '.join(fits)}")
        return chosen
    for item in settings.step_cache_default:
        try:
            chosen = StepCacheRequest.model_validate(item)
        except ValueError as e:
            raise RequestError("step_cache", f"DIFFUSIONAPI_STEP_CACHE_DEFAULT is invalid: {e}", 500) from None
        if STEP_CACHE_METHODS[chosen.method].denoiser == kind:
            return chosen
    return None


def _tag_loras(tags, named: list[LoraUse], registry: Registry, entries, settings: Settings,
               limits: bool = True) -> list[LoraUse]:
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
    if limits and len(named) + len(out) > settings.max_loras:
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
                    limits: bool = True) -> ResolvedJob:
    init = input_image(req.init_image, "init_image", settings)
    mask = input_image(req.mask, "mask", settings) if req.mask else None
    if mask is not None and mask.size != init.size:
        raise RequestError("mask", f"mask is {mask.width}x{mask.height} but init_image is "
                                   f"{init.width}x{init.height}; they must be the same size")
    if req.hires is not None and req.hires.enabled:
        raise RequestError("hires", "hires fix is for txt2img; img2img makes width x height directly")
    sized = req.model_copy(update={"width": req.width or init.width, "height": req.height or init.height})
    if limits and req.width is None and round8(init.width) > settings.max_width or \
            req.height is None and round8(init.height) > settings.max_height:
        raise RequestError("width", f"init_image is {init.width}x{init.height}, over the size limit "
                                    f"{settings.max_width}x{settings.max_height}; give width and height")
    job = resolve_txt2img(sized, registry, settings, limits=limits, kind="img2img")
    plan = job.plan
    if mask is None and family_spec(plan.model.family).inpainting_only:
        raise RequestError("mask", f"{plan.model.name!r} ({family_spec(plan.model.family).label}) is an inpainting "
                                   "model: img2img on it needs a mask (white = the part to repaint)")
    plan.init = InitImagePlan(init, req.denoising_strength, req.resize_mode, mask, req.mask_blur, req.inpainting_fill,
                              req.inpaint_full_res, req.inpaint_full_res_padding, bool(req.inpainting_mask_invert))
    fields = ("denoising_strength", "resize_mode", "mask_blur", "inpainting_fill", "inpaint_full_res",
              "inpaint_full_res_padding", "inpainting_mask_invert")
    echo = {**job.echo, **{f: getattr(req, f) for f in fields},
            "init_image": describe(init), "mask": describe(mask) if mask is not None else None}
    record = {**echo, **({k: job.record[k] for k in ("controlnets", "ip_adapters")} if job.record else {}),
              "init_image": req.init_image, "mask": req.mask}
    return ResolvedJob("img2img", echo, plan, job.output, record)


def resolve_edit(req: EditRequest, registry: Registry, settings: Settings, *,
                 limits: bool = True) -> ResolvedJob:
    """An edit job: txt2img on an editing model, its reference images seen at every step. The
    size defaults to the first reference's; a mask (the first reference's size) keeps that
    reference's pixels where it is black, as inpainting at full strength does."""
    if limits:
        check_field_limits(req, settings)  # the count of references, before decoding any
    refs = [input_image(text, f"reference_images[{i}]", settings) for i, text in enumerate(req.reference_images)]
    first = refs[0]
    mask = input_image(req.mask, "mask", settings) if req.mask else None
    if mask is not None and mask.size != first.size:
        raise RequestError("mask", f"mask is {mask.width}x{mask.height} but reference_images[0] is "
                                   f"{first.width}x{first.height}; they must be the same size")
    if req.hires is not None and req.hires.enabled:
        raise RequestError("hires", "hires fix is for txt2img; an edit makes width x height directly")
    if limits and (req.width is None and round8(first.width) > settings.max_width
                   or req.height is None and round8(first.height) > settings.max_height):
        raise RequestError("width", f"reference_images[0] is {first.width}x{first.height}, over the size limit "
                                    f"{settings.max_width}x{settings.max_height}; give width and height")
    sized = Txt2ImgRequest.model_validate({
        **req.model_dump(exclude={"reference_images", "mask", "mask_blur"} | set(req.model_extra or ()),
                         exclude_unset=True),
        "width": req.width or first.width, "height": req.height or first.height})
    job = resolve_txt2img(sized, registry, settings, limits=limits, kind="edit")
    plan = job.plan
    plan.references = tuple(refs)
    _check_pipeline_run(plan, mask is not None)
    if mask is not None:
        # Full strength from the first reference: only the masked part is made anew.
        plan.init = InitImagePlan(first, 1.0, 0, mask, req.mask_blur)
    echo = {**job.echo, "reference_images": [describe(im) for im in refs],
            "mask": describe(mask) if mask is not None else None, "mask_blur": req.mask_blur}
    record = {**echo, **({k: job.record[k] for k in ("controlnets", "ip_adapters")} if job.record else {}),
              "reference_images": list(req.reference_images), "mask": req.mask}
    return ResolvedJob("edit", echo, plan, job.output, record)


def _check_pipeline_run(plan: GenerationPlan, has_mask: bool) -> None:
    """What a family that runs through its own diffusers pipeline (FamilySpec.pipeline_sampling:
    Qwen-Image-Edit) cannot do, as 422s naming the field: other samplers or schedules, masks,
    LoRAs, ControlNet; several references on a pipeline that takes one."""
    from ..families import folder_pipeline
    from ..families.qwen_image_edit import takes_several_references

    family = family_spec(plan.model.family)
    if family.pipeline_sampling is None:
        return
    name = f"{plan.model.name!r} ({family.label})"
    sampler, schedule = family.pipeline_sampling
    if (plan.sampler.spec.name, plan.sampler.schedule) != (sampler, schedule):
        raise RequestError("sampler_name", f"{name} runs on its pipeline's own scheduler: sampler {sampler!r} with "
                                           f"scheduler_type {schedule!r} only, not {plan.sampler.spec.name!r} with "
                                           f"{plan.sampler.schedule!r}")
    for field, used in (("mask", has_mask), ("loras", bool(plan.loras)), ("controlnets", bool(plan.controlnets)),
                        ("ip_adapters", bool(plan.ip_adapters))):
        if used:
            raise RequestError(field, f"{name} takes no {field} yet")
    pipeline = folder_pipeline(plan.model.path) if plan.model.path.is_dir() else None
    if len(plan.references) > 1 and pipeline is not None and not takes_several_references(pipeline):
        raise RequestError("reference_images", f"{name} ({pipeline}) takes one reference image; Qwen-Image-Edit "
                                               f"Plus (QwenImageEditPlusPipeline) takes several")


def resolve_upscale(req: UpscaleRequest, registry: Registry, settings: Settings, *,
                    limits: bool = True) -> ResolvedJob:
    image = input_image(req.image, "image", settings)
    if req.width is not None:
        w, h, scale = req.width, req.height, None
    else:
        scale = req.scale if req.scale is not None else 2.0
        w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    if limits and w * h > settings.max_hires_pixels:
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
