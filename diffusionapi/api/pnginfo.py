"""POST /png-info: the A1111 parameters an image carries, as text, items and native request fields."""
from __future__ import annotations

import base64
import binascii
import io
from typing import Any, Literal

from fastapi import APIRouter
from ..errors import RequestError
from pydantic import BaseModel, Field

from ..images import infotext_parameters, parse_infotext, read_infotext

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


@router.post("/png-info", response_model=PngInfoResponse, responses={422: {"model": _Error}})
def png_info(body: PngInfoRequest):
    from PIL import Image, UnidentifiedImageError

    try:
        data = decode_image_b64(body.image)
        Image.open(io.BytesIO(data)).verify()
        text = read_infotext(data)
    except (ValueError, UnidentifiedImageError, OSError, SyntaxError) as e:
        raise RequestError("image", str(e) if isinstance(e, ValueError) else "not a readable PNG or JPEG image") \
            from None
    if text is None:
        return PngInfoResponse(infotext=None)
    items = parse_infotext(text)
    return PngInfoResponse(infotext=text, items=items, parameters=infotext_parameters(items))
