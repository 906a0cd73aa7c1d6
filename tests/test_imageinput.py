"""Request images: decoding with checks, resize modes, masks, crop regions, compositing."""
from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from diffusionapi import imageinput as ii


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.full((h, w, 1), 128, np.float32)], axis=2)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def png_with_size(w: int, h: int) -> bytes:
    """A valid 1x1 PNG whose header claims w x h (the shape of a decompression bomb)."""
    data = bytearray(encode(Image.new("RGB", (1, 1))))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", w, h)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


# ---------------------------------------------------------------------------- decoding

class TestDecode:
    def test_plain_base64_data_url_whitespace_and_missing_padding(self):
        raw = encode(gradient(10, 6))
        text = b64(raw)
        assert ii.decode_base64(text, "init_image") == raw
        assert ii.decode_base64("data:image/png;base64," + text, "init_image") == raw
        wrapped = "\n".join(text[i:i + 60] for i in range(0, len(text), 60))
        assert ii.decode_base64("  " + wrapped + "\n", "init_image") == raw
        assert ii.decode_base64(text.rstrip("="), "init_image") == raw

    @pytest.mark.parametrize("text, why", [
        ("", "empty"), ("   ", "empty"), ("not base64 at all!", "not valid base64"),
        ("data:image/png,rawbytes", "base64 encoded"),
    ])
    def test_bad_base64_names_the_field(self, text, why):
        with pytest.raises(ii.ImageInputError) as e:
            ii.decode_base64(text, "mask")
        assert e.value.field == "mask" and why in e.value.message and e.value.status == 422

    @pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
    def test_png_jpeg_webp_decode(self, fmt):
        im = ii.decode_image(b64(encode(gradient(24, 16), fmt)), "init_image", 10_000)
        assert im.size == (24, 16)

    def test_other_formats_and_garbage_are_422(self):
        for data in (encode(gradient(8, 8), "GIF"), encode(gradient(8, 8), "BMP"), b"hello world" * 10):
            with pytest.raises(ii.ImageInputError) as e:
                ii.open_image(data, "init_image", 10_000)
            assert e.value.status == 422 and "not a PNG, JPEG or WebP" in e.value.message

    @pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
    def test_truncated_image_is_422(self, fmt):
        data = encode(gradient(64, 64), fmt)
        with pytest.raises(ii.ImageInputError) as e:
            ii.open_image(data[: len(data) // 2], "init_image", 100_000)
        assert e.value.status == 422 and "truncated or corrupt" in e.value.message

    def test_over_the_pixel_limit_is_413_from_the_header(self):
        # 6000 x 5000 claimed by a 70-byte file: refused before any pixel is decoded.
        bomb = png_with_size(6000, 5000)
        assert len(bomb) < 200
        with pytest.raises(ii.ImageInputError) as e:
            ii.open_image(bomb, "init_image", 4_000_000)
        assert e.value.status == 413 and "6000x5000" in e.value.message and "4000000" in e.value.message

    def test_pillow_bomb_guard_is_413_even_under_a_generous_limit(self):
        bomb = png_with_size(30_000, 30_000)  # > 2x Pillow's MAX_IMAGE_PIXELS: DecompressionBombError
        with pytest.raises(ii.ImageInputError) as e:
            ii.open_image(bomb, "init_image", 10**12)
        assert e.value.status == 413 and "decompression bomb" in e.value.message
        warn_size = png_with_size(10_000, 10_000)  # between 1x and 2x: Pillow's warning, made an error
        with pytest.raises(ii.ImageInputError) as e:
            ii.open_image(warn_size, "init_image", 10**12)
        assert e.value.status == 413

    def test_exif_orientation_is_applied(self):
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise to display
        data = encode(gradient(40, 16), "JPEG", exif=exif)
        assert ii.open_image(data, "init_image", 10_000).size == (16, 40)

    def test_flatten_puts_transparency_on_white(self):
        im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
        im.putpixel((0, 0), (255, 0, 0, 255))
        flat = ii.flatten(im)
        assert flat.mode == "RGB" and flat.getpixel((0, 0)) == (255, 0, 0) and flat.getpixel((3, 3)) == (255, 255, 255)
        assert ii.flatten(Image.new("L", (2, 2), 7)).getpixel((1, 1)) == (7, 7, 7)


# ---------------------------------------------------------------------------- resizing

SIZES = [(64, 64), (64, 32), (32, 64), (40, 24)]


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("src", [(50, 50), (100, 30), (30, 100)])
@pytest.mark.parametrize("target", SIZES)
def test_every_resize_mode_gives_the_requested_size(mode, src, target):
    assert ii.resize_image(mode, gradient(*src), *target).size == target


def test_crop_and_resize_cuts_the_sides_and_resize_and_fill_stretches_the_edges():
    # Left third red, middle green, right third blue; 96x32 into 32x32.
    arr = np.zeros((32, 96, 3), np.uint8)
    arr[:, :32, 0] = 255
    arr[:, 32:64, 1] = 255
    arr[:, 64:, 2] = 255
    im = Image.fromarray(arr)
    cropped = np.asarray(ii.resize_image(1, im, 32, 32))
    assert (cropped[:, :, 1] > 200).all()  # only the middle (green) third is left
    filled = np.asarray(ii.resize_image(2, im, 32, 32)).astype(int)
    # The image shrinks to 32x10, centred; the bands above and below repeat its edge rows.
    assert filled.shape == (32, 32, 3)
    assert np.abs(filled[0] - filled[10]).max() <= 2 and np.abs(filled[31] - filled[20]).max() <= 2
    assert filled[0, 2, 0] > 200 and filled[0, 29, 2] > 200


def test_just_resize_ignores_the_aspect_ratio():
    out = np.asarray(ii.resize_image(0, gradient(100, 20), 20, 100))
    assert out[0, 0, 0] < 20 and out[0, -1, 0] > 230  # the whole width survives


# ---------------------------------------------------------------------------- masks

def test_binary_mask_uses_alpha_when_drawn_as_transparency():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((2, 3), (0, 0, 0, 200))
    rgba.putpixel((4, 4), (0, 0, 0, 100))  # under half: not masked
    m = np.asarray(ii.binary_mask(rgba))
    assert m[3, 2] == 255 and m[4, 4] == 0 and m.sum() == 255
    opaque = Image.new("RGBA", (8, 8), (255, 255, 255, 255))
    assert np.asarray(ii.binary_mask(opaque)).min() == 255  # opaque RGBA: its brightness
    assert ii.binary_mask(Image.new("RGB", (8, 8), (255, 255, 255))).mode == "L"


def test_blur_spreads_as_far_as_its_kernel_symmetrically():
    empty = Image.new("L", (41, 41), 0)
    assert ii.blur_mask(empty, 0) is empty
    assert np.asarray(ii.blur_mask(empty, 4)).max() == 0
    big = Image.new("L", (41, 41), 0)
    big.paste(255, (15, 15, 26, 26))
    out = np.asarray(ii.blur_mask(big, 2)).astype(int)
    reach = int(2.5 * 2 + 0.5)  # 5 pixels past the edge, no further
    assert out[20, 25 + reach] > 0 and out[20, 25 + reach + 1] == 0
    # Symmetric about the centre (x and y are rounded in turn, so not exactly under transposition).
    assert (out == out[::-1, ::-1]).all() and np.abs(out - out.T).max() <= 1
    assert out[20, 20] == 255 and 0 < out[20, 25] < 255


def test_prepare_mask_inverts_before_blurring():
    m = Image.new("L", (16, 16), 0)
    m.paste(255, (0, 0, 8, 16))
    inv = np.asarray(ii.prepare_mask(m, invert=True, blur=0))
    assert inv[:, :8].max() == 0 and inv[:, 8:].min() == 255


def test_crop_region_and_its_expansion_to_the_processing_ratio():
    m = Image.new("L", (512, 512), 0)
    m.paste(255, (200, 100, 328, 132))  # a 128x32 stroke
    assert ii.crop_region(m, 0) == (200, 100, 328, 132)
    assert ii.crop_region(m, 8) == (192, 92, 336, 140)
    assert ii.crop_region(Image.new("L", (8, 8)), 4) is None
    # As the processing size is square, the region becomes 128x128 around the stroke.
    assert ii.expand_crop_region((200, 100, 328, 132), 512, 512, 512, 512) == (200, 52, 328, 180)
    # Near an edge it shifts inside instead of crossing it.
    assert ii.expand_crop_region((0, 0, 128, 32), 512, 512, 512, 512) == (0, 0, 128, 128)
    assert ii.expand_crop_region((0, 480, 128, 512), 512, 512, 512, 512) == (0, 384, 128, 512)
    # Tall region, wide processing: grows in x.
    assert ii.expand_crop_region((100, 0, 110, 40), 64, 32, 512, 512) == (65, 0, 145, 40)


def test_fill_keeps_unmasked_pixels_and_smears_colour_into_the_hole():
    im = Image.new("RGB", (64, 64), (200, 40, 40))
    im.paste((0, 0, 0), (24, 24, 40, 40))
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (24, 24, 40, 40))
    out = np.asarray(ii.fill_masked(im, m)).astype(int)
    assert (out[:20, :20] == [200, 40, 40]).all()
    assert np.abs(out[32, 32] - [200, 40, 40]).max() <= 3  # the black hole now has the surrounding red


def test_latent_mask_is_rounded_at_latent_resolution():
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (0, 0, 32, 64))
    lm = ii.latent_mask(m, 8, 8)
    assert lm.shape == (8, 8) and set(np.unique(lm)) == {0.0, 1.0}
    assert lm[:, :4].min() == 1 and lm[:, 4:].max() == 0


# ---------------------------------------------------------------------------- one job's input

def random_result(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def square_mask(w, h, box):
    m = Image.new("L", (w, h), 0)
    m.paste(255, box)
    return m


def test_prepare_without_mask_resizes_and_mode_3_keeps_the_size():
    init = gradient(80, 48)
    p = ii.prepare(init, 64, 64, resize_mode=1)
    assert p.image.size == (64, 64) and p.mask is None and p.output_size == (64, 64)
    assert p.composite(random_result(64, 64)).size == (64, 64)
    p3 = ii.prepare(init, 64, 64, resize_mode=3)
    assert p3.image.size == (80, 48) and p3.conditioning_image().size == (64, 64)


@pytest.mark.parametrize("blur", [0, 4])
def test_inpaint_composite_keeps_every_pixel_outside_the_blurred_mask(blur):
    init = gradient(64, 64)
    mask = square_mask(64, 64, (16, 16, 40, 48))
    p = ii.prepare(init, 64, 64, mask=mask, mask_blur=blur)
    out = np.asarray(p.composite(random_result(64, 64)))
    blurred = np.asarray(ii.blur_mask(mask, blur))
    outside = blurred == 0
    assert outside.sum() > 1500
    assert (out[outside] == np.asarray(init)[outside]).all()
    inside = np.asarray(mask) == 255
    assert (out[inside] != np.asarray(init)[inside]).any()
    # Where the blurred mask is past half, the result shows unmixed.
    strong = blurred >= 128
    assert (out[strong] == np.asarray(random_result(64, 64))[strong]).all()


def test_inverted_mask_repaints_the_outside():
    init = gradient(64, 64)
    mask = square_mask(64, 64, (16, 16, 48, 48))
    p = ii.prepare(init, 64, 64, mask=mask, mask_blur=0, inpainting_mask_invert=True)
    out = np.asarray(p.composite(random_result(64, 64)))
    assert (out[16:48, 16:48] == np.asarray(init)[16:48, 16:48]).all()
    assert (out[:8] != np.asarray(init)[:8]).any()


def test_only_masked_works_on_the_region_and_pastes_back_at_the_init_size():
    init = gradient(128, 96)
    mask = square_mask(128, 96, (70, 40, 90, 56))
    p = ii.prepare(init, 64, 64, mask=mask, mask_blur=2, inpaint_full_res=True, inpaint_full_res_padding=8)
    assert p.full_res and p.image.size == (64, 64) and p.mask.size == (64, 64)
    x, y, w, h = p.paste_box
    # 20x16 grown by the blur (5) and the padding (8) on each side is 46x42, squared to the 64x64 ratio.
    assert (x, y, w, h) == (57, 25, 46, 46)
    out = p.composite(random_result(64, 64))
    assert out.size == (128, 96) == p.output_size
    blurred = np.asarray(ii.blur_mask(mask, 2))
    outside = blurred == 0
    assert (np.asarray(out)[outside] == np.asarray(init)[outside]).all()
    assert p.info() == {"Inpaint area": "Only masked"}


def test_only_masked_with_an_empty_mask_is_plain_img2img():
    p = ii.prepare(gradient(64, 64), 64, 64, mask=Image.new("L", (64, 64)), inpaint_full_res=True)
    assert p.mask is None and p.overlay is None


def test_mask_of_another_size_is_refused():
    with pytest.raises(ii.ImageInputError) as e:
        ii.prepare(gradient(64, 64), 64, 64, mask=Image.new("L", (32, 64)))
    assert e.value.field == "mask" and "32x64" in e.value.message


@pytest.mark.parametrize("fill", [0, 2, 3])
def test_fill_modes_other_than_original_smear_the_masked_area(fill):
    init = Image.new("RGB", (64, 64), (10, 200, 10))
    init.paste((255, 0, 255), (24, 24, 40, 40))
    p = ii.prepare(init, 64, 64, mask=square_mask(64, 64, (24, 24, 40, 40)), mask_blur=0, inpainting_fill=fill)
    assert np.abs(np.asarray(p.image).astype(int)[32, 32] - [10, 200, 10]).max() <= 3
    assert p.info()["Masked content"] == ii.FILL_MODES[fill]
    original = ii.prepare(init, 64, 64, mask=square_mask(64, 64, (24, 24, 40, 40)), mask_blur=0)
    assert np.asarray(original.image)[32, 32].tolist() == [255, 0, 255] and original.info() == {}
