"""End to end through HTTP on the tiny models: the seed's contract."""
from __future__ import annotations

import base64
import io
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusionapi.engine.samplers import SAMPLER_NAMES, SCHEDULER_TYPES
from diffusionapi.images import read_infotext

from .conftest import HUB_NAME, SMALL


def pixels(resp: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(resp["image"]))))


def test_hello(server):
    assert server.client.get("/hello").json() == {"ok": True}


def test_models_and_aliases(server):
    body = server.client.get("/models").json()
    assert body["status"] == "success"
    by_name = {m["name"]: m for m in body["models"]}
    assert by_name["tiny-sd15"]["label"] == "Tiny SD"
    assert by_name["tiny-sd15"]["type"] == "sd15" and by_name["tiny-sd15"]["format"] == "diffusers"
    assert by_name["tiny-sdxl"]["type"] == "sdxl"
    assert by_name["tiny-sdxl-refiner"]["type"] == "sdxl-refiner"
    assert by_name[HUB_NAME] == {"name": HUB_NAME, "label": "tiny-hub-sd15", "type": "sd15", "format": "hub-cache",
                                 "family": "sd15", "prediction": "epsilon", "ztsnr": False}
    aliases = server.client.get("/models/aliases").json()
    assert aliases["status"] == "success" and isinstance(aliases["message"], str)
    assert {m["name"] for m in aliases["models"]} == set(by_name)


def test_sampling_methods_in_seed_order(server):
    body = server.client.get("/sampling_methods").json()
    assert body["sampling_methods"] == list(SAMPLER_NAMES)
    assert body["scheduler_types"] == ["default", "karras", "exponential", "ddim", "pndm", "simple", "sgm_uniform",
                                       "beta", "kl_optimal"] == list(SCHEDULER_TYPES)


def test_upscalers_lists_latent(server):
    ups = server.client.get("/upscalers").json()["upscalers"]
    assert ups[0] == {"name": "Latent", "path": "internal"}


def test_loras_empty(server):
    assert server.client.get("/loras").json() == {"status": "success", "loras": []}


def test_job_life_cycle_and_deletion(server):
    job = server.submit(**SMALL, model="tiny-sd15", seed=5)
    uuid.UUID(job)
    seen = []
    done = server.wait(job, on_poll=lambda b: seen.append((b["state"], b["current_phase"], b["progress"])))
    assert done["status"] == "success" and done["state"] == "done" and done["current_phase"] == "done"
    assert done["progress"] == 100
    progresses = [p for _, _, p in seen]
    assert progresses == sorted(progresses)
    assert {s for s, _, _ in seen} <= {"queued", "processing", "done"}
    assert done["seed"] == 5 and done["width"] == 64 and done["height"] == 64
    assert done["file_type"] == "jpg" and done["jpeg_quality"] == 85
    assert done["generation_time_sec"] > 0 and done["memory_before_mb"] > 0 and done["memory_after_mb"] > 0
    p = done["payload"]
    assert p["model"] == "tiny-sd15" and p["steps"] == 4 and p["sampler_name"] == "DPM++ 2M Karras"
    assert p["scheduler_type"] == "karras" and p["cfg_scale"] == 7.0 and p["negative_prompt"] == ""
    assert p["refiner_switch_at"] == 0.8 and p["loras"] == [] and p["fileType"] == "jpg"
    assert not done["image"].startswith("data:")
    assert done["output_path"].endswith(f"{job}.jpg")
    out = Path(server.settings.outputs_dir) / f"{job}.jpg"
    assert out.read_bytes() == base64.b64decode(done["image"])
    # After the final read: files gone, 404, image kept.
    assert not list(Path(server.settings.queue_dir).glob(f"{job}*"))
    r = server.client.get(f"/queue/{job}")
    assert r.status_code == 404 and r.json()["status"] == "error"
    assert out.exists()


def test_unknown_job_is_404(server):
    r = server.client.get(f"/queue/{uuid.uuid4()}")
    assert r.status_code == 404 and r.json()["status"] == "error" and r.json()["error"]
    assert server.client.get("/queue/../../etc/passwd").status_code == 404


def test_determinism_and_random_seed(server):
    a = server.run(**SMALL, model="tiny-sd15", seed=1234)
    b = server.run(**SMALL, model="tiny-sd15", seed=1234)
    c = server.run(**SMALL, model="tiny-sd15", seed=99, fileType="png")
    d = server.run(**SMALL, model="tiny-sd15", seed=99, fileType="png")
    assert np.array_equal(pixels(c), pixels(d))
    assert a["image"] == b["image"]
    assert not np.array_equal(pixels(c), pixels(server.run(**SMALL, model="tiny-sd15", seed=100, fileType="png")))
    for seed in (None, -1):
        payload = dict(SMALL, model="tiny-sd15", fileType="png")
        if seed is not None:
            payload["seed"] = seed
        r = server.run(**payload)
        assert 0 <= r["seed"] < 2**32 and r["payload"]["seed"] == r["seed"]
        again = server.run(**dict(payload, seed=r["seed"]))
        assert np.array_equal(pixels(r), pixels(again))


def test_png_and_jpg_metadata(server):
    png = server.run(**SMALL, model="Tiny SD", seed=7, fileType="png", negative_prompt="blurry, bad",
                     cfg_scale=5.5, sampler_name="Euler a")
    info = read_infotext(base64.b64decode(png["image"]))
    assert png["infotext"] == info
    lines = info.split("\n")
    assert lines[0] == "a tiny test"
    assert lines[1] == "Negative prompt: blurry, bad"
    assert lines[2].startswith("Steps: 4, Sampler: Euler a, Schedule type: Karras, CFG scale: 5.5, Seed: 7, "
                               "Size: 64x64, Model: tiny-sd15")
    assert "Version: diffusionapi" in lines[2]
    jpg = server.run(**SMALL, model="tiny-sd15", seed=8, fileType="jpg", jpeg_quality=40,
                     sampler_name="DPM++ 2M Karras")
    info = read_infotext(base64.b64decode(jpg["image"]))
    assert info.startswith("a tiny test\nSteps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 8")
    img = Image.open(io.BytesIO(base64.b64decode(jpg["image"])))
    assert img.format == "JPEG" and jpg["jpeg_quality"] == 40


def test_file_type_spellings(server):
    r = server.run(**dict(SMALL, fileType="JPEG"))
    assert r["file_type"] == "jpg" and r["payload"]["fileType"] == "jpg" and r["output_path"].endswith(".jpg")
    assert server.run(**dict(SMALL, fileType="PNG"))["file_type"] == "png"


def test_size_rounded_to_multiple_of_8(server):
    r = server.run(prompt="x", width=61, height=75, steps=2, model="tiny-sd15", fileType="png")
    assert (r["width"], r["height"]) == (64, 72) == Image.open(io.BytesIO(base64.b64decode(r["image"]))).size


def test_model_resolution_by_label_and_hub_repo(server):
    for name in ("tiny sd", "TINY_SD", "tiny-hub-sd15", HUB_NAME):
        r = server.client.post("/txt2img", json=dict(SMALL, model=name))
        assert r.status_code == 200, (name, r.text)
        server.wait(r.json()["job_id"])


def test_model_omitted_uses_default(server):
    r = server.run(prompt="default model", width=64, height=64, steps=2)
    assert r["payload"]["model"] == "tiny-sd15"


@pytest.mark.parametrize("payload, field, needle", [
    ({"width": 64}, "prompt", "Field required"),
    ({"prompt": "x", "model": "no-such-model"}, "model", "valid choices"),
    ({"prompt": "x", "model": "../tiny-sd15"}, "model", "unknown model"),
    ({"prompt": "x", "model": "/etc/passwd"}, "model", "unknown model"),
    ({"prompt": "x", "sampler_name": "Euler b"}, "sampler_name", "Euler a"),
    ({"prompt": "x", "scheduler_type": "weird"}, "scheduler_type", "karras"),
    ({"prompt": "x", "sampler_name": "DDIM", "scheduler_type": "karras"}, "scheduler_type", "valid choices"),
    ({"prompt": "x", "steps": 0}, "steps", ""),
    ({"prompt": "x", "steps": 100000}, "steps", "<="),
    ({"prompt": "x", "width": 100000}, "width", "<="),
    ({"prompt": "x", "height": 100000}, "height", "<="),
    ({"prompt": "x", "width": "wide"}, "width", ""),
    ({"prompt": "x", "fileType": "gif"}, "fileType", ""),
    ({"prompt": "x", "jpeg_quality": 101}, "jpeg_quality", ""),
    ({"prompt": "x", "cfg_scale": -1}, "cfg_scale", ""),
    ({"prompt": "x", "loras": ["missing-lora"]}, "loras[0]", "unknown LoRA"),
    ({"prompt": "x", "loras": [{"name": "../../etc/passwd", "scale": 1}]}, "loras[0]", "unknown LoRA"),
    ({"prompt": "x", "hires": {"enabled": True, "upscaler": "Nope"}}, "hires.upscaler", "Latent (bicubic)"),
    ({"prompt": "x", "refiner_checkpoint": "tiny-sdxl-refiner"}, "refiner_checkpoint", "SDXL base"),
    ({"prompt": "x", "model": "tiny-sdxl", "refiner_checkpoint": "nope"}, "refiner_checkpoint", "unknown model"),
    ({"prompt": "x", "model": "tiny-sdxl-refiner"}, "model", "refiner"),
    ({"prompt": "x", "model": "tiny-sdxl", "refiner_checkpoint": "tiny-sd15"}, "refiner_checkpoint", "not an SDXL"),
    ({"prompt": "x", "seed": -5}, "seed", ""),
])
def test_bad_input_is_4xx_naming_the_field(server, payload, field, needle):
    before = server.client.get("/queue").json()["jobs"]
    r = server.client.post("/txt2img", json=payload)
    assert 400 <= r.status_code < 500, r.text
    body = r.json()
    assert body["status"] == "error"
    assert field in body["error"], body
    assert needle in body["error"], body
    assert server.client.get("/queue").json()["jobs"] == before  # nothing queued


def test_malformed_json_is_4xx(server):
    r = server.client.post("/txt2img", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["status"] == "error"


def test_failing_job_then_succeeding_job(server, tmp_path):
    # A real trigger: the model's UNet weights vanish between submit and run.
    import shutil

    models = Path(server.settings.models_dir)
    broken = models / "tiny-broken"
    shutil.copytree(models / "tiny-sd15", broken)
    blocker, job = server.submit_held(**SMALL, model="tiny-broken")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 10)
    try:
        server.wait(blocker)
        failed = server.wait(job)
    finally:
        shutil.rmtree(broken)
    assert failed["state"] == "error" and failed["status"] == "error"
    assert "tiny-broken" in failed["error"]
    ok = server.run(**SMALL, model="tiny-sd15")
    assert ok["state"] == "done"


def test_second_job_reloads_nothing(server):
    server.run(**SMALL, model="tiny-sd15")
    loads = server.engine.cache.loads
    again = server.run(**SMALL, model="tiny-sd15", seed=3)
    assert again["state"] == "done"
    assert server.engine.cache.loads == loads and again["load_time_sec"] == 0  # resident: no load time
    other = server.run(**SMALL, model="tiny-sdxl")  # cache size 1: a switch loads, and frees the other
    assert server.engine.cache.loads == loads + 1 and other["load_time_sec"] > 0
    assert server.engine.cache.resident() == ["tiny-sdxl"]
    back = server.run(**SMALL, model="tiny-sd15")
    assert server.engine.cache.loads == loads + 2 and back["load_time_sec"] > 0
    assert server.engine.cache.resident() == ["tiny-sd15"]
    server.run(**SMALL, model="tiny-sdxl", refiner_checkpoint="tiny-sdxl-refiner")
    assert sorted(server.engine.cache.resident()) == ["tiny-sdxl", "tiny-sdxl-refiner"]  # a job's models
    server.run(**SMALL, model="tiny-sd15")
    assert server.engine.cache.resident() == ["tiny-sd15"]


def test_long_poll_returns_when_done(server):
    import time

    job = server.submit(**dict(SMALL, steps=20, width=128, height=128))
    t0 = time.time()
    r = server.client.get(f"/queue/{job}", params={"wait": 60}, timeout=90)
    # Done, and answered before the wait ran out (not a speed bound: the job takes seconds).
    assert r.json()["state"] == "done" and time.time() - t0 < 60
    assert server.client.get(f"/queue/{job}", params={"wait": 1}).status_code == 404
    r = server.client.get(f"/queue/{job}", params={"wait": 99})
    assert r.status_code == 422


def test_unknown_fields_are_ignored_and_named(server):
    r = server.client.post("/txt2img", json=dict(SMALL, sampler="Euler", restore_faces=True))
    assert r.status_code == 200 and r.json()["ignored_fields"] == ["restore_faces", "sampler"]
    done = server.wait(r.json()["job_id"])
    assert "sampler" not in done["payload"] and done["payload"]["sampler_name"] == "DPM++ 2M Karras"
    r = server.client.post("/txt2img", json=SMALL)
    assert "ignored_fields" not in r.json()
    server.wait(r.json()["job_id"])
