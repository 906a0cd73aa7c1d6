"""Native POST /png-info: what an image carries, as text, A1111 items and native request fields."""
from __future__ import annotations

import base64
import io

from PIL import Image

from diffusionapi.images import build_infotext, encode_image


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_png_and_jpeg_and_data_urls(server):
    text = build_infotext("a boat", "rain", {"Steps": 7, "Sampler": "Euler a", "Schedule type": "Automatic",
                                             "CFG scale": 4.5, "Seed": 12, "Size": "64x32", "Model": "tiny-sd15"})
    for kind in ("png", "jpg"):
        data = encode_image(Image.new("RGB", (64, 32)), kind, 90, text)
        for image in (_b64(data), f"data:image/{kind};base64,{_b64(data)}"):
            r = server.client.post("/png-info", json={"image": image})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["infotext"] == text and body["items"]["Seed"] == "12"
            assert body["parameters"] == {"prompt": "a boat", "negative_prompt": "rain", "steps": 7, "cfg_scale": 4.5,
                                          "seed": 12, "width": 64, "height": 32, "sampler_name": "Euler a",
                                          "model": "tiny-sd15"}


def test_image_without_infotext_and_bad_input(server):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    assert server.client.post("/png-info", json={"image": _b64(buf.getvalue())}).json() == \
        {"status": "success", "infotext": None, "items": {}, "parameters": {}}
    for bad in ("!!!", _b64(b"not an image")):
        r = server.client.post("/png-info", json={"image": bad})
        assert r.status_code == 422 and r.json()["error"].startswith("image: ")
