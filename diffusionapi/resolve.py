"""From a validated request to exactly what will run: names resolved, limits checked.

The API calls this at submit (so bad input is a 4xx and nothing is queued) and the
worker calls it again when it starts the job (the files may have changed meanwhile).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

from .config import Settings
from .registry import SDXL, SDXL_REFINER, LoraEntry, ModelEntry, UnknownName, Registry, UpscalerEntry
from .schemas import Txt2ImgRequest
from .engine.samplers import ResolvedSampler, SamplerChoiceError, resolve_sampler, resolved_scheduler_type


class RequestError(ValueError):
    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


@dataclass
class JobSpec:
    request: Txt2ImgRequest      # defaults filled in, names as resolved: the payload echo
    model: ModelEntry
    refiner: ModelEntry | None
    sampler: ResolvedSampler
    loras: list[tuple[LoraEntry, float]]
    upscaler: UpscalerEntry | None
    width: int
    height: int
    final_width: int
    final_height: int
    seed: int

    @property
    def hires(self):
        h = self.request.hires
        return h if h is not None and h.enabled else None


def round8(v: float) -> int:
    return max(8, int(round(v / 8)) * 8)


def hires_total_steps(steps: int, strength: float) -> int:
    """A1111: a hires pass of ``steps`` steps at ``strength`` is the tail of a schedule this long."""
    return max(int(steps / min(strength, 0.999)), steps)


def resolve_request(req: Txt2ImgRequest, registry: Registry, settings: Settings, *,
                    model_given: bool = True) -> JobSpec:
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
    if w * h > settings.max_pixels:
        raise RequestError("width", f"width x height must be <= {settings.max_pixels} pixels")
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

    refiner = None
    if req.refiner_checkpoint:
        try:
            refiner = registry.resolve_model(req.refiner_checkpoint, models=models, problems=problems)
        except UnknownName as e:
            raise RequestError("refiner_checkpoint", str(e)) from None
        if model.family != SDXL:
            raise RequestError("refiner_checkpoint", f"a refiner needs an SDXL base model; {model.name!r} is SD 1.5")
        if refiner.family not in (SDXL, SDXL_REFINER):
            raise RequestError("refiner_checkpoint", f"{refiner.name!r} is not an SDXL-family model")
        switch_step = int(round(req.steps * req.refiner_switch_at))
        if not 1 <= switch_step <= req.steps - 1:
            raise RequestError("refiner_switch_at", f"with {req.steps} steps, switching at "
                                                    f"{req.refiner_switch_at} leaves no steps for the base or the refiner")

    lora_entries = registry.loras() if req.loras else []
    loras: list[tuple[LoraEntry, float]] = []
    for i, item in enumerate(req.lora_list()):
        try:
            loras.append((registry.resolve_lora(item.name, loras=lora_entries), item.scale))
        except UnknownName as e:
            raise RequestError(f"loras[{i}]", str(e)) from None

    upscaler = None
    fw, fh = w, h
    hires = req.hires
    if hires is not None and hires.enabled:
        if hires.scale > settings.max_hires_scale:
            raise RequestError("hires.scale", f"must be <= {settings.max_hires_scale}")
        if hires.steps > settings.max_steps:
            raise RequestError("hires.steps", f"must be <= {settings.max_steps}")
        fw, fh = round8(w * hires.scale), round8(h * hires.scale)
        if fw * fh > settings.max_hires_pixels:
            raise RequestError("hires.scale", f"final size {fw}x{fh} exceeds {settings.max_hires_pixels} pixels")
        try:
            upscaler = registry.resolve_upscaler(hires.upscaler)
        except UnknownName as e:
            raise RequestError("hires.upscaler", str(e)) from None

    seed = req.seed if req.seed is not None and req.seed >= 0 else secrets.randbelow(2**32)
    understood = Txt2ImgRequest.model_validate({
        **req.model_dump(exclude=set(req.model_extra or ())), "model": model.name, "width": w, "height": h, "seed": seed,
        "scheduler_type": resolved_scheduler_type(sampler),
        "refiner_checkpoint": refiner.name if refiner else None,
        "loras": [{"name": e.name, "scale": s} for e, s in loras]})
    return JobSpec(understood, model, refiner, sampler, loras, upscaler, w, h, fw, fh, seed)
