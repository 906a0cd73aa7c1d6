"""Images that requests bring: decoding with checks, A1111's resize modes, inpainting masks.

Everything here is plain Pillow/numpy work done before or after the GPU: the API decodes
and checks an image before a job is recorded (so bad input is a 4xx and nothing is queued),
and the engine calls :func:`prepare` / :meth:`Prepared.composite` around the sampler.

Behaviour follows AUTOMATIC1111's img2img (its ``images.resize_image``, ``masking`` and the
``StableDiffusionProcessingImg2Img.init`` mask handling), re-implemented here:

* resize modes: 0 just resize, 1 crop and resize (cover, centre crop), 2 resize and fill
  (fit, the bands filled by stretching the edge rows/columns), 3 just resize in latent space
  (the pixel-side image keeps its size; the engine interpolates the latents);
* masks: white = repaint; an RGBA mask with real transparency uses its alpha channel; invert,
  then a separable Gaussian blur of ``mask_blur`` (kernel radius ``int(2.5 * blur + 0.5)``);
* "only masked" (``inpaint_full_res``): the blurred mask's bounding box plus padding, widened to
  the processing aspect ratio, is cut out, generated at width x height and pasted back;
* the result is composited over the original outside the mask, so those pixels are unchanged.
"""
from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps

# Formats a request may carry (Pillow's names) and how errors spell them.
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
RESIZE_MODES = {0: "Just resize", 1: "Crop and resize", 2: "Resize and fill", 3: "Just resize (latent upscale)"}
FILL_MODES = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
BACKGROUND = (255, 255, 255)  # transparent init images are flattened onto white, as in A1111
LANCZOS = Image.Resampling.LANCZOS
# Upscalers that are plain resampling (``/upscale``'s "Lanczos" and "Nearest", as A1111 names them).
PIXEL_RESIZERS = {"Lanczos": LANCZOS, "Nearest": Image.Resampling.NEAREST}


class ImageInputError(ValueError):
    """A request image that cannot be used; ``status`` is 413 for too big, else 422."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


# ---------------------------------------------------------------------------- decoding

def decode_base64(text: str, field: str) -> bytes:
    """Bytes of a base64 string or a ``data:<mime>;base64,`` URL (whitespace and missing
    padding tolerated, as browsers and A1111 clients produce both)."""
    if not isinstance(text, str) or not text.strip():
        raise ImageInputError(field, "empty; expected a base64 PNG, JPEG or WebP image")
    s = text.strip()
    if s[:5].lower() == "data:":
        header, sep, s = s.partition(",")
        if not sep or ";base64" not in header.lower():
            raise ImageInputError(field, "a data URL must be base64 encoded (data:image/png;base64,...)")
    s = "".join(s.split())
    s += "=" * (-len(s) % 4)
    try:
        data = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(field, "not valid base64") from None
    if not data:
        raise ImageInputError(field, "empty; expected a base64 PNG, JPEG or WebP image")
    return data


def open_image(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Decode a PNG, JPEG or WebP fully, refusing oversized ones from the header alone
    (a decompression bomb is a few kilobytes that would expand to gigabytes)."""
    with warnings.catch_warnings():
        # Pillow warns above its MAX_IMAGE_PIXELS and raises above twice that; both mean "too big".
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageInputError(field, f"image too large (decompression bomb guard): {e}", 413) from None
        except Image.UnidentifiedImageError:
            raise ImageInputError(field, "not a PNG, JPEG or WebP image") from None
        except Exception as e:  # noqa: BLE001 - a malformed header can raise nearly anything
            raise ImageInputError(field, f"truncated or corrupt image: {_reason(e)}") from None
        w, h = im.size
        if w < 1 or h < 1:
            raise ImageInputError(field, f"image has no pixels ({w}x{h})")
        if w * h > max_pixels:
            raise ImageInputError(field, f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}", 413)
        try:
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageInputError(field, f"image too large (decompression bomb guard): {e}", 413) from None
        except Exception as e:  # noqa: BLE001 - truncated data: OSError, SyntaxError, ValueError, ...
            raise ImageInputError(field, f"truncated or corrupt {im.format} image: {_reason(e)}") from None
    fmt = im.format
    try:
        im = ImageOps.exif_transpose(im)  # phones store rotated JPEGs; A1111 turns them upright too
    except Exception:  # noqa: BLE001 - a broken EXIF block is not worth refusing the image for
        pass
    im.format = fmt  # a transposed copy forgets it; echoes describe the image by it
    return im


def decode_image(text: str, field: str, max_pixels: int) -> Image.Image:
    return open_image(decode_base64(text, field), field, max_pixels)


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]


def has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def flatten(im: Image.Image, background=BACKGROUND) -> Image.Image:
    """RGB; transparent parts composited onto ``background``."""
    if not has_alpha(im):
        return im.convert("RGB")
    rgba = im.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, background + (255,))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


# ---------------------------------------------------------------------------- resizing

def resize_image(mode: int, im: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's resize modes 0-2 in pixel space (mode 3 is a plain resize here; its latent
    interpolation is the engine's)."""
    if mode in (0, 3):
        return im.resize((width, height), LANCZOS)
    target_ratio, src_ratio = width / height, im.width / im.height
    if mode == 1:  # cover, then cut the overflow from both sides
        fit_width = target_ratio > src_ratio
    elif mode == 2:  # fit inside, then stretch the edges over the empty bands
        fit_width = target_ratio < src_ratio
    else:
        raise ValueError(f"unknown resize mode {mode}")
    if fit_width:
        sw, sh = width, max(im.height * width // im.width, 1)
    else:
        sw, sh = max(im.width * height // im.height, 1), height
    resized = im.resize((sw, sh), LANCZOS)
    out = Image.new(im.mode, (width, height))
    x0, y0 = width // 2 - sw // 2, height // 2 - sh // 2
    out.paste(resized, (x0, y0))
    if mode == 2:
        if sh < height:   # bands above and below
            top, bottom = y0, height - (y0 + sh)
            if top > 0:
                out.paste(resized.crop((0, 0, sw, 1)).resize((width, top)), (0, 0))
            if bottom > 0:
                out.paste(resized.crop((0, sh - 1, sw, sh)).resize((width, bottom)), (0, y0 + sh))
        elif sw < width:  # bands left and right
            left, right = x0, width - (x0 + sw)
            if left > 0:
                out.paste(resized.crop((0, 0, 1, sh)).resize((left, height)), (0, 0))
            if right > 0:
                out.paste(resized.crop((sw - 1, 0, sw, sh)).resize((right, height)), (x0 + sw, 0))
    return out


# ---------------------------------------------------------------------------- masks

def binary_mask(im: Image.Image) -> Image.Image:
    """The mask as 8-bit grey: white = repaint. A mask drawn as transparency (RGBA whose alpha
    is not all opaque) counts its alpha channel, thresholded at half, as A1111 does."""
    if has_alpha(im) and im.mode != "RGBA":
        im = im.convert("RGBA")
    if im.mode == "RGBA" and im.getextrema()[3] != (255, 255):
        return im.getchannel("A").point(lambda v: 255 if v > 128 else 0)
    return im.convert("L")


def blur_mask(mask: Image.Image, radius: float) -> Image.Image:
    """Separable Gaussian blur (sigma = ``radius``), kernel radius ``int(2.5 * radius + 0.5)``,
    reflected borders; each pass rounds to 8 bits as an 8-bit image filter does."""
    if radius <= 0:
        return mask
    from scipy.ndimage import gaussian_filter1d

    r = int(2.5 * radius + 0.5)
    arr = np.asarray(mask, dtype=np.float32)
    for axis in (1, 0):
        arr = gaussian_filter1d(arr, radius, axis=axis, mode="mirror", radius=r)
        arr = np.clip(np.rint(arr), 0, 255)
    return Image.fromarray(arr.astype(np.uint8), "L")


def prepare_mask(mask: Image.Image, *, invert: bool, blur: float) -> Image.Image:
    m = binary_mask(mask)
    if invert:
        m = ImageOps.invert(m)
    return blur_mask(m, blur)


def crop_region(mask: Image.Image, pad: int) -> tuple[int, int, int, int] | None:
    """Bounding box (x1, y1, x2, y2) of the mask's non-zero pixels grown by ``pad`` and clipped
    to the image; None for an empty mask."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height)


def expand_crop_region(region, proc_w: int, proc_h: int, img_w: int, img_h: int) -> tuple[int, int, int, int]:
    """Widen ``region`` along one axis to the processing aspect ratio, centred, shifted back
    inside the image where it would cross an edge (and clipped if the image is too small)."""
    x1, y1, x2, y2 = region

    def grow(lo: int, hi: int, want: float, limit: int) -> tuple[int, int]:
        extra = int(want - (hi - lo))
        lo -= extra // 2
        hi += extra - extra // 2
        if hi > limit:
            lo -= hi - limit
            hi = limit
        if lo < 0:
            hi -= lo
            lo = 0
        return lo, min(hi, limit)

    if (x2 - x1) / (y2 - y1) > proc_w / proc_h:
        y1, y2 = grow(y1, y2, (x2 - x1) * proc_h / proc_w, img_h)
    else:
        x1, x2 = grow(x1, x2, (y2 - y1) * proc_w / proc_h, img_w)
    return x1, y1, x2, y2


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Inpainting fill 0: replace the masked part by colours smeared in from around it
    (blurs of the unmasked pixels at falling radii, layered, finest last)."""
    keep = ImageOps.invert(mask.convert("L"))
    src = image.convert("RGBA")
    src.putalpha(keep)
    premultiplied = src.convert("RGBa")  # blurring premultiplied colour keeps masked pixels out
    out = Image.new("RGBA", image.size)
    for radius, times in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        layer = premultiplied.filter(ImageFilter.GaussianBlur(radius)) if radius else premultiplied
        layer = layer.convert("RGBA")
        for _ in range(times):
            out.alpha_composite(layer)
    return out.convert("RGB")


# ---------------------------------------------------------------------------- one job's input

@dataclass
class Prepared:
    """What the engine needs from an init image (and mask), and how to put the result back.

    ``image`` is what the VAE encodes (``width`` x ``height``, except for resize mode 3 where
    it keeps the init image's size and the latents are interpolated). ``mask`` (or None) is
    the repaint mask at ``width`` x ``height``: the latent mask and an inpainting model's
    conditioning come from it. ``overlay`` is the original with alpha = 255 - mask, at the
    output size; ``paste_box`` (x, y, w, h) is where an "only masked" result goes.
    """
    image: Image.Image
    mask: Image.Image | None
    width: int
    height: int
    overlay: Image.Image | None = None
    paste_box: tuple[int, int, int, int] | None = None
    fill: int = 1
    full_res: bool = False

    @property
    def output_size(self) -> tuple[int, int]:
        return self.overlay.size if self.overlay is not None else (self.width, self.height)

    def conditioning_image(self) -> Image.Image:
        """The image an inpainting model sees (width x height)."""
        if self.image.size != (self.width, self.height):
            return self.image.resize((self.width, self.height), LANCZOS)
        return self.image

    def composite(self, result: Image.Image) -> Image.Image:
        """The generated ``result`` (width x height) put back over the original: pasted into its
        box for "only masked", then the original laid over everything outside the mask."""
        if self.overlay is None:
            return result
        if self.paste_box is not None:
            x, y, w, h = self.paste_box
            canvas = Image.new("RGBA", self.overlay.size)
            canvas.paste(resize_image(1, result.convert("RGB"), w, h), (x, y))
        else:
            canvas = result.convert("RGBA")
        canvas.alpha_composite(self.overlay)
        return canvas.convert("RGB")

    def info(self) -> dict:
        """Infotext items A1111 writes for these choices."""
        items: dict = {}
        if self.mask is not None:
            if self.full_res:
                items["Inpaint area"] = "Only masked"
            if self.fill in (0, 2, 3):
                items["Masked content"] = FILL_MODES[self.fill]
        return items


def prepare(init: Image.Image, width: int, height: int, *, resize_mode: int = 0, mask: Image.Image | None = None,
            mask_blur: float = 4, inpainting_fill: int = 1, inpaint_full_res: bool = False,
            inpaint_full_res_padding: int = 32, inpainting_mask_invert: bool = False) -> Prepared:
    """Resize / crop the init image and its mask for a width x height generation."""
    image = flatten(init)
    if mask is None:
        resized = image if resize_mode == 3 else resize_image(resize_mode, image, width, height)
        return Prepared(resized, None, width, height)
    if mask.size != image.size:
        raise ImageInputError("mask", f"mask is {mask.width}x{mask.height} but init_image is "
                                      f"{image.width}x{image.height}; they must be the same size")
    m = prepare_mask(mask, invert=inpainting_mask_invert, blur=mask_blur)

    if inpaint_full_res:
        region = crop_region(m, inpaint_full_res_padding)
        if region is None:  # nothing to repaint "only masked": plain img2img, as A1111 falls back
            return prepare(init, width, height, resize_mode=resize_mode)
        x1, y1, x2, y2 = expand_crop_region(region, width, height, image.width, image.height)
        overlay = _overlay(image, m)
        work_mask = resize_image(2, m.crop((x1, y1, x2, y2)), width, height)
        work = resize_image(2, image.crop((x1, y1, x2, y2)), width, height)
        if inpainting_fill != 1:  # A1111 smears colours in for every mode but "original"
            work = fill_masked(work, work_mask)
        return Prepared(work, work_mask, width, height, overlay, (x1, y1, x2 - x1, y2 - y1),
                        inpainting_fill, True)

    # The latent-upscale mode stretches latents, so its mask is stretched the same way.
    pixel_mode = 0 if resize_mode == 3 else resize_mode
    work_mask = resize_image(pixel_mode, m, width, height)
    resized = resize_image(pixel_mode, image, width, height)
    # Blurred edges count double for the overlay: the original shows through only where the
    # mask is under half, so the repainted part is not faded into the original.
    overlay_mask = Image.fromarray(np.clip(np.asarray(work_mask, dtype=np.uint16) * 2, 0, 255).astype(np.uint8), "L")
    overlay = _overlay(resized, overlay_mask)
    work = image if resize_mode == 3 else resized
    if inpainting_fill != 1:
        fill_mask = work_mask if work.size == work_mask.size else work_mask.resize(work.size, LANCZOS)
        work = fill_masked(work, fill_mask)
    return Prepared(work, work_mask, width, height, overlay, None, inpainting_fill, False)


def _overlay(image: Image.Image, mask: Image.Image) -> Image.Image:
    over = image.convert("RGBA")
    over.putalpha(ImageOps.invert(mask))
    return over


def latent_mask(mask: Image.Image, latent_w: int, latent_h: int) -> np.ndarray:
    """The repaint mask at latent resolution, rounded to 0/1 (A1111's default "mask round")."""
    small = mask.convert("L").resize((latent_w, latent_h), Image.Resampling.BICUBIC)
    return np.rint(np.asarray(small, dtype=np.float32) / 255.0)


def describe(im: Image.Image) -> str:
    """A short stand-in for an image in a payload echo (the base64 itself stays out)."""
    return f"<{im.format or 'image'} {im.width}x{im.height}>"
