"""Image encoding and AUTOMATIC1111's "parameters" infotext.

PNG: a tEXt chunk named ``parameters``. JPEG: EXIF UserComment, ``UNICODE\\0`` + UTF-16-BE,
the layout A1111 writes through piexif, so its PNG Info tab and other tools read both.
"""
from __future__ import annotations

import io
import json

from PIL import Image, PngImagePlugin

from . import __version__

EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
UNICODE_PREFIX = b"UNICODE\x00"


def _quote(value) -> str:
    text = str(value)
    if any(c in text for c in ",\n:\""):
        return json.dumps(text, ensure_ascii=False)
    return text


def _num(v: float) -> str:
    return f"{v:g}"


def build_infotext(prompt: str, negative_prompt: str, params: dict) -> str:
    """A1111's layout: prompt, optional 'Negative prompt:' line, then 'Key: value' pairs."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    pairs = []
    for k, v in params.items():
        if v is None or v == "":
            continue
        if isinstance(v, float):
            v = _num(v)
        pairs.append(f"{k}: {_quote(v)}")
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def exif_user_comment(text: str) -> bytes:
    """An EXIF block holding only UserComment, typed UNDEFINED as the standard (and piexif, which
    A1111 reads it with) requires; Pillow would type a bytes value as BYTE."""
    import struct

    comment = UNICODE_PREFIX + text.encode("utf-16-be")
    # Big-endian TIFF: header, IFD0 (one entry: the Exif IFD pointer), Exif IFD (one entry), data.
    ifd0_at, exif_ifd_at = 8, 8 + 2 + 12 + 4
    data_at = exif_ifd_at + 2 + 12 + 4
    tiff = b"MM\x00\x2a" + struct.pack(">I", ifd0_at)
    tiff += struct.pack(">H", 1) + struct.pack(">HHII", EXIF_IFD, 4, 1, exif_ifd_at) + struct.pack(">I", 0)
    tiff += struct.pack(">H", 1) + struct.pack(">HHII", USER_COMMENT, 7, len(comment), data_at) + struct.pack(">I", 0)
    return b"Exif\x00\x00" + tiff + comment


def encode_image(image: Image.Image, file_type: str, jpeg_quality: int, infotext: str) -> bytes:
    buf = io.BytesIO()
    if file_type == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", infotext)
        image.save(buf, format="PNG", pnginfo=info, compress_level=4)
    else:
        image.convert("RGB").save(buf, format="JPEG", quality=jpeg_quality, exif=exif_user_comment(infotext))
    return buf.getvalue()


def read_infotext(data_or_path) -> str | None:
    """The parameters a PNG or JPEG written by us (or A1111) carries."""
    img = Image.open(data_or_path if not isinstance(data_or_path, bytes) else io.BytesIO(data_or_path))
    if "parameters" in img.info:
        return img.info["parameters"]
    raw = img.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if raw is None:
        return None
    if raw.startswith(UNICODE_PREFIX):
        return raw[len(UNICODE_PREFIX):].decode("utf-16-be")
    return raw[8:].decode("utf-8", "replace")


VERSION_TAG = f"diffusionapi {__version__}"
