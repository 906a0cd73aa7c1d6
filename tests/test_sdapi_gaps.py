"""`/sdapi` behaviour that real clients hit (issue 28): the hires upscalers `/sdapi/v1/upscalers`
lists, A1111's error body on a 401, and the headers SillyTavern and Open WebUI send."""
from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from .conftest import LiveServer, make_settings


@pytest.fixture(scope="module")
def server(model_store, tmp_path_factory):
    with LiveServer(make_settings(model_store, tmp_path_factory.mktemp("gaps-work"))) as s:
        yield s


@pytest.fixture(scope="module")
def auth_server(model_store, tmp_path_factory):
    with LiveServer(make_settings(model_store, tmp_path_factory.mktemp("gaps-auth"), api_auth="webui:pass")) as s:
        yield s


@pytest.mark.parametrize("upscaler", ["Lanczos", "Nearest", "None"])
def test_hires_with_the_builtin_upscalers_makes_the_hires_size(server, upscaler):
    # SillyTavern offers /upscalers' names (item 0 is "None") as its hires upscaler.
    listed = [u["name"] for u in httpx.get(f"{server.url}/sdapi/v1/upscalers").json()]
    assert upscaler in listed
    body = {"prompt": "a hill", "width": 64, "height": 48, "steps": 2, "enable_hr": True, "hr_scale": 2,
            "hr_upscaler": upscaler, "hr_second_pass_steps": 2, "denoising_strength": 0.5}
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    im = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert im.size == (128, 96)
    # A1111's "None" is a Lanczos resize of the decoded first pass (images.resize_image).
    assert f"Hires upscaler: {'Lanczos' if upscaler == 'None' else upscaler}" in im.info["parameters"]


def test_native_hires_takes_the_resizes_and_names_them_when_unknown(server):
    job = server.run(prompt="x", width=64, height=64, steps=2, fileType="png",
                     hires={"enabled": True, "scale": 1.5, "upscaler": "nearest", "steps": 2})
    assert job["state"] == "done" and (job["width"], job["height"]) == (96, 96)
    r = server.client.post("/txt2img", json={"prompt": "x", "hires": {"enabled": True, "upscaler": "Bicubic"}})
    assert r.status_code == 422 and "Lanczos" in r.json()["error"]


def raw_get(server, path: str, authorization: str) -> tuple[int, dict]:
    """A GET with the Authorization header's bytes exactly as given (httpx refuses a trailing
    space, which is what `Basic ${""}` gives in SillyTavern and Open WebUI)."""
    import json
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {authorization}\r\n"
                     "Connection: close\r\n\r\n".encode())
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), {"headers": headers, "json": json.loads(body) if body.strip() else None}


def test_401_has_detail_and_basic_challenge(auth_server):
    for header in ("Basic ", "Basic", "", "Basic dW5kZWZpbmVk"):  # empty (Open WebUI, SillyTavern), "undefined"
        status, r = raw_get(auth_server, "/sdapi/v1/options", header)
        assert status == 401, header
        assert r["json"]["detail"] == "Incorrect username or password"
        assert r["headers"]["www-authenticate"] == "Basic"
    r = httpx.get(f"{auth_server.url}/sdapi/v1/no-such-endpoint", headers={"Authorization": "Basic d2VidWk6cGFzcw=="})
    assert r.status_code == 404 and "detail" in r.json()


def test_empty_basic_header_is_ignored_without_auth(server):
    # SillyTavern and Open WebUI send "Basic " with nothing after it when no credentials are set.
    status, r = raw_get(server, "/sdapi/v1/options", "Basic ")
    assert status == 200 and "sd_model_checkpoint" in r["json"]


def test_interrupt_answers_with_the_last_denoised_state(server):
    # A1111: /interrupt stops the sampler, which returns its last denoised latents; they are
    # decoded and answered like a finished job (SillyTavern interrupts when its caller leaves).
    import threading
    import time

    answer = {}

    def generate():
        body = {"prompt": "a long job", "width": 64, "height": 64, "steps": 50, "seed": 3}
        answer["r"] = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=300)

    t = threading.Thread(target=generate)
    t.start()
    deadline = time.time() + 120
    while time.time() < deadline:  # until the sampler has run a few steps
        state = httpx.get(f"{server.url}/sdapi/v1/progress").json()
        if 0.05 <= state["progress"] < 0.9:
            break
        time.sleep(0.05)
    assert httpx.post(f"{server.url}/sdapi/v1/interrupt").status_code == 200
    t.join(300)
    r = answer["r"]
    assert r.status_code == 200, r.text
    images = r.json()["images"]
    assert len(images) == 1
    im = Image.open(io.BytesIO(base64.b64decode(images[0])))
    assert im.size == (64, 64) and "Steps: 50" in im.info["parameters"]
    # not the finished image: the same request run to its end makes another one
    full = httpx.post(f"{server.url}/sdapi/v1/txt2img", timeout=300,
                      json={"prompt": "a long job", "width": 64, "height": 64, "steps": 50, "seed": 3})
    assert full.json()["images"][0] != images[0]
