"""Contract tests: the exact requests (method, path, headers, body) that Open WebUI, SillyTavern,
LibreChat, Dify and text-generation-webui send to an A1111 server, as their sources build them,
replayed against this service; each test checks what that client reads back.

Sources (read through the project's search tool; paths as in /work/shared/a1111-clients.md):
OW = open-webui backend/open_webui/routers/images.py, ST = SillyTavern src/endpoints/stable-diffusion.js
(+ public/scripts/extensions/stable-diffusion/index.js for the body), LC = LibreChat
api/app/clients/tools/structured/StableDiffusion.js, DF = dify .../stablediffusion/tools/stable_diffusion.py,
TG = text-generation-webui extensions/sd_api_pictures/script.py. Only values that are user settings in
those clients (size, steps, model) are set small for the tiny test models.
"""
from __future__ import annotations

import base64
import copy
import io
import json

import httpx
import pytest
from PIL import Image

from .conftest import LiveServer, make_settings


@pytest.fixture(scope="module")
def server(model_store, tmp_path_factory):
    with LiveServer(make_settings(model_store, tmp_path_factory.mktemp("clients-work"))) as s:
        yield s


@pytest.fixture(scope="module")
def auth_server(model_store, tmp_path_factory):
    settings = make_settings(model_store, tmp_path_factory.mktemp("clients-auth"), api_auth="webui:pass")
    with LiveServer(settings) as s:
        yield s


def png(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    return img


def basic(value) -> str:
    return "Basic " + base64.b64encode(str(value).encode()).decode()


# ---------------------------------------------------------------------- Open WebUI
def open_webui_generate(url: str, api_auth: str | None):
    """OW: get_image_model -> set_image_model (GET options, POST the dict back) -> txt2img."""
    auth = "" if api_auth is None else basic(api_auth)  # get_automatic1111_api_auth
    headers = {"authorization": auth}
    models = httpx.get(f"{url}/sdapi/v1/sd-models", headers=headers).json()
    listed = [{"id": m["title"], "name": m["model_name"]} for m in models]  # get_models
    target = next(m["id"] for m in listed if m["name"] == "tiny-sdxl")
    options = httpx.get(f"{url}/sdapi/v1/options", headers=headers).json()
    if target != options["sd_model_checkpoint"]:
        options["sd_model_checkpoint"] = target
        httpx.post(f"{url}/sdapi/v1/options", json=options, headers=headers).raise_for_status()
    assert httpx.get(f"{url}/sdapi/v1/options", headers=headers).json()["sd_model_checkpoint"] == target
    data = {"prompt": "a castle", "batch_size": 1, "width": 64, "height": 64, "steps": 3,
            "negative_prompt": "fog"}
    res = httpx.post(f"{url}/sdapi/v1/txt2img", json=data, headers=headers, timeout=120).json()
    for image in res["images"]:  # get_image_data: no comma -> plain base64 PNG
        assert "," not in image and png(image).size == (64, 64)
    assert json.loads(res["info"])["sd_model_name"] == "tiny-sdxl"
    # put the shared model back for the other tests
    options["sd_model_checkpoint"] = next(m["id"] for m in listed if m["name"] == "tiny-sd15")
    httpx.post(f"{url}/sdapi/v1/options", json=options, headers=headers).raise_for_status()


def test_open_webui(server):
    open_webui_generate(server.url, api_auth=None)  # sends "authorization: " (empty): ignored


def test_open_webui_with_api_auth(auth_server):
    open_webui_generate(auth_server.url, api_auth="webui:pass")
    r = httpx.get(f"{auth_server.url}/sdapi/v1/options", headers={"authorization": ""})
    assert r.status_code == 401  # OW's "Verify URL" button shows the failure


# ---------------------------------------------------------------------- SillyTavern
ST_DEFAULTS = dict(sampler="DDIM", scheduler="normal", steps=20, scale=7, width=512, height=512,
                   hr_upscaler="Latent", hr_scale=2.0, denoising_strength=0.7, hr_second_pass_steps=0,
                   clip_skip=1, seed=-1, restore_faces=False, enable_hr=False)


def sillytavern_body(url, auth, **user):
    s = {**ST_DEFAULTS, **user}
    body = {"url": url, "prompt": "a cozy tavern", "negative_prompt": "lowres",
            "sampler_name": s["sampler"], "scheduler": s["scheduler"], "steps": s["steps"],
            "cfg_scale": s["scale"], "width": s["width"], "height": s["height"],
            "restore_faces": s["restore_faces"], "enable_hr": s["enable_hr"], "hr_upscaler": s["hr_upscaler"],
            "hr_scale": s["hr_scale"], "denoising_strength": s["denoising_strength"],
            "hr_second_pass_steps": s["hr_second_pass_steps"],
            "override_settings": {"CLIP_stop_at_last_layers": s["clip_skip"]},
            "override_settings_restore_afterwards": True, "clip_skip": s["clip_skip"],
            "save_images": True, "send_images": True, "do_not_save_grid": False, "do_not_save_samples": False}
    if auth is not None:  # JSON.stringify drops undefined
        body["auth"] = auth
    if s["seed"] >= 0:
        body["seed"] = s["seed"]
    return body


def sillytavern_session(url: str, auth):
    """The server-side calls ST makes: ping, lists, set-model (then polls progress), generate."""
    h = {"Authorization": basic(auth)}  # getBasicAuthHeader: `${auth}` -> "undefined" when unset
    assert httpx.get(f"{url}/sdapi/v1/options", headers=h).is_success  # /ping
    upscalers = [x["name"] for x in httpx.get(f"{url}/sdapi/v1/upscalers", headers=h).json()]
    latent = [x["name"] for x in httpx.get(f"{url}/sdapi/v1/latent-upscale-modes", headers=h).json()]
    upscalers[1:1] = latent  # "0 = None, then Latent Upscalers, then Upscalers"
    assert upscalers[0] == "None" and upscalers[1] == "Latent"
    vaes = [httpx.get(f"{url}/sdapi/v1/{p}", headers=h) for p in ("sd-vae", "sd-modules")]
    assert any(r.is_success and isinstance(r.json(), list) for r in vaes)
    assert "DDIM" in [x["name"] for x in httpx.get(f"{url}/sdapi/v1/samplers", headers=h).json()]
    assert "normal" in [x["name"] for x in httpx.get(f"{url}/sdapi/v1/schedulers", headers=h).json()]
    models = [{"value": x["title"], "text": x["title"]}
              for x in httpx.get(f"{url}/sdapi/v1/sd-models", headers=h).json()]
    current = httpx.get(f"{url}/sdapi/v1/options", headers=h).json()["sd_model_checkpoint"]  # /get-model
    assert current in [m["value"] for m in models]
    r = httpx.post(f"{url}/sdapi/v1/options", content=json.dumps({"sd_model_checkpoint": current}),
                   headers={"Content-Type": "application/json", **h})
    assert r.is_success
    for _ in range(10):  # set-model waits until the server is idle
        state = httpx.get(f"{url}/sdapi/v1/progress", headers=h).json()
        if state["progress"] == 0.0 and state["state"]["job_count"] == 0:
            break
    else:
        pytest.fail("never idle")
    options = httpx.get(f"{url}/sdapi/v1/options", headers=h).json()  # /generate: Forge check
    assert "forge_preset" not in options
    body = sillytavern_body(url, auth, steps=3, width=64, height=64)
    result = httpx.post(f"{url}/sdapi/v1/txt2img", content=json.dumps(body),
                        headers={"Content-Type": "application/json", **h}, timeout=120)
    assert result.is_success, result.text
    return result.json()


def test_sillytavern(server):
    data = sillytavern_session(server.url, auth=None)  # auth never set: "Basic dW5kZWZpbmVk"
    assert png(data["images"][0]).size == (64, 64)  # { format: 'png', data: data.images[0] }
    info = json.loads(data["info"])
    assert info["sampler_name"] == "DDIM" and "Sampler: DDIM" in info["infotexts"][0]


def test_sillytavern_with_auth(auth_server):
    data = sillytavern_session(auth_server.url, auth="webui:pass")
    assert png(data["images"][0]).size == (64, 64)
    r = httpx.get(f"{auth_server.url}/sdapi/v1/options", headers={"Authorization": basic(None)})
    assert r.status_code == 401


def test_sillytavern_interrupt_when_its_caller_leaves(server):
    # request.socket.on('close') -> POST /interrupt with only the auth header
    r = httpx.post(f"{server.url}/sdapi/v1/interrupt", headers={"Authorization": basic(None)})
    assert r.status_code == 200


# ---------------------------------------------------------------------- LibreChat
@pytest.mark.slow  # ~15 s of polling as LibreChat does; the full suite runs it
def test_librechat(server):
    payload = {"prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "cfg_scale": 4.5, "steps": 22,
               "width": 1024, "height": 1024}  # hard-coded in StableDiffusion.js
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", content=json.dumps(payload), timeout=600,
                   headers={"Accept": "application/json, text/plain, */*", "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    data = r.json()
    image = data["images"][0]
    buffer = base64.b64decode(image.split(",", 1)[0])
    info = json.loads(data["info"])
    assert Image.open(io.BytesIO(buffer)).size == (info["width"], info["height"]) == (1024, 1024)
    assert isinstance(info["seed"], int)
    generation_info = info["infotexts"][0].split("\n").pop()
    assert generation_info.startswith("Steps: 22,") and f"Seed: {info['seed']}" in generation_info


# ---------------------------------------------------------------------- Dify
DRAW_TEXT_OPTIONS = {
    "prompt": "", "negative_prompt": "", "seed": -1, "subseed": -1, "subseed_strength": 0,
    "seed_resize_from_h": -1, "sampler_index": "DPM++ SDE Karras", "seed_resize_from_w": -1, "batch_size": 1,
    "n_iter": 1, "steps": 10, "cfg_scale": 7, "width": 1024, "height": 1024, "restore_faces": False,
    "do_not_save_samples": False, "do_not_save_grid": False, "eta": 0, "denoising_strength": 0,
    "s_min_uncond": 0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 0, "override_settings": {},
    "override_settings_restore_afterwards": True, "refiner_switch_at": 0, "disable_extra_networks": False,
    "comments": {}, "enable_hr": False, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2,
    "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0, "hr_prompt": "", "hr_negative_prompt": "",
    "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {},
}


def dify_tool(base_url: str, model: str, *, width=64, height=64, steps=2, image: bytes | None = None):
    # validate_models: the model list by model_name (also its health check)
    models = [d["model_name"] for d in httpx.get(f"{base_url}/sdapi/v1/sd-models", timeout=10).json()]
    assert model in models
    # set model: httpx post(url, data=json.dumps(...)) -> a JSON body with no Content-Type
    r = httpx.post(f"{base_url}/sdapi/v1/options", content=json.dumps({"sd_model_checkpoint": model}))
    assert r.status_code == 200, r.text
    if image is None:
        draw = copy.deepcopy(DRAW_TEXT_OPTIONS)
        draw.update(prompt="a cat", width=width, height=height, steps=steps, negative_prompt="")
        draw["override_settings"]["sd_model_checkpoint"] = model
        path = "txt2img"
    else:
        draw = {"init_images": [base64.b64encode(image).decode("utf-8")], "prompt": "a cat", "negative_prompt": "",
                "denoising_strength": 0.9, "width": width, "height": height, "cfg_scale": 7,
                "sampler_name": "Euler a", "restore_faces": False, "steps": steps,
                "script_args": ["outpainting mk2"], "override_settings": {"sd_model_checkpoint": model}}
        path = "img2img"
    r = httpx.post(f"{base_url}/sdapi/v1/{path}", content=json.dumps(draw), timeout=120)
    assert r.request.headers.get("content-type") is None
    assert r.status_code == 200, r.text
    return base64.b64decode(r.json()["images"][0]), json.loads(r.json()["info"])


def test_dify(server):
    blob, info = dify_tool(server.url, "tiny-sd15")  # create_blob_message(mime_type image/png)
    assert Image.open(io.BytesIO(blob)).format == "PNG"
    assert info["sampler_name"] == "DPM++ SDE" and "Schedule type: Karras" in info["infotexts"][0]


def test_dify_img2img(server):
    src = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(src, format="PNG")
    blob, _ = dify_tool(server.url, "tiny-sd15", image=src.getvalue())
    assert Image.open(io.BytesIO(blob)).size == (64, 64)


# ---------------------------------------------------------------------- text-generation-webui
def test_text_generation_webui(server):
    address = server.url
    httpx.get(f"{address}/sdapi/v1/sd-models").raise_for_status()  # SD_api_address_update
    models = httpx.get(f"{address}/sdapi/v1/sd-models")  # get_checkpoints
    options = httpx.get(f"{address}/sdapi/v1/options").json()
    checkpoint_list = [result["title"] for result in models.json()]
    assert options["sd_model_checkpoint"] in checkpoint_list
    httpx.post(f"{address}/sdapi/v1/options", json={"sd_model_checkpoint": checkpoint_list[0]})  # load_checkpoint
    samplers = [x["name"] for x in httpx.get(f"{address}/sdapi/v1/samplers").json()]
    assert "DPM++ 2M" in samplers
    # give_VRAM_priority: requests.post(..., json='') -> the body is the JSON string ""
    for path in ("unload-checkpoint", "reload-checkpoint"):
        httpx.post(f"{address}/sdapi/v1/{path}", json="").raise_for_status()
    description = "a girl reading"
    payload = {
        "prompt": "(Masterpiece:1.1), detailed, intricate, colorful" + f"({description}:1)",
        "seed": -1, "sampler_name": "DPM++ 2M", "enable_hr": False, "hr_scale": "1.0",
        "hr_upscaler": "ESRGAN_4x", "denoising_strength": 0.61, "steps": 3, "cfg_scale": 7,
        "width": 64, "height": 64, "restore_faces": False, "override_settings_restore_afterwards": True,
        "negative_prompt": "(worst quality, low quality:1.3)",
    }
    response = httpx.post(f"{address}/sdapi/v1/txt2img", json=payload, timeout=120)
    response.raise_for_status()
    for img_str in response.json()["images"]:
        image = Image.open(io.BytesIO(base64.b64decode(img_str.split(",", 1)[0])))
        image.thumbnail((300, 300))
        assert image.size == (64, 64)
