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
    """The parameters a PNG or JPEG written by us (or A1111) carries (trusted files: our outputs)."""
    img = Image.open(data_or_path if not isinstance(data_or_path, bytes) else io.BytesIO(data_or_path))
    return _infotext_of(img)


def _infotext_of(img: Image.Image) -> str | None:
    if "parameters" in img.info:
        return img.info["parameters"]
    if img.format == "PNG":
        # Pillow's PNG getexif() decodes every pixel first (to reach an eXIf chunk after the
        # image data): a small file can cost gigabytes. Only an eXIf chunk before the data counts.
        raw_exif = img.info.get("exif")
        if not raw_exif:
            return None
        exif = Image.Exif()
        exif.load(raw_exif)
    else:
        exif = img.getexif()  # JPEG/WebP: read from the header segments, no pixels decoded
    raw = exif.get_ifd(EXIF_IFD).get(USER_COMMENT)
    if raw is None:
        return None
    if raw.startswith(UNICODE_PREFIX):
        return raw[len(UNICODE_PREFIX):].decode("utf-16-be", "replace")
    return raw[8:].decode("utf-8", "replace")


class UntrustedImageError(ValueError):
    """A client's image that png-info will not read; ``status`` 413 for too big, else 422."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


# The formats png-info reads (A1111 writes PNG and JPEG; WebP carries EXIF the same way).
INFO_FORMATS = ("PNG", "JPEG", "WEBP")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_text_within(data: bytes, max_chars: int) -> None:
    """Walk a PNG's chunk headers (no pixel data is touched) and refuse it when its text chunks
    hold more than ``max_chars`` bytes, compressed ones counted decompressed (each inflated at most
    to what is left of the budget), so Pillow never holds more text than that (its own cap is
    64 MB per image). Linear in the number of chunks."""
    import struct
    import zlib

    left, i, n = max_chars, 8, len(data)
    while i + 8 <= n:
        length, kind = struct.unpack(">I4s", data[i:i + 8])
        body = data[i + 8:i + 8 + length]
        if kind == b"tEXt":
            left -= len(body)
        elif kind in (b"zTXt", b"iTXt"):
            key, _, rest = body.partition(b"\0")
            if kind == b"zTXt":
                compressed, payload = True, rest[1:]
            else:  # compression flag, method, language tag \0, translated keyword \0, text
                compressed = rest[:1] == b"\1"
                payload = rest[2:].split(b"\0", 2)[-1]
            if compressed:
                try:
                    payload = zlib.decompressobj().decompress(payload, max(left, 0) + 1)
                except zlib.error:
                    payload = b""  # Pillow skips a broken chunk too
            left -= len(key) + len(payload)
        elif kind in (b"IDAT", b"IEND"):
            return
        if left < 0:
            raise UntrustedImageError(f"its text fields hold more than {max_chars} characters (the limit)", 413)
        i += 12 + length


def read_untrusted_infotext(data: bytes, max_pixels: int, max_chars: int) -> tuple[str | None, dict]:
    """(infotext, the other text fields) of a client's image, without decoding a single pixel:
    the size is checked from the header against ``max_pixels`` first, and text longer than
    ``max_chars`` is refused before anything parses it (a bomb costs at most one header read)."""
    import warnings

    if data[:8] == PNG_SIGNATURE:
        _png_text_within(data, max_chars)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=INFO_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise UntrustedImageError(f"image too large: {e}", 413) from None
        except Exception:  # noqa: BLE001 - a malformed header can raise nearly anything
            raise UntrustedImageError("not a readable PNG, JPEG or WebP image") from None
    w, h = img.size
    if w * h > max_pixels:
        raise UntrustedImageError(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}", 413)
    try:
        text = _infotext_of(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block is the client's input
        raise UntrustedImageError("its EXIF block is not readable") from None
    others = {k: v for k, v in img.info.items()
              if k != "parameters" and isinstance(k, str) and isinstance(v, str)}
    total = len(text or "") + sum(len(k) + len(v) for k, v in others.items())
    if total > max_chars:
        raise UntrustedImageError(f"its text fields hold {total} characters; the limit is {max_chars}", 413)
    return text, others


VERSION_TAG = f"diffusionapi {__version__}"


# ---------------------------------------------------------------------- reading infotext back
# A1111 treats the last line as the parameters line only when it holds at least this many
# "Key: value" pairs; otherwise it is part of the prompt.
_MIN_PARAM_PAIRS = 3
_NEGATIVE = "Negative prompt:"
_SIZE_KEYS = ("Size", "Hires resize")


def _param_pairs(line: str) -> list[tuple[str, str]]:
    """'Key: value, Key: "quoted, value", ...' -> pairs; quoted values are JSON strings.
    Linear in the line's length: the next ':' and ',' are searched for again only once the
    scan has passed them (a line of 100k commas before one colon is one pass, not 100k)."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(line)
    colon = comma = -1

    def next_colon(at: int) -> int:
        nonlocal colon
        if colon != n and colon < at:
            found = line.find(":", at)
            colon = n if found < 0 else found
        return colon

    def next_comma(at: int) -> int:
        nonlocal comma
        if comma != n and comma < at:
            found = line.find(",", at)
            comma = n if found < 0 else found
        return comma

    while i < n:
        while i < n and line[i] in " ,":
            i += 1
        c_at = next_colon(i)
        if c_at >= n:
            break
        k_at = next_comma(i)
        if k_at < c_at:  # a segment without a key: not a pair
            i = k_at + 1
            continue
        key = line[i:c_at].strip()
        i = c_at + 1
        while i < n and line[i] == " ":
            i += 1
        if i < n and line[i] == '"':
            j = i + 1
            while j < n and line[j] != '"':
                j += 2 if line[j] == "\\" else 1
            raw = line[i:j + 1]
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw.strip('"')
            i = j + 1
            end = next_comma(i)
            i = n if end >= n else end + 1
        else:
            end = next_comma(i)
            value = line[i:end].strip()
            i = end + 1
        if key and all(c.isalnum() or c in " _-/()+." for c in key):
            pairs.append((key, value))
    return pairs


def parse_infotext(text: str) -> dict:
    """AUTOMATIC1111's "parameters" text -> its items: "Prompt", "Negative prompt" and every
    "Key: value" of the last line as strings ("Size: 512x768" also gives "Size-1"/"Size-2")."""
    lines = (text or "").strip().replace("\r\n", "\n").split("\n")
    pairs = _param_pairs(lines[-1]) if lines else []
    if len(pairs) >= _MIN_PARAM_PAIRS:
        lines = lines[:-1]
    else:
        pairs = []
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if negative or line.startswith(_NEGATIVE):
            negative.append(line.removeprefix(_NEGATIVE).lstrip() if not negative else line)
        else:
            prompt.append(line)
    items: dict = {"Prompt": "\n".join(prompt).strip(), "Negative prompt": "\n".join(negative).strip()}
    for key, value in pairs:
        items[key] = value
        if key in _SIZE_KEYS:
            w, sep, h = value.partition("x")
            if sep and w.strip().isdigit() and h.strip().isdigit():
                items[f"{key}-1"], items[f"{key}-2"] = w.strip(), h.strip()
    return items


# A1111's "Schedule type:" labels -> our scheduler_type ("Automatic": the sampler's own).
_SCHEDULE_TYPES = {"normal": "default", "uniform": "default", "karras": "karras", "exponential": "exponential",
                   "ddim": "ddim", "pndm": "pndm", "simple": "simple", "sgm uniform": "sgm_uniform", "beta": "beta",
                   "kl optimal": "kl_optimal"}


def _number(value, kind):
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return int(v) if kind is int and v.is_integer() else (v if kind is float else None)


def infotext_parameters(items: dict) -> dict:
    """Parsed infotext items -> the native request fields that reproduce the image
    (only those the text states; the rest keep their defaults)."""
    out: dict = {"prompt": items.get("Prompt", ""), "negative_prompt": items.get("Negative prompt", "")}
    simple = {"Steps": ("steps", int), "CFG scale": ("cfg_scale", float), "Seed": ("seed", int),
              "Size-1": ("width", int), "Size-2": ("height", int), "Clip skip": ("clip_skip", int),
              # Forge's Flux guidance and the CFG rescale phi
              "Distilled CFG Scale": ("distilled_cfg_scale", float), "RescaleCFG": ("cfg_rescale", float)}
    for key, (field, kind) in simple.items():
        v = _number(items.get(key), kind)
        if v is not None:
            out[field] = v
    if items.get("Sampler"):
        out["sampler_name"] = items["Sampler"]
    schedule = _SCHEDULE_TYPES.get(str(items.get("Schedule type", "")).strip().casefold())
    if schedule:
        out["scheduler_type"] = schedule
    if items.get("Model"):
        out["model"] = items["Model"]
    modules = [items[f"Module {i}"] for i in range(1, 9) if items.get(f"Module {i}")]
    if modules:  # Forge's component files (text encoders, VAE)
        out["modules"] = modules
    if items.get("Refiner"):
        out["refiner_checkpoint"] = items["Refiner"]
        switch = _number(items.get("Refiner switch at"), float)
        if switch is not None:
            out["refiner_switch_at"] = switch
    strength = _number(items.get("Denoising strength"), float)
    if any(k in items for k in ("Hires upscale", "Hires steps", "Hires upscaler", "Hires resize-1")):
        hires: dict = {"enabled": True}
        scale = _number(items.get("Hires upscale"), float)
        if scale is None and "width" in out and _number(items.get("Hires resize-1"), int):
            scale = _number(items["Hires resize-1"], int) / out["width"]
        if scale is not None:
            hires["scale"] = scale
        # A1111 leaves "Hires steps" out when the second pass runs as many steps as the first.
        steps = _number(items.get("Hires steps"), int) or out.get("steps")
        if steps:
            hires["steps"] = steps
        if items.get("Hires upscaler"):
            hires["upscaler"] = items["Hires upscaler"]
        if strength is not None:
            hires["denoising_strength"] = strength
        out["hires"] = hires
    elif strength is not None:
        out["denoising_strength"] = strength  # img2img
    return out
