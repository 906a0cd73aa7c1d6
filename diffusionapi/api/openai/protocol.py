"""OpenAI's Images API wire format (`POST /v1/images/generations`, `/edits`, `/variations`,
`GET /v1/models`, the image stream events), as the official SDK sends and reads it, and its
conversion, in one place, into the native typed requests the job service queues.

What maps to what is tabled in docs/openai.md; the numbers it quotes live here.
Unknown fields are ignored (gateways forward whatever they were given); a value OpenAI
defines but this server cannot honour (``background: "transparent"``, ``moderation``,
``style``) is ignored too, never an error.
"""
from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ...imageinput import ImageInputError, has_alpha, open_image
from ...schemas import EditRequest, Img2ImgRequest, Txt2ImgRequest
from ...vocabulary import SDXL, SDXL_REFINER, ModelEntry
from .errors import OpenAIError, param_of

# ---------------------------------------------------------------------- the numbers
# quality -> sampler steps ("auto" and the retired DALL-E words included). One table.
QUALITY_STEPS: dict[str, int] = {"low": 12, "medium": 20, "standard": 20, "auto": 25, "high": 35, "hd": 35,
                                 "xhigh": 45, "max": 60}
DEFAULT_QUALITY = "auto"
# "auto" size: the size the model family was trained at.
AUTO_SIZE = {"sd15": (512, 512), SDXL: (1024, 1024)}
MAX_N = 10  # OpenAI's bound on n
# How far from the input an edit may go (img2img denoising strength): a masked edit redraws the
# masked area entirely (the rest is kept exactly, outside the blurred seam); an unmasked edit
# keeps the composition; a variation keeps the subject and changes the rest.
EDIT_MASKED_STRENGTH = 1.0
EDIT_STRENGTH = 0.75
VARIATION_STRENGTH = 0.7
MASK_BLUR = 4  # pixels of seam between kept and redrawn areas (A1111's default)
OUTPUT_FORMATS = ("png", "jpeg", "webp")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# OpenAI's own model ids: clients that hard-code one (Open WebUI falls back to "dall-e-2",
# LibreChat's tool sends "dall-e-3") get the server's default model instead of a 404.
OPENAI_MODEL_IDS = re.compile(r"^(dall-e-[23]|gpt-image-[\w.-]+|chatgpt-image-latest)$")


# ---------------------------------------------------------------------- wire types
def _int_text(v):
    """Multipart forms carry numbers as text ("2")."""
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    return v


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class ImageGenerateRequest(_Wire):
    """`POST /v1/images/generations` (ImageGenerateParams). Extension fields (not OpenAI's):
    negative_prompt, seed, steps, cfg_scale, priority (openai-python: ``extra_body``)."""
    prompt: str
    model: str | None = None
    n: int | None = None
    size: str | None = None
    quality: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    output_format: str | None = None
    output_compression: int | None = None
    stream: bool | None = None
    partial_images: int | None = None
    background: str | None = None   # ignored: the images are opaque
    moderation: str | None = None   # ignored
    style: str | None = None        # ignored (DALL-E 3)
    user: str | None = None         # ignored (logged by the gateway, if any)
    safety_identifier: str | None = None  # ignored
    # extensions
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    priority: int | None = None  # the job's place in the fair line, capped to the key's max_priority

    @field_validator("n", "output_compression", "partial_images", "seed", "steps", "priority", mode="before")
    @classmethod
    def _int_text(cls, v):
        return _int_text(v)

    @field_validator("stream", mode="before")
    @classmethod
    def _bool_text(cls, v):
        if isinstance(v, str):
            return v.strip().lower() in ("true", "1", "yes")
        return v


class ImageEditRequest(ImageGenerateRequest):
    """`POST /v1/images/edits` (ImageEditParams) without its files (the route reads them),
    plus the extension ``strength``."""
    input_fidelity: str | None = None  # ignored
    strength: float | None = None


class ImageVariationRequest(_Wire):
    """`POST /v1/images/variations` (ImageCreateVariationParams) without its file."""
    model: str | None = None
    n: int | None = None
    size: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    user: str | None = None
    strength: float | None = None  # extension
    seed: int | None = None        # extension
    priority: int | None = None    # extension

    @field_validator("n", "seed", "priority", mode="before")
    @classmethod
    def _int_text(cls, v):
        return _int_text(v)


class Image(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[Image]
    background: str | None = None
    output_format: str | None = None
    quality: str | None = None
    size: str | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "diffusionapi"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


def parse(model: type[BaseModel], data: Any):
    """A wire model from a JSON object or a form, or a 400 naming the parameter."""
    if not isinstance(data, dict):
        raise OpenAIError(400, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err.get("loc", ())) or None
        raise OpenAIError(400, f"{param}: {err.get('msg')}" if param else str(err.get("msg")), param=param) from None


# ---------------------------------------------------------------------- conversion
@dataclass
class Plan:
    """A wire request as this server will run it: the native request plus what the answer needs."""
    native: Txt2ImgRequest
    kind: Literal["txt2img", "img2img", "edit"]
    output_format: str
    compression: int
    response_format: str
    quality: str
    size: str
    stream: bool = False
    partial_images: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.output_format]


def pick_model(requested: str | None, registry, settings) -> ModelEntry:
    """A name or label of ours; OpenAI's own ids and no model mean the server's default model.
    Unknown: OpenAI's 404 (model_not_found) naming it."""
    from ...registry import UnknownName

    models = registry.models()
    bases = [m for m in models if m.family != SDXL_REFINER]
    name = (requested or "").strip()
    if name and not OPENAI_MODEL_IDS.match(name):
        try:
            model = registry.resolve_model(name, models=models)
        except UnknownName as e:
            raise OpenAIError(404, f"The model {name!r} does not exist: {e}", param="model",
                              code="model_not_found") from None
        if model.family == SDXL_REFINER:
            raise OpenAIError(400, f"{model.name!r} is an SDXL refiner, not a model that makes images alone",
                              param="model")
        return model
    try:
        return registry.resolve_model(settings.default_model, models=models)
    except UnknownName:
        if not bases:
            raise OpenAIError(503, "no model is installed", type="server_error") from None
        return bases[0]


def parse_size(size: str | None, model: ModelEntry, *, auto: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """"WxH" (any size the limits allow; rounded to a multiple of 8 by the job) or "auto":
    the family's trained size, or ``auto`` where the caller knows better (an edit's input size;
    None: the input image's own size)."""
    text = (size or "auto").strip().lower()
    if text == "auto":
        return auto if auto is not None else AUTO_SIZE.get(model.family, (512, 512))
    m = re.fullmatch(r"(\d{1,5})\s*x\s*(\d{1,5})", text)
    if not m or int(m.group(1)) < 8 or int(m.group(2)) < 8:
        raise OpenAIError(400, f"size: {size!r} is not a size; give WIDTHxHEIGHT (e.g. 1024x1024) or auto",
                          param="size")
    return int(m.group(1)), int(m.group(2))


def split_n(n: int, width: int, height: int, settings) -> tuple[int, int]:
    """n images as (batch_size, n_iter): the largest UNet batch that divides n and fits the
    batch and pixel limits, run n / batch times."""
    for batch in range(min(n, settings.max_batch_size), 0, -1):
        if n % batch == 0 and width * height * batch <= settings.max_pixels:
            return batch, n // batch
    return 1, n


def _check_n(n: int | None) -> int:
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise OpenAIError(400, f"n: {n} is not between 1 and {MAX_N}", param="n")
    return n


def _output(req) -> tuple[str, int]:
    fmt = (getattr(req, "output_format", None) or "png").strip().lower()
    fmt = "jpeg" if fmt == "jpg" else fmt
    if fmt not in OUTPUT_FORMATS:
        raise OpenAIError(400, f"output_format: {fmt!r} is not supported; one of {', '.join(OUTPUT_FORMATS)}",
                          param="output_format")
    compression = getattr(req, "output_compression", None)
    compression = 100 if compression is None else compression
    if not 0 <= compression <= 100:
        raise OpenAIError(400, "output_compression: must be between 0 and 100", param="output_compression")
    return fmt, compression


def _quality(req, settings) -> tuple[str, int]:
    """(quality, steps): the extension ``steps`` wins; a quality's steps stay within the limit."""
    quality = (getattr(req, "quality", None) or DEFAULT_QUALITY).strip().lower()
    if quality not in QUALITY_STEPS:
        raise OpenAIError(400, f"quality: {quality!r} is not one of {', '.join(QUALITY_STEPS)}", param="quality")
    explicit = getattr(req, "steps", None)
    return quality, explicit if explicit else min(QUALITY_STEPS[quality], settings.max_steps)


def _partial_images(req) -> tuple[bool, int]:
    stream = bool(getattr(req, "stream", False))
    partial = getattr(req, "partial_images", None) or 0
    if not 0 <= partial <= 3:
        raise OpenAIError(400, "partial_images: must be between 0 and 3", param="partial_images")
    return stream, partial if stream else 0


def _native(cls, body: dict):
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        native_field = ".".join(str(x) for x in err.get("loc", ())) or None
        param = param_of(native_field)
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        raise OpenAIError(400, f"{param}: {msg}" if param else msg, param=param) from None


def _with_previews(body: dict, steps: int, partial: int) -> dict:
    # Our live previews feed the partial images: about ``partial`` of them, evenly spread.
    if partial:
        body["preview"] = {"every": max(1, steps // (partial + 1)), "method": "approx"}
    return body


def generation_plan(req: ImageGenerateRequest, registry, settings) -> Plan:
    model = pick_model(req.model, registry, settings)
    n = _check_n(req.n)
    width, height = parse_size(req.size, model)
    fmt, compression = _output(req)
    quality, steps = _quality(req, settings)
    stream, partial = _partial_images(req)
    batch, n_iter = split_n(n, width, height, settings)
    body: dict[str, Any] = {"prompt": req.prompt, "model": model.name, "width": width, "height": height,
                            "steps": steps, "batch_size": batch, "n_iter": n_iter, "fileType": "png"}
    _with_previews(body, steps, partial)
    _extensions(req, body)
    return Plan(_native(Txt2ImgRequest, body), "txt2img", fmt, compression, req.response_format or "b64_json",
                quality, f"{width}x{height}", stream, partial)


def _extensions(req, body: dict) -> None:
    for name in ("negative_prompt", "seed", "cfg_scale", "priority"):
        value = getattr(req, name, None)
        if value is not None:
            body[name] = value


# ---------------------------------------------------------------------- edits and variations
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _open(data: bytes, param: str, settings):
    try:
        return open_image(data, param, settings.max_hires_pixels)
    except ImageInputError as e:
        raise OpenAIError(e.status if e.status != 422 else 400, f"{param}: {e.message}", param=param) from None


def alpha_mask(im, param: str) -> bytes | None:
    """OpenAI's mask rule as the native mask: where the alpha channel is 0 (fully transparent)
    the image is edited; everywhere else it is kept. None: the image has no transparent pixel."""
    from PIL import Image as PILImage

    if not has_alpha(im):
        return None
    alpha = im.convert("RGBA").getchannel("A")
    if alpha.getextrema()[0] != 0:
        return None
    native = alpha.point(lambda v: 255 if v == 0 else 0)  # native masks: white = repaint
    out = io.BytesIO()
    PILImage.merge("L", [native]).save(out, "PNG")
    return out.getvalue()


def edit_plan(req: ImageEditRequest, images: list[bytes], mask: bytes | None, registry, settings) -> Plan:
    """The first image is edited (with ``mask``, or its own transparency as DALL-E 2 read it, or
    as a whole); further images are accepted and not used -- except on an instruction-editing
    model (flux1-kontext), where this is a native edit job with every image as a reference, as
    gpt-image-1 takes several."""
    if not images:
        raise OpenAIError(400, "image: at least one image is required", param="image")
    model = pick_model(req.model, registry, settings)
    n = _check_n(req.n)
    first = _open(images[0], "image", settings)
    native_mask = None
    if mask is not None:
        m = _open(mask, "mask", settings)
        if m.size != first.size:
            raise OpenAIError(400, f"mask: the mask is {m.width}x{m.height} but the image is "
                                   f"{first.width}x{first.height}; they must be the same size", param="mask")
        if not has_alpha(m):
            raise OpenAIError(400, "mask: the mask needs an alpha channel; fully transparent pixels mark "
                                   "where the image is edited", param="mask")
        native_mask = alpha_mask(m, "mask")
        if native_mask is None:
            raise OpenAIError(400, "mask: the mask has no fully transparent pixel, so nothing would be edited",
                              param="mask")
    else:
        native_mask = alpha_mask(first, "image")
    size = parse_size(req.size, model, auto=(0, 0))
    width, height = (None, None) if size == (0, 0) else size
    fmt, compression = _output(req)
    quality, steps = _quality(req, settings)
    stream, partial = _partial_images(req)
    batch, n_iter = split_n(n, width or first.width, height or first.height, settings)
    strength = req.strength if req.strength is not None else (
        EDIT_MASKED_STRENGTH if native_mask is not None else EDIT_STRENGTH)
    body: dict[str, Any] = {"prompt": req.prompt, "model": model.name, "width": width, "height": height,
                            "init_image": b64(images[0]), "denoising_strength": strength,
                            "steps": steps, "batch_size": batch, "n_iter": n_iter, "fileType": "png"}
    _with_previews(body, steps, partial)
    if native_mask is not None:
        body.update(mask=b64(native_mask), mask_blur=MASK_BLUR, inpainting_fill=1)
    _extensions(req, body)
    if _edits(model):  # the same fields, as an edit: every image a reference, no strength
        body = {k: v for k, v in body.items() if k not in ("init_image", "denoising_strength", "inpainting_fill")}
        body["reference_images"] = [b64(im) for im in images]
        return Plan(_native(EditRequest, body), "edit", fmt, compression, req.response_format or "b64_json",
                    quality, f"{width or first.width}x{height or first.height}", stream, partial)
    plan = Plan(_native(Img2ImgRequest, body), "img2img", fmt, compression, req.response_format or "b64_json",
                quality, f"{width or first.width}x{height or first.height}", stream, partial)
    if len(images) > 1:
        plan.warnings.append(f"{len(images)} images given; the first is edited, the others are not used")
    return plan


def _edits(model: ModelEntry) -> bool:
    from ...families import BY_ID

    family = BY_ID.get(str(model.family))
    return family is not None and family.edits


def variation_plan(req: ImageVariationRequest, image: bytes | None, registry, settings) -> Plan:
    if image is None:
        raise OpenAIError(400, "image: an image is required", param="image")
    model = pick_model(req.model, registry, settings)
    n = _check_n(req.n)
    first = _open(image, "image", settings)
    size = parse_size(req.size, model, auto=(0, 0))
    width, height = (None, None) if size == (0, 0) else size
    steps = QUALITY_STEPS[DEFAULT_QUALITY]
    batch, n_iter = split_n(n, width or first.width, height or first.height, settings)
    body: dict[str, Any] = {"prompt": "", "model": model.name, "width": width, "height": height,
                            "init_image": b64(image), "steps": steps, "batch_size": batch, "n_iter": n_iter,
                            "denoising_strength": req.strength if req.strength is not None else VARIATION_STRENGTH,
                            "fileType": "png"}
    if req.seed is not None:
        body["seed"] = req.seed
    if req.priority is not None:
        body["priority"] = req.priority
    return Plan(_native(Img2ImgRequest, body), "img2img", "png", 100, req.response_format or "b64_json",
                DEFAULT_QUALITY, f"{width or first.width}x{height or first.height}")


# ---------------------------------------------------------------------- the answer
def encode(png: bytes, fmt: str, compression: int) -> bytes:
    """A job's PNG in the requested format; PNGs pass through unchanged (their infotext chunk
    included). ``output_compression`` is the JPEG/WebP quality."""
    if fmt == "png":
        return png
    from PIL import Image as PILImage

    im = PILImage.open(io.BytesIO(png))
    out = io.BytesIO()
    if fmt == "jpeg":
        im.convert("RGB").save(out, "JPEG", quality=max(1, compression))
    else:
        im.save(out, "WEBP", quality=max(1, compression))
    return out.getvalue()


def usage() -> dict:
    # The stream events require it; this server does not count tokens.
    return {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
            "output_tokens": 0, "total_tokens": 0}
