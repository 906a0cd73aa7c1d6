"""Qwen-Image-Edit and Edit Plus (family qwen-image-edit, issue #25) on tiny random-weight models
built in code (a tiny Qwen2.5-VL encoder with its processor, built in memory): POST /edit and
/sdapi/v1/img2img through HTTP, run by the diffusers pipeline with its own scheduler; compared
with the bare pipeline. Each job encodes its reference at about 1024x1024 (the pipeline's rule),
a few seconds on a CPU: marked slow."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionapi.demo import tiny_qwen_image_edit_pipeline
from diffusionapi.images import read_infotext

from .flow_models import b64_png, new_store, pattern, px, run_posted, serve

pytestmark = pytest.mark.slow

REF_A, REF_B = b64_png(pattern(64, 64, 1)), b64_png(pattern(64, 64, 2))
QWEN = dict(prompt="make it red", steps=2, model="tiny-qwen-edit", fileType="png", width=32, height=32)


@pytest.fixture(scope="module")
def qwen_store(tmp_path_factory):
    root = new_store(tmp_path_factory, "qwen-edit-store")
    tiny_qwen_image_edit_pipeline(0).save_pretrained(root / "models" / "tiny-qwen-edit")
    tiny_qwen_image_edit_pipeline(0, plus=True).save_pretrained(root / "models" / "tiny-qwen-edit-plus")
    return root


@pytest.fixture(scope="module")
def qwen_server(qwen_store, tmp_path_factory):
    yield from serve(qwen_store, tmp_path_factory, "qwen-edit-work", "tiny-qwen-edit")


def edit(server, **body) -> dict:
    return run_posted(server, "/edit", {**QWEN, **body})


def test_listed_and_deterministic_and_the_inputs_change_the_image(qwen_server):
    models = {m["name"]: m for m in qwen_server.client.get("/models").json()["models"]}
    assert models["tiny-qwen-edit"]["family"] == models["tiny-qwen-edit-plus"]["family"] == "qwen-image-edit"
    a = edit(qwen_server, reference_images=[REF_A], seed=3)
    assert np.array_equal(px(a), px(edit(qwen_server, reference_images=[REF_A], seed=3))) and px(a).std() > 0
    assert not np.array_equal(px(a), px(edit(qwen_server, reference_images=[REF_B], seed=3)))
    assert not np.array_equal(px(a), px(edit(qwen_server, reference_images=[REF_A], seed=3, prompt="make it blue")))
    assert a["payload"]["cfg_scale"] == 4.0 and a["payload"]["sampler_name"] == "Euler"
    info = read_infotext(base64.b64decode(a["image"]))
    assert "Sampler: Euler" in info and "Schedule type: Simple" in info and "Model: tiny-qwen-edit" in info


def test_edit_plus_takes_several_references(qwen_server):
    plus = dict(model="tiny-qwen-edit-plus", seed=5)
    one = px(edit(qwen_server, reference_images=[REF_A], **plus))
    assert not np.array_equal(one, px(edit(qwen_server, reference_images=[REF_A, REF_B], **plus)))
    r = qwen_server.client.post("/edit", json={**QWEN, "reference_images": [REF_A, REF_B]})
    assert r.status_code == 422 and "takes one reference image" in r.json()["error"]


def test_equals_the_bare_pipeline(qwen_server, qwen_store):
    from diffusers import QwenImageEditPipeline

    ours = px(edit(qwen_server, reference_images=[REF_A], seed=7, cfg_scale=1.0))
    pipe = QwenImageEditPipeline.from_pretrained(qwen_store / "models" / "tiny-qwen-edit")
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(image=Image.fromarray(pattern(64, 64, 1)), prompt="make it red", true_cfg_scale=1.0,
               num_inference_steps=2, height=32, width=32, generator=[torch.Generator().manual_seed(7)],
               output_type="np").images[0]
    assert np.abs(ours - np.rint(ref * 255).astype(np.int16)).max() <= 1


def test_refusals_name_the_problem(qwen_server):
    cases = [("/txt2img", {"prompt": "x", "model": "tiny-qwen-edit"}, "cannot make one from text"),
             ("/edit", {**QWEN, "reference_images": [REF_A], "sampler_name": "DPM++ 2M"}, "DPM++ 2M"),
             ("/edit", {**QWEN, "reference_images": [REF_A], "mask": REF_A}, "mask")]
    for path, body, words in cases:
        r = qwen_server.client.post(path, json=body)
        assert r.status_code == 422 and words in r.json()["error"], r.text
    r = qwen_server.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "override_settings": {
        "sd_model_checkpoint": "tiny-qwen-edit"}})
    assert r.status_code == 422 and "cannot make one from text" in r.json()["detail"]


def test_sdapi_img2img_equals_the_native_edit(qwen_server):
    native = px(edit(qwen_server, reference_images=[REF_A], seed=9))
    body = {"prompt": "make it red", "init_images": [REF_A], "width": 32, "height": 32, "steps": 2, "seed": 9,
            "sampler_name": "Euler", "scheduler": "Simple", "cfg_scale": 4,
            "override_settings": {"sd_model_checkpoint": "tiny-qwen-edit"}}
    r = qwen_server.client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    assert np.array_equal(img.astype(np.int16), native)
