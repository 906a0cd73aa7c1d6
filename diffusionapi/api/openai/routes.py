"""`/v1/...`: OpenAI's Images API over this service's queue. Routes stay thin: the wire types
and their conversion live in protocol.py; jobs go through the one job service."""
from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import logging
import time

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from ...errors import ServiceError
from ...imageinput import ImageInputError, decode_base64
from ..jobs import caller_of, idempotency_key_of
from ..sdapi.jobs import POLL_SEC
from . import protocol as p
from .errors import OpenAIError, from_service_error

log = logging.getLogger("diffusionapi.openai")

router = APIRouter()
PING_SEC = 15


def _state(request: Request):
    return request.app.state.openai


def _answers_errors(fn):
    """Every refusal in OpenAI's error shape."""

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except ServiceError as e:
            return error_response(from_service_error(e))
        except OpenAIError as e:
            return error_response(e)
    return wrapper


def error_response(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers or None)


# ---------------------------------------------------------------------- reading requests
async def _json(request: Request) -> dict:
    raw = await request.body()
    try:
        data = json.loads(raw) if raw.strip() else {}
    except ValueError as e:
        raise OpenAIError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "the body must be a JSON object")
    return data


def _is_image_field(key: str, name: str) -> bool:
    # The SDK sends one file as `image`, several as `image[]`; other clients `image[0]`, ...
    return key == name or (key.startswith(name + "[") and key.endswith("]"))


async def _form(request: Request) -> tuple[dict, list[bytes], bytes | None]:
    """A multipart (or urlencoded) form: its plain fields, the `image` files in order, the mask."""
    try:
        form = await request.form(max_files=64, max_fields=256)
    except Exception as e:  # noqa: BLE001 - a malformed form is the client's
        raise OpenAIError(400, f"the body is not a readable form ({e})") from None
    fields: dict = {}
    images: list[bytes] = []
    mask = None
    for key, value in form.multi_items():
        if _is_image_field(key, "image") or key == "mask":
            data = await _file_bytes(value, "mask" if key == "mask" else "image")
            if key == "mask":
                mask = data
            else:
                images.append(data)
        elif isinstance(value, str):
            fields[key] = value
    return fields, images, mask


async def _file_bytes(value, param: str) -> bytes:
    if isinstance(value, str):  # not a file part: base64 or a data URL
        return _decode(value, param)
    return await value.read()


def _decode(text, param: str) -> bytes:
    if isinstance(text, dict):  # the JSON form of an image reference: {"image_url": "data:..."}
        text = text.get("image_url") or text.get("b64_json") or ""
    if isinstance(text, str) and text.strip().lower().startswith(("http://", "https://")):
        raise OpenAIError(400, f"{param}: image URLs are not fetched by this server; send the image itself "
                               "(a file, base64 or a data URL)", param=param)
    try:
        return decode_base64(text, param)
    except ImageInputError as e:
        raise OpenAIError(400, f"{param}: {e.message}", param=param) from None


async def _edit_inputs(request: Request) -> tuple[dict, list[bytes], bytes | None]:
    """Multipart as the SDK and Open WebUI send it, or JSON with `images: [{image_url}]`."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
        data = await _json(request)
        refs = data.pop("images", None) or data.pop("image", None) or []
        refs = refs if isinstance(refs, list) else [refs]
        mask = data.pop("mask", None)
        return data, [_decode(r, "image") for r in refs], _decode(mask, "mask") if mask else None
    return await _form(request)


# ---------------------------------------------------------------------- running
async def _submit(request: Request, plan: p.Plan) -> str:
    for w in plan.warnings:
        log.warning("openai %s: %s", request.url.path, w)
    submitted = await run_in_threadpool(lambda: _state(request).jobs.submit(  # Idempotency-Key: #32
        plan.kind, plan.native, caller_of(request), idempotency_key=idempotency_key_of(request)))
    return submitted.job_id


async def _run(request: Request, plan: p.Plan, events: str):
    job_id = await _submit(request, plan)
    if plan.stream:
        return EventSourceResponse(_stream(request, plan, job_id, events), ping=PING_SEC,
                                   headers={"Cache-Control": "no-store"})
    final = await _state(request).jobs.wait_and_take(job_id, POLL_SEC, request.is_disconnected)
    if final is None:  # the client went away; its job was cancelled
        return Response(status_code=499)
    if final.status.state != "done":
        raise _failed(final.status.state, final.status.error)
    images = [im for im in final.images if im is not None]
    data = await run_in_threadpool(_data, request, plan, images)
    return JSONResponse(p.ImagesResponse(created=int(time.time()), data=data, background="opaque",
                                         output_format=plan.output_format, quality=plan.quality,
                                         size=plan.size).model_dump(exclude_none=True))


def _failed(state: str, error: str | None) -> OpenAIError:
    if state == "cancelled":
        return OpenAIError(500, f"the job was cancelled: {error or 'by request'}", type="server_error",
                           code="job_cancelled")
    return OpenAIError(500, f"image generation failed: {error or 'unknown error'}", type="server_error")


def _data(request: Request, plan: p.Plan, images: list[bytes]) -> list[p.Image]:
    out = []
    for png in images:
        data = p.encode(png, plan.output_format, plan.compression)
        if plan.response_format == "url":
            name = _state(request).results.put(data, plan.output_format)
            out.append(p.Image(url=str(request.url_for("openai_result", name=name))))
        else:
            out.append(p.Image(b64_json=base64.b64encode(data).decode()))
    return out


async def _stream(request: Request, plan: p.Plan, job_id: str, events: str):
    """OpenAI's image stream: up to ``partial_images`` of our live previews as
    ``<events>.partial_image``, then one ``<events>.completed`` per image (or an ``error``)."""
    jobs = _state(request).jobs
    common = {"background": "opaque", "output_format": plan.output_format, "quality": plan.quality,
              "size": plan.size}
    finished = False
    try:
        feed = await jobs.events(job_id, None, caller_of(request))
        final = None
        sent = 0
        async for ev in feed if feed is not None else _nothing():
            if ev.type == "preview" and sent < plan.partial_images and ev.data.get("image"):
                image = await run_in_threadpool(_partial, ev.data["image"], plan)
                yield _event(f"{events}.partial_image", {**common, "b64_json": image, "partial_image_index": sent,
                                                         "created_at": int(time.time())})
                sent += 1
            elif ev.final:
                final = (ev.type, ev.data)
                break
        if final is None:  # the feed ended without the final answer: take it
            fj = await asyncio.to_thread(jobs.take_final, job_id)
            final = (fj.status.state, None) if fj else ("error", {"error": "the job's result is gone"})
            images = [im for im in (fj.images if fj else []) if im is not None]
        else:
            images = _view_images(final[1])
        finished = True
        if final[0] != "done":
            e = _failed(final[0], (final[1] or {}).get("error"))
            yield _event("error", e.body())
            return
        for png in images:
            data = await run_in_threadpool(p.encode, png, plan.output_format, plan.compression)
            yield _event(f"{events}.completed", {**common, "b64_json": base64.b64encode(data).decode(),
                                                 "created_at": int(time.time()), "usage": p.usage()})
    finally:
        if not finished:  # the client left mid-stream: nobody will read this job
            await jobs.abandon(job_id)


async def _nothing():
    return
    yield


def _event(name: str, data: dict) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps({"type": name, **data} if name != "error" else data), event=name)


def _view_images(view: dict | None) -> list[bytes]:
    """The images of a final GET /queue/{id} view (the final stream event carries one)."""
    view = view or {}
    items = [im.get("image") for im in view["images"]] if view.get("images") else [view.get("image")]
    return [base64.b64decode(b) for b in items if b]


def _partial(preview_b64: str, plan: p.Plan) -> str:
    """A live preview (a JPEG) in the requested output format."""
    from PIL import Image as PILImage

    im = PILImage.open(io.BytesIO(base64.b64decode(preview_b64)))
    out = io.BytesIO()
    im.save(out, "PNG")
    return base64.b64encode(p.encode(out.getvalue(), plan.output_format, plan.compression)).decode()


# ---------------------------------------------------------------------- routes
@router.post("/images/generations")
@_answers_errors
async def generations(request: Request):
    s = _state(request)
    req = p.parse(p.ImageGenerateRequest, await _json(request))
    plan = await run_in_threadpool(p.generation_plan, req, s.registry, s.settings)
    return await _run(request, plan, "image_generation")


@router.post("/images/edits")
@_answers_errors
async def edits(request: Request):
    s = _state(request)
    fields, images, mask = await _edit_inputs(request)
    req = p.parse(p.ImageEditRequest, fields)
    plan = await run_in_threadpool(p.edit_plan, req, images, mask, s.registry, s.settings)
    return await _run(request, plan, "image_edit")


@router.post("/images/variations")
@_answers_errors
async def variations(request: Request):
    s = _state(request)
    fields, images, _ = await _form(request)
    req = p.parse(p.ImageVariationRequest, fields)
    plan = await run_in_threadpool(p.variation_plan, req, images[0] if images else None, s.registry, s.settings)
    return await _run(request, plan, "image_variation")


@router.get("/images/results/{name}", name="openai_result")
async def result(request: Request, name: str):
    try:
        data = await run_in_threadpool(_state(request).results.read, name)
    except ServiceError as e:  # the cluster's Redis is down: 503, as every route answers then
        return error_response(from_service_error(e))
    if data is None:
        return error_response(OpenAIError(404, "no such result: unknown, or expired", code="not_found"))
    return Response(data, media_type=p.MEDIA_TYPES[name.rsplit(".", 1)[1]], headers={"Cache-Control": "private"})


@router.get("/models")
async def models(request: Request):
    return (await run_in_threadpool(_models, request)).model_dump()


@router.get("/models/{model_id:path}")
@_answers_errors
async def model(request: Request, model_id: str):
    for m in (await run_in_threadpool(_models, request)).data:
        if m.id == model_id:
            return m.model_dump()
    raise OpenAIError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")


def _models(request: Request) -> p.ModelList:
    out = []
    for m in _state(request).registry.models():
        if m.family == "sdxl-refiner":
            continue  # not a model that makes images alone
        try:
            created = int(m.path.stat().st_mtime)
        except OSError:
            created = 0
        out.append(p.Model(id=m.name, created=created))
    return p.ModelList(data=out)
