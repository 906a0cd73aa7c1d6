"""OpenAI's Images API (`/v1`) driven by the real `openai` SDK (a pinned test dependency)
against a real uvicorn server on tiny models, plus a replay of Open WebUI's openai-engine edit
request as its source builds it (open-webui backend/open_webui/routers/images.py, image_edits:
an aiohttp multipart form with model, prompt, n, size, response_format as text fields and the
image as `image` -- or `image[]` for several -- with a uuid file name and the data URL's type).
"""
from __future__ import annotations

import base64
import io
import json
import uuid

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from .conftest import LiveServer, make_settings

KEY = "sk-test-key"
FAST = {"steps": 3}  # an extension field: keeps the tiny jobs short where quality is not the point


@pytest.fixture(scope="module")
def server(model_store, tmp_path_factory):
    settings = make_settings(model_store, tmp_path_factory.mktemp("openai-work"), api_key=KEY, max_queued_jobs=2)
    with LiveServer(settings) as s:
        s.client.headers["Authorization"] = f"Bearer {KEY}"  # the native helpers (submit, wait)
        yield s


@pytest.fixture(scope="module")
def client(server):
    # No retries: a 429/503 must reach the test, not be retried after Retry-After.
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


def image_of(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def png_bytes(im: Image.Image) -> bytes:
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()


def pattern(w=64, h=64, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")


# ---------------------------------------------------------------------- generations
def test_generate_two_images_b64(client):
    res = client.images.generate(model="tiny-sd15", prompt="a red apple", n=2, size="64x64",
                                 extra_body=FAST)
    assert len(res.data) == 2 and res.created > 0
    images = [image_of(d.b64_json) for d in res.data]
    assert all(im.format == "PNG" and im.size == (64, 64) for im in images)
    assert images[0].tobytes() != images[1].tobytes()  # two seeds, two images
    assert res.size == "64x64" and res.output_format == "png"


def test_quality_maps_to_steps_and_labels_and_openai_ids_name_models(client):
    from diffusionapi.api.openai.protocol import QUALITY_STEPS

    res = client.images.generate(model="Tiny SD", prompt="a pear", size="64x64", quality="low")
    info = image_of(res.data[0].b64_json).info["parameters"]
    assert f"Steps: {QUALITY_STEPS['low']}," in info and "tiny-sd15" in info
    # OpenAI's own model ids mean the server's default model (clients that hard-code one work).
    res = client.images.generate(model="dall-e-3", prompt="a pear", size="64x64", extra_body=FAST)
    assert "tiny-sd15" in image_of(res.data[0].b64_json).info["parameters"]


@pytest.mark.parametrize("fmt,pil", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats(client, fmt, pil):
    res = client.images.generate(model="tiny-sd15", prompt="a lemon", size="72x48", output_format=fmt,
                                 output_compression=50, extra_body=FAST)
    im = image_of(res.data[0].b64_json)
    assert im.format == pil and im.size == (72, 48)
    assert res.output_format == fmt


def test_url_results_are_served_without_the_key(client, server):
    res = client.images.generate(model="tiny-sd15", prompt="a plum", size="64x64", response_format="url",
                                 output_format="webp", extra_body=FAST)
    url = res.data[0].url
    assert url.startswith(server.url + "/v1/images/results/") and url.endswith(".webp")
    r = httpx.get(url)  # no API key: the unguessable name is the credential
    assert r.status_code == 200 and r.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)
    wrong = httpx.get(url.rsplit("/", 1)[0] + "/" + "A" * 43 + ".webp")
    assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "not_found"


def test_sdxl_auto_size_is_its_trained_size():
    from diffusionapi.api.openai.protocol import parse_size
    from diffusionapi.vocabulary import SDXL, SD15, ModelEntry, ModelFormat

    sdxl = ModelEntry("x", "x", None, SDXL, ModelFormat.DIFFUSERS)
    assert parse_size("auto", sdxl) == (1024, 1024) and parse_size(None, sdxl) == (1024, 1024)
    assert parse_size("1536X864", ModelEntry("y", "y", None, SD15, ModelFormat.DIFFUSERS)) == (1536, 864)


# ---------------------------------------------------------------------- errors
def test_wrong_key_is_an_authentication_error(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as e:
            bad.images.generate(prompt="x")
        assert e.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_unknown_model_is_a_404_naming_it(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(model="no-such-model", prompt="x")
    assert e.value.param == "model" and e.value.code == "model_not_found"
    assert "no-such-model" in e.value.message


def test_too_large_size_is_a_bad_request_naming_size(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="tiny-sd15", prompt="x", size="4096x4096")
    assert e.value.param == "size"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="tiny-sd15", prompt="x", size="huge")
    assert e.value.param == "size"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="tiny-sd15", prompt="x", n=11)
    assert e.value.param == "n"


def test_errors_are_openai_shaped_everywhere(server):
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.get(server.url + "/v1/nothing-here", headers=h)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(server.url + "/v1/images/generations", content="{not json", headers=h)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/images/generations", json={"prompt": "x" * 2_000_000}, headers=h)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_full_queue_is_a_rate_limit_error_with_retry_after(client, server):
    held = [server.submit(prompt="blocker", model="tiny-sd15", width=256, height=256, steps=150) for _ in range(2)]
    try:
        with pytest.raises(openai.RateLimitError) as e:
            client.images.generate(model="tiny-sd15", prompt="x", size="64x64")
        assert int(e.value.response.headers["retry-after"]) > 0
        assert e.value.code == "rate_limit_exceeded"
    finally:
        for job in held:
            server.client.delete(f"/queue/{job}")
        for job in held:
            server.wait(job)


def test_models_list(client):
    ids = [m.id for m in client.models.list()]
    assert "tiny-sd15" in ids and "tiny-sdxl" in ids
    assert "tiny-sdxl-refiner" not in ids  # cannot make an image alone
    assert client.models.retrieve("tiny-sd15").id == "tiny-sd15"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


# ---------------------------------------------------------------------- edits and variations
def test_edit_with_mask_keeps_the_pixels_outside_it(client):
    from diffusionapi.api.openai.protocol import MASK_BLUR

    original = pattern(64, 64, seed=1)
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 24, 64))  # OpenAI's rule: fully transparent = edit here
    res = client.images.edit(model="tiny-sd15", image=("in.png", png_bytes(original), "image/png"),
                             mask=("mask.png", png_bytes(mask), "image/png"), prompt="a blue sky",
                             extra_body=FAST)
    out = np.asarray(image_of(res.data[0].b64_json).convert("RGB")).astype(int)
    src = np.asarray(original).astype(int)
    assert out.shape == src.shape
    seam = int(2.5 * MASK_BLUR + 0.5) + 1
    assert (out[:, 24 + seam:] == src[:, 24 + seam:]).all()  # opaque in the mask: kept exactly
    assert np.abs(out[:, :24 - seam] - src[:, :24 - seam]).mean() > 10  # transparent: redrawn


def test_edit_several_images_and_sizes(client):
    images = [("a.png", png_bytes(pattern(64, 48, seed=2)), "image/png"),
              ("b.png", png_bytes(pattern(32, 32, seed=3)), "image/png")]
    res = client.images.edit(model="tiny-sd15", image=images, prompt="a cat", n=2, extra_body=FAST)
    assert [image_of(d.b64_json).size for d in res.data] == [(64, 48), (64, 48)]  # the first image's size
    res = client.images.edit(model="tiny-sd15", image=images[0], prompt="a cat", size="32x32",
                             output_format="jpeg", extra_body=FAST)
    assert image_of(res.data[0].b64_json).size == (32, 32)


def test_edit_mask_errors(client):
    image = ("in.png", png_bytes(pattern(64, 64)), "image/png")
    with pytest.raises(openai.BadRequestError) as e:  # another size
        client.images.edit(image=image, mask=("m.png", png_bytes(Image.new("RGBA", (32, 32))), "image/png"),
                           prompt="x")
    assert e.value.param == "mask"
    with pytest.raises(openai.BadRequestError) as e:  # no alpha channel
        client.images.edit(image=image, mask=("m.png", png_bytes(Image.new("RGB", (64, 64))), "image/png"),
                           prompt="x")
    assert e.value.param == "mask"


def test_alpha_rule():
    from diffusionapi.api.openai.protocol import alpha_mask

    im = Image.new("RGBA", (4, 1), (9, 9, 9, 255))
    im.putpixel((0, 0), (9, 9, 9, 0))
    im.putpixel((1, 0), (9, 9, 9, 1))  # partly transparent: kept (only alpha 0 is "edit here")
    native = Image.open(io.BytesIO(alpha_mask(im, "mask")))
    assert list(native.getdata()) == [255, 0, 0, 0]  # native masks: white = repaint
    assert alpha_mask(Image.new("RGB", (4, 1)), "mask") is None


def test_create_variation(client):
    res = client.images.create_variation(model="tiny-sd15", image=("v.png", png_bytes(pattern(64, 64)), "image/png"),
                                         n=2, size="64x64")
    assert [image_of(d.b64_json).size for d in res.data] == [(64, 64), (64, 64)]


# ---------------------------------------------------------------------- Open WebUI
def open_webui_edit(url: str, key: str, images: list[str], size="64x64"):
    """OW image_edits with IMAGE_EDIT_ENGINE == 'openai': headers, text fields and files as built there."""
    headers = {"Authorization": f"Bearer {key}"}
    data = {"model": "tiny-sd15", "prompt": "make it autumn", "n": 1, "size": size,
            "response_format": "b64_json"}  # the model does not match IMAGE_URL_RESPONSE_MODELS_REGEX_PATTERN

    def file_item(data_url: str, param_name: str):  # get_image_file_item
        header, encoded = data_url.split(",", 1)
        mime_type = header.split(";")[0].removeprefix("data:") or "image/png"
        return param_name, (f"{uuid.uuid4()}.png", io.BytesIO(base64.b64decode(encoded)), mime_type)

    files = [file_item(images[0], "image")] if len(images) == 1 else [file_item(i, "image[]") for i in images]
    form = {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in data.items()}
    r = httpx.post(f"{url}/v1/images/edits", headers=headers, data=form, files=files, timeout=120)
    r.raise_for_status()
    return [base64.b64decode(item["b64_json"]) for item in r.json()["data"]]  # get_image_data(b64_json)


def test_open_webui_edit_replay(server):
    src = "data:image/png;base64," + base64.b64encode(png_bytes(pattern(64, 64, seed=4))).decode()
    out = open_webui_edit(server.url, KEY, [src])
    assert Image.open(io.BytesIO(out[0])).size == (64, 64)
    out = open_webui_edit(server.url, KEY, [src, src])  # several images: image[]
    assert len(out) == 1


# ---------------------------------------------------------------------- streaming
def test_stream_partial_images_then_completed(client):
    stream = client.images.generate(model="tiny-sd15", prompt="a kite", size="64x64", stream=True,
                                    partial_images=2, output_format="png", extra_body={"steps": 9})
    events = list(stream)
    types = [e.type for e in events]
    assert types[-1] == "image_generation.completed" and types.count("image_generation.completed") == 1
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    assert 1 <= len(partial) <= 2, types
    assert [e.partial_image_index for e in partial] == list(range(len(partial)))
    assert all(image_of(e.b64_json).format == "PNG" for e in partial)
    done = events[-1]
    assert image_of(done.b64_json).size == (64, 64) and done.size == "64x64" and done.usage is not None


def test_stream_edit_events(client):
    stream = client.images.edit(model="tiny-sd15", image=("in.png", png_bytes(pattern()), "image/png"),
                                prompt="x", stream=True, partial_images=1, extra_body=FAST)
    types = [e.type for e in stream]
    assert types[-1] == "image_edit.completed"


def test_service_errors_in_openai_terms():
    from diffusionapi.api.openai.errors import from_service_error
    from diffusionapi.errors import BackendUnavailable, QueueFull, RequestError

    e = from_service_error(BackendUnavailable())
    assert (e.status, e.type, e.headers["Retry-After"]) == (503, "server_error", "30")
    e = from_service_error(QueueFull())
    assert (e.status, e.code) == (429, "rate_limit_exceeded") and e.headers["Retry-After"]
    e = from_service_error(RequestError("height", "must be <= 2048"))
    assert (e.status, e.param, e.body()["error"]["message"]) == (400, "size", "size: must be <= 2048")
    from diffusionapi.errors import RateLimited

    e = from_service_error(RateLimited("requests_per_minute", 2, 3.2, "too many requests"))  # a key's quota
    assert (e.status, e.code, e.headers["Retry-After"]) == (429, "rate_limit_exceeded", "4")
    e = from_service_error(RequestError("init_image", "too big", status=413))
    assert (e.status, e.param, e.code) == (413, "image", "request_too_large")


def test_edit_as_json_with_image_references(server):
    h = {"Authorization": f"Bearer {KEY}"}
    url = "data:image/png;base64," + base64.b64encode(png_bytes(pattern(48, 48, seed=5))).decode()
    r = httpx.post(server.url + "/v1/images/edits", headers=h, timeout=120,
                   json={"model": "tiny-sd15", "prompt": "x", "images": [{"image_url": url}], **FAST})
    assert r.status_code == 200, r.text
    assert image_of(r.json()["data"][0]["b64_json"]).size == (48, 48)
    r = httpx.post(server.url + "/v1/images/edits", headers=h,
                   json={"prompt": "x", "images": [{"image_url": "http://169.254.169.254/x.png"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"  # never fetched
