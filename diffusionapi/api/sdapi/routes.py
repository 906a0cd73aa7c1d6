"""`/sdapi/v1/...`: AUTOMATIC1111's API over this service's queue. Routes stay thin: the wire
models and their conversion live in `protocol.py`, the waiting in `jobs.py`."""
from __future__ import annotations

import base64
import io
import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from ... import __version__
from ...errors import ServiceError
from ...images import UntrustedImageError
from ...engine.samplers import SAMPLER_NAMES, SAMPLERS
from ...security import jsonbody
from ...security.paths import shown_path
from ...vocabulary import LATENT_UPSCALE_MODES
from ..jobs import caller_of, idempotency_key_of
from ..pnginfo import decode_image_b64, read_png_info
from . import protocol as p
from .jobs import Final, wait_for

log = logging.getLogger("diffusionapi.sdapi")

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 API"])


def sdapi_state(request: Request):
    return request.app.state.sdapi


def _error(status: int, message: str, *, kind: str = "HTTPException", headers: dict | None = None) -> JSONResponse:
    # A1111's error body ("error" is the kind, "detail" the message), plus the native "status":
    # the one builder of this dialect's error answers.
    return JSONResponse({"error": kind, "detail": message, "body": "", "errors": message, "status": "error"},
                        status_code=status, headers=headers or None)


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


async def _body(request: Request) -> Any:
    """JSON whatever the Content-Type says (Dify posts JSON text with none); empty means {}."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        return jsonbody.parse(raw)
    except jsonbody.BodyError as e:
        raise BadRequest(e.status, str(e)) from None
    except ValueError as e:
        raise BadRequest(422, f"body: not valid JSON ({e})") from None


def _validate(model: type[BaseModel], data: Any):
    if data in ("", None):
        data = {}
    if not isinstance(data, dict):
        raise BadRequest(422, "body: expected a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise BadRequest(422, "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in e.errors())) from None


def _handles_bad_input(fn):
    """Bad input (and anything the job service refuses) answered in A1111's error shape."""
    import functools

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except BadRequest as e:
            return _error(e.status, e.message)
        except ServiceError as e:
            return _error(e.status, str(e), headers=e.headers)
    return wrapper


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---------------------------------------------------------------------- generation
def _context(request: Request) -> p.Context:
    from ...schemas import Txt2ImgRequest

    s = sdapi_state(request)
    return p.Context(default_sampler=Txt2ImgRequest.model_fields["sampler_name"].default,
                     model=s.chosen_model(), clip_skip=s.options.clip_skip,
                     resolve_checkpoint=lambda v: s.catalog.resolve(v).name,
                     takes_modules=lambda v: _takes_modules(request, v), vae=s.options.sd_vae,
                     modules=s.options.modules)


def _takes_modules(request: Request, model: str | None) -> bool:
    """Whether ``model`` (None: the service default) is a single file of a flow family, which runs
    with component files; others keep their own text encoders and VAE."""
    from ...families import spec as family_spec
    from ...vocabulary import ModelFormat

    registry = request.app.state.registry
    try:
        entry = registry.resolve_model(model or request.app.state.settings.default_model)
    except LookupError:
        return False
    return entry.format == ModelFormat.SINGLE_FILE and family_spec(entry.family).prediction == "flow"


def _component_list(request: Request, role: str) -> list[dict]:
    return [{"model_name": c.name, "filename": str(c.path)}
            for c in request.app.state.registry.components.files() if c.role == role]


@router.get("/sd-modules")
def sd_modules(request: Request):
    """Forge's module list: text encoders and VAEs (forge_additional_modules takes these)."""
    return _component_list(request, "text_encoder") + _component_list(request, "vae")


@router.get("/sd-vae")
def sd_vae(request: Request):
    return _component_list(request, "vae")


def _info(req: p.Txt2ImgAPIRequest, final: Final, submitted, sdapi, started: float) -> dict:
    """A1111's `info` JSON, from what the job service resolved at submit (names, seed, sampler and
    schedule) and the images the job made."""
    payload = submitted.job.echo
    sampler = submitted.job.plan.sampler
    infotexts = [im.infotext or "" for im in final.images]
    seeds = [im.seed for im in final.images] or [payload.get("seed")]
    n = max(len(final.images), 1)
    model_name = payload.get("model")
    sha = None
    if model_name:
        try:
            sha = sdapi.catalog.sha256(sdapi.catalog.resolve(model_name))
        except (LookupError, OSError):
            sha = None
    hires = payload.get("hires") or {}
    return {
        "prompt": payload.get("prompt", req.prompt), "all_prompts": [payload.get("prompt", req.prompt)] * n,
        "negative_prompt": payload.get("negative_prompt", ""),
        "all_negative_prompts": [payload.get("negative_prompt", "")] * n,
        "seed": seeds[0], "all_seeds": seeds, "subseed": req.subseed, "all_subseeds": [req.subseed] * n,
        "subseed_strength": req.subseed_strength,
        "width": payload.get("width", req.width), "height": payload.get("height", req.height),
        "sampler_name": sampler.infotext_sampler,
        "cfg_scale": payload.get("cfg_scale", req.cfg_scale), "steps": payload.get("steps", req.steps),
        "batch_size": payload.get("batch_size", req.batch_size), "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": model_name, "sd_model_hash": sha[:10] if sha else None,
        "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": req.seed_resize_from_w, "seed_resize_from_h": req.seed_resize_from_h,
        "denoising_strength": payload.get("denoising_strength", hires.get("denoising_strength",
                                                                          req.denoising_strength)),
        "extra_generation_params": {"Schedule type": sampler.infotext_schedule},
        "index_of_first_image": 0, "infotexts": infotexts, "styles": req.styles or [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)),
        "clip_skip": payload.get("clip_skip", 1), "is_using_inpainting_conditioning": False,
        "version": f"diffusionapi {__version__}",
    }


async def _generate(request: Request, req: p.Txt2ImgAPIRequest, kind: str):
    sdapi = sdapi_state(request)
    ctx = await run_in_threadpool(_context, request)
    try:
        native = await run_in_threadpool(p.native_request, req, ctx)
        # Forge's way to edit: img2img on an editing model (Kontext) is an edit job, its
        # init_images the reference images.
        if kind == "img2img" and await run_in_threadpool(sdapi.jobs.edits, native.model):
            kind, native = "edit", await run_in_threadpool(p.edit_request, req, ctx)
    except p.FieldError as e:
        raise BadRequest(422, str(e)) from None
    for w in ctx.warnings:
        log.warning("sdapi %s: %s", kind, w)
    started = time.time()
    # a ServiceError (a refusal, a key's 429) becomes A1111's error body
    submitted = await run_in_threadpool(lambda: sdapi.jobs.submit(kind, native, caller_of(request),
                                                                  idempotency_key=idempotency_key_of(request)))
    final = await wait_for(request, sdapi.jobs, submitted.job_id)
    if final is None:  # the client went away; its job was cancelled
        return _error(499, "client closed the request")
    parameters = req.model_dump(mode="json")
    if kind in ("img2img", "edit") and not getattr(req, "include_init_images", False):
        parameters["init_images"], parameters["mask"] = None, None
    if final.state == "error":
        return _error(500, final.error or "generation failed", kind="GenerationError")
    images = [_b64(im.data) for im in final.images] if req.send_images else []
    info = await run_in_threadpool(_info, req, final, submitted, sdapi, started)  # may hash a model file once
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


@router.post("/txt2img", response_model=p.GenerationResponse)
@_handles_bad_input
async def txt2img(request: Request):
    return await _generate(request, _validate(p.Txt2ImgAPIRequest, await _body(request)), "txt2img")


@router.post("/img2img", response_model=p.GenerationResponse)
@_handles_bad_input
async def img2img(request: Request):
    return await _generate(request, _validate(p.Img2ImgAPIRequest, await _body(request)), "img2img")


@router.post("/extra-single-image", response_model=p.ExtrasSingleImageResponse)
@_handles_bad_input
async def extra_single_image(request: Request):
    req = _validate(p.ExtrasSingleImageRequest, await _body(request))
    sdapi = sdapi_state(request)
    data = decode_image_arg(req.image, "image")
    job_id, resized = await run_in_threadpool(sdapi.upscale, req, data, caller_of(request))
    if resized is not None:  # "None", "Lanczos", "Nearest": a plain resize, done here
        return {"image": _b64(resized), "html_info": _html_info(req)}
    final = await wait_for(request, sdapi.jobs, job_id)
    if final is None:
        return _error(499, "client closed the request")
    if final.state != "done" or not final.images:
        return _error(500, final.error or "upscaling failed", kind="UpscaleError")
    return {"image": _b64(final.images[0].data), "html_info": _html_info(req)}


def _html_info(req: p.ExtrasSingleImageRequest) -> str:
    import html

    return f"<p>Postprocess upscaler: {html.escape(req.upscaler_1)}</p>"


def decode_image_arg(value: str, field: str) -> bytes:
    from PIL import Image

    try:
        data = decode_image_b64(value or "")
        Image.open(io.BytesIO(data)).verify()
    except Exception:  # noqa: BLE001 - anything undecodable is the caller's input
        raise BadRequest(422, f"{field}: not a base64-encoded image") from None
    return data


@router.post("/png-info", response_model=p.PNGInfoResponse)
@_handles_bad_input
async def png_info(request: Request):
    req = _validate(p.PNGInfoRequest, await _body(request))
    try:
        data = decode_image_b64(req.image or "")
        # Off the event loop: reading a client's image is CPU work (docs/security.md).
        info, others, items = await run_in_threadpool(read_png_info, data, request.app.state.settings)
    except (ValueError, UntrustedImageError) as e:
        raise BadRequest(getattr(e, "status", 422), f"image: {e}") from None
    return {"info": info or "", "items": others, "parameters": items if info else {}}


# ---------------------------------------------------------------------- progress and control
@router.get("/progress", response_model=p.ProgressResponse)
async def progress(request: Request, skip_current_image: bool = Query(False)):
    return await run_in_threadpool(sdapi_state(request).progress, skip_current_image, caller_of(request))


@router.post("/interrupt")
async def interrupt(request: Request):
    sdapi_state(request).interrupt(caller_of(request))
    return {}


@router.post("/skip")
async def skip(request: Request):
    # A1111 skips the current image of a batch; a job here is one unit, so it stops like interrupt.
    sdapi_state(request).interrupt(caller_of(request))
    return {}


# ---------------------------------------------------------------------- options and listings
@router.get("/options")
async def get_options(request: Request):
    return await run_in_threadpool(sdapi_state(request).get_options)


@router.post("/options")
@_handles_bad_input
async def set_options(request: Request):
    # The options (the model above all) are every key's: a user key may not change them.
    caller = caller_of(request)
    if not caller.is_admin:
        return _error(403, f"key {caller.name!r} may not change the shared options (the model every key uses); "
                           "that needs an admin key")
    data = await _body(request)
    if not isinstance(data, dict):
        raise BadRequest(422, "body: expected a JSON object of options")
    try:
        await run_in_threadpool(sdapi_state(request).set_options, data)
    except LookupError as e:
        raise BadRequest(422, f"sd_model_checkpoint: {e.args[0] if e.args else e}") from None
    return None


@router.get("/cmd-flags")
async def cmd_flags(request: Request):
    s = request.app.state.settings
    # Directory roles, not the server's paths (security/paths.py).
    return {"api": True, "nowebui": True, "api_auth": None, "listen": True, "ckpt_dir": "models",
            "lora_dir": "loras", "esrgan_models_path": "upscalers",
            "device_id": None, "lowvram": bool(s.cpu_offload), "medvram": False}


@router.get("/samplers")
async def samplers():
    return [{"name": n, "aliases": p.SAMPLER_ALIASES.get(n, []),
             "options": {"scheduler": "karras"} if n.endswith(" Karras") else {}}
            for n in SAMPLER_NAMES if n in SAMPLERS]


@router.get("/schedulers")
async def schedulers():
    return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None,
             "default_rho": s.default_rho, "need_inner_model": s.need_inner_model} for s in p.SCHEDULERS]


@router.get("/upscalers")
async def upscalers(request: Request):
    # SillyTavern takes item 0 as "None"; Lanczos and Nearest are plain resizes.
    out = [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
           for n in p.BUILTIN_UPSCALERS]
    for u in await run_in_threadpool(request.app.state.registry.upscalers):
        if not u.is_latent:
            out.append({"name": u.name, "model_name": u.name, "model_url": None,
                        "model_path": shown_path(u.path, request.app.state.settings.upscalers_dir, "upscalers"),
                        "scale": 4})
    return out


@router.get("/latent-upscale-modes")
async def latent_upscale_modes():
    return [{"name": n} for n in LATENT_UPSCALE_MODES]


@router.get("/sd-models")
async def sd_models(request: Request):
    return await run_in_threadpool(sdapi_state(request).catalog.sd_models)


@router.get("/loras")
async def loras(request: Request):
    return await run_in_threadpool(sdapi_state(request).loras)


@router.get("/embeddings")
async def embeddings(request: Request):
    return await run_in_threadpool(sdapi_state(request).embeddings)


@router.get("/memory")
async def memory():
    return await run_in_threadpool(_memory)


def _memory() -> dict:
    import psutil

    vm = psutil.virtual_memory()
    rss = psutil.Process().memory_info().rss
    ram = {"free": vm.available, "used": rss, "total": vm.total}
    cuda: dict = {"error": "unavailable"}
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            cuda = {"system": {"free": free, "used": total - free, "total": total}}
    except Exception as e:  # noqa: BLE001 - memory stats are best effort
        cuda = {"error": str(e)}
    return {"ram": ram, "cuda": cuda}


@router.get("/scripts")
async def scripts():
    # sd-webui-controlnet's alwayson script (api/sdapi/controlnet.py); webuiapi looks for
    # "controlnet m2m" (the extension's other script) to decide that ControlNet is there.
    names = ["controlnet", "controlnet m2m"]
    return {"txt2img": names, "img2img": list(names)}


@router.get("/script-info")
async def script_info():
    return []


for _path in ("hypernetworks", "face-restorers", "realesrgan-models", "prompt-styles",
              "extensions"):
    router.add_api_route(f"/{_path}", lambda: [], methods=["GET"], name=f"sdapi_{_path}")


@router.post("/refresh-checkpoints")
@router.post("/refresh-loras")
@router.post("/refresh-vae")
async def refresh():
    return None  # every listing is a fresh scan of its directory


@router.post("/unload-checkpoint")
@router.post("/reload-checkpoint")
async def checkpoint_residency():
    # The worker owns the models and keeps them in its LRU cache; nothing to do from here.
    return {}


def build_router(state) -> APIRouter:
    """The router (credentials are checked for every route by the guard middleware, main.py)."""
    # Not in the native OpenAPI schema: A1111's models are its documentation (README table).
    outer = APIRouter(include_in_schema=False)
    outer.include_router(router)
    return outer


__all__ = ["router", "build_router"]
