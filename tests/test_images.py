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


# ---------------------------------------------------------------------- parse_infotext
from diffusionapi.images import infotext_parameters, parse_infotext  # noqa: E402


def test_parse_infotext_round_trips_what_build_infotext_writes():
    params = {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.5, "Seed": 42,
              "Size": "512x768", "Model": "my-model", "Lora hashes": "a: 0123, b: 4567", "Version": "x 1"}
    text = build_infotext("a cat, sitting\nsecond line", "blurry, ugly", params)
    items = parse_infotext(text)
    assert items["Prompt"] == "a cat, sitting\nsecond line"
    assert items["Negative prompt"] == "blurry, ugly"
    assert items["Lora hashes"] == "a: 0123, b: 4567"  # quoted value with commas and colons
    assert (items["Size-1"], items["Size-2"], items["CFG scale"], items["Seed"]) == ("512", "768", "7.5", "42")
    native = infotext_parameters(items)
    assert native == {"prompt": "a cat, sitting\nsecond line", "negative_prompt": "blurry, ugly", "steps": 20,
                      "cfg_scale": 7.5, "seed": 42, "width": 512, "height": 768, "sampler_name": "DPM++ 2M",
                      "scheduler_type": "karras", "model": "my-model"}


def test_parse_a1111_infotext_with_hires_and_multiline_negative():
    # As A1111 1.10 writes it (hires with a resize target, no "Hires steps": same as Steps).
    text = ("masterpiece, (cat:1.2) <lora:ink:0.6>\nNegative prompt: lowres,\nbad hands\n"
            "Steps: 25, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5, Seed: 7, Size: 512x512, "
            "Model hash: 6ce0161689, Model: v1-5-pruned, Denoising strength: 0.5, Clip skip: 2, "
            "Hires resize: 1024x1024, Hires upscaler: Latent, Version: v1.10.1")
    items = parse_infotext(text)
    assert items["Prompt"] == "masterpiece, (cat:1.2) <lora:ink:0.6>"
    assert items["Negative prompt"] == "lowres,\nbad hands"
    assert items["Hires resize-1"] == "1024" and items["Model hash"] == "6ce0161689"
    native = infotext_parameters(items)
    assert native["hires"] == {"enabled": True, "scale": 2.0, "steps": 25, "upscaler": "Latent",
                               "denoising_strength": 0.5}
    assert native["clip_skip"] == 2 and "scheduler_type" not in native and native["sampler_name"] == "Euler a"


def test_parse_infotext_without_a_parameters_line_is_all_prompt():
    assert parse_infotext("just a prompt: with a colon") == {"Prompt": "just a prompt: with a colon",
                                                             "Negative prompt": ""}
    assert parse_infotext("") == {"Prompt": "", "Negative prompt": ""}


def test_jpeg_written_by_a1111_through_piexif_is_read():
    import piexif
    import piexif.helper

    info = "a dog\nSteps: 3, Sampler: Euler, CFG scale: 6, Seed: 9, Size: 8x8"
    exif = piexif.dump({"Exif": {piexif.ExifIFD.UserComment: piexif.helper.UserComment.dump(info, encoding="unicode")}})
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG", exif=exif)
    assert read_infotext(buf.getvalue()) == info
    assert infotext_parameters(parse_infotext(read_infotext(buf.getvalue())))["seed"] == 9
