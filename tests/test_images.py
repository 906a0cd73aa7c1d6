"""Encoding and A1111 infotext."""
from __future__ import annotations

import io

from PIL import Image

from diffusionapi.images import EXIF_IFD, USER_COMMENT, build_infotext, encode_image, read_infotext


def test_infotext_layout_and_quoting():
    text = build_infotext("a cat, sitting", "blurry", {"Steps": 20, "Sampler": "DPM++ 2M", "CFG scale": 7.0,
                                                      "Seed": 5, "Lora hashes": "a: 1, b: 2", "Empty": None})
    assert text == ('a cat, sitting\nNegative prompt: blurry\n'
                    'Steps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 5, Lora hashes: "a: 1, b: 2"')
    assert build_infotext("p", "", {"Steps": 1}) == "p\nSteps: 1"


def test_png_text_chunk_and_jpeg_exif_usercomment():
    img = Image.new("RGB", (16, 16), (10, 20, 30))
    info = "prompt ü\nSteps: 1, Seed: 2"
    png = encode_image(img, "png", 85, info)
    assert Image.open(io.BytesIO(png)).info["parameters"] == info
    jpg = encode_image(img, "jpg", 50, info)
    raw = Image.open(io.BytesIO(jpg)).getexif().get_ifd(EXIF_IFD)[USER_COMMENT]
    assert raw.startswith(b"UNICODE\x00") and raw[8:].decode("utf-16-be") == info  # A1111 / piexif layout
    assert read_infotext(png) == read_infotext(jpg) == info


def test_jpeg_comment_reads_back_the_way_a1111_reads_it():
    # A1111's PNG Info: piexif.load + piexif.helper.UserComment.load (needs the UNDEFINED tag type).
    import piexif
    import piexif.helper

    info = "portrait, ü\nNegative prompt: x\nSteps: 2, Seed: 3"
    jpg = encode_image(Image.new("RGB", (8, 8)), "jpg", 90, info)
    exif = piexif.load(Image.open(io.BytesIO(jpg)).info["exif"])
    assert piexif.helper.UserComment.load(exif["Exif"][piexif.ExifIFD.UserComment]) == info


def test_jpeg_quality_is_applied():
    img = Image.effect_noise((64, 64), 80).convert("RGB")
    assert len(encode_image(img, "jpg", 20, "x")) < len(encode_image(img, "jpg", 95, "x"))
