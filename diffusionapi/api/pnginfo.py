"""POST /png-info: the A1111 parameters an image carries, as text, items and native request fields."""
from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

from fastapi import APIRouter, Request
from ..errors import RequestError
from pydantic import BaseModel, Field

from ..images import UntrustedImageError, infotext_parameters, parse_infotext, read_untrusted_infotext

router = APIRouter()


class PngInfoRequest(BaseModel):
    image: str = Field(min_length=1, description="PNG or JPEG, base64 or a data: URL")


class PngInfoResponse(BaseModel):
    status: Literal["success"] = "success"
    infotext: str | None = Field(None, description="the A1111 'parameters' text; null when the image has none")
    items: dict[str, Any] = Field(default_factory=dict, description="A1111's keys and values, as strings")
    parameters: dict[str, Any] = Field(default_factory=dict,
                                       description="native request fields that reproduce the image")


class _Error(BaseModel):
    status: Literal["error"] = "error"
    error: str
    detail: Any | None = None


def decode_image_b64(value: str) -> bytes:
    """Plain base64 or a data: URL -> bytes (ValueError if it is neither)."""
    s = value.strip()
    if s.startswith("data:"):
        s = s.partition(",")[2]
    s = "".join(s.split())  # line-wrapped base64 is still base64
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64 (plain or a data: URL)") from None


def read_png_info(data: bytes, settings) -> tuple[str | None, dict, dict]:
    """(infotext, other text fields, parsed items) of a client's image, within the limits:
    the input-image pixel limit (checked from the header; no pixel is decoded) and
    ``max_infotext_chars`` (checked before the parser runs). Raises UntrustedImageError.
    CPU work: callers run it in a worker thread, never on the event loop."""
    text, others = read_untrusted_infotext(data, settings.max_hires_pixels, settings.max_infotext_chars)
    return text, others, parse_infotext(text) if text is not None else {}


@router.post("/png-info", response_model=PngInfoResponse,
             responses={413: {"model": _Error}, 422: {"model": _Error}})
def png_info(body: PngInfoRequest, request: Request):  # a plain def: FastAPI runs it in its threadpool
    try:
        data = decode_image_b64(body.image)
        text, _, items = read_png_info(data, request.app.state.settings)
    except (ValueError, UntrustedImageError) as e:
        raise RequestError("image", str(e), getattr(e, "status", 422)) from None
    if text is None:
        return PngInfoResponse(infotext=None)
    return PngInfoResponse(infotext=text, items=items, parameters=infotext_parameters(items))
