"""Instruction editing (POST /edit, issue #25) on a tiny random-weight Flux.1 Kontext built in code:
through HTTP, the /sdapi dialect (img2img on an editing model is the edit), the engine's samplers,
refusals in both dialects' shapes, and compared with bare diffusers' FluxKontextPipeline."""
from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionapi.demo import tiny_flux_kontext_pipeline, tiny_flux_pipeline
from diffusionapi.engine.samplers import SAMPLER_NAMES, SAMPLERS, SCHEDULER_TYPES
from diffusionapi.images import read_infotext

from .flow_models import (Recorder, assert_equals_diffusers, b64_png, new_store, pattern, px, queued_count, run_posted,
                          serve)
from .test_flux import save_flux_lora


REF_A, REF_B = b64_png(pattern(64, 64, 1)), b64_png(pattern(64, 64, 2))
EDIT = dict(prompt="make it red", steps=4, model="tiny-kontext", fileType="png")


@pytest.fixture(scope="module")
def edit_store(tmp_path_factory):
    root = new_store(tmp_path_factory, "edit-store")
    tiny_flux_kontext_pipeline(0).save_pretrained(root / "models" / "tiny-kontext")
    tiny_flux_pipeline(0).save_pretrained(root / "models" / "tiny-flux")
    save_flux_lora(root / "loras" / "flux-style.safetensors")
    return root


@pytest.fixture(scope="module")
def edit_server(edit_store, tmp_path_factory):
    yield from serve(edit_store, tmp_path_factory, "edit-work", "tiny-kontext", max_reference_images=3)


def edit(server, **body) -> dict:
    return run_posted(server, "/edit", {**EDIT, **body})


def test_kontext_folder_is_its_own_family_and_flux_stays_flux1(edit_server):
    models = {m["name"]: m for m in edit_server.client.get("/models").json()["models"]}
    assert (models["tiny-kontext"]["family"], models["tiny-kontext"]["prediction"]) == ("flux1-kontext", "flow")
    assert models["tiny-flux"]["family"] == "flux1"


def test_deterministic_and_prompt_reference_and_count_change_the_image(edit_server):
    a, again = edit(edit_server, reference_images=[REF_A], seed=3), edit(edit_server, reference_images=[REF_A], seed=3)
    assert np.array_equal(px(a), px(again)) and px(a).std() > 0
    assert not np.array_equal(px(a), px(edit(edit_server, reference_images=[REF_A], seed=3, prompt="make it blue")))
    assert not np.array_equal(px(a), px(edit(edit_server, reference_images=[REF_B], seed=3)))
    two = edit(edit_server, reference_images=[REF_A, REF_B], seed=3)
    assert not np.array_equal(px(a), px(two))
    # Kontext with no image is Flux.1 text-to-image: the references are what changed the image.
    plain = edit_server.run(**{k: v for k, v in EDIT.items()}, width=64, height=64, seed=3)
    assert not np.array_equal(px(a), px(plain))
    # The family's defaults, the echo describes the references (the record keeps them until the end).
    assert a["payload"]["cfg_scale"] == 1.0 and a["payload"]["scheduler_type"] == "simple"
    assert two["payload"]["reference_images"] == ["<PNG 64x64>", "<PNG 64x64>"]
    info = read_infotext(base64.b64decode(a["image"]))
    assert "Distilled CFG Scale: 3.5" in info and "Model: tiny-kontext" in info


def test_size_defaults_to_the_first_reference_rounded_to_16(edit_server):
    r = edit(edit_server, reference_images=[b64_png(pattern(72, 56, 3)), REF_A], seed=1, steps=2)
    assert (r["width"], r["height"]) == (64, 48)
    r = edit(edit_server, reference_images=[REF_A], seed=1, steps=2, width=48, height=32)
    assert (r["width"], r["height"]) == (48, 32)


def test_equals_bare_diffusers_flux_kontext_pipeline(edit_server, edit_store):
    """Euler + Simple is FluxKontextPipeline's own loop: same noise (the seed's CPU generator),
    sigmas, guidance and reference tokens; the first step starts at t = 1 - 1e-4 instead of 1."""
    from diffusers import FluxKontextPipeline

    ours = px(edit(edit_server, reference_images=[REF_A], seed=7, sampler_name="Euler"))
    pipe = FluxKontextPipeline.from_pretrained(edit_store / "models" / "tiny-kontext")
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(7))
    ref = pipe(image=Image.fromarray(pattern(64, 64, 1)), prompt="make it red", height=64, width=64,
               num_inference_steps=4, guidance_scale=3.5, latents=pipe._pack_latents(noise, 1, 16, 8, 8),
               max_area=64 * 64, _auto_resize=False, output_type="np").images[0]
    assert_equals_diffusers(ours, ref)


COMBOS = [(n, t) for n in SAMPLER_NAMES for t in SCHEDULER_TYPES if t in SAMPLERS[n].schedules]


@pytest.mark.slow  # the same sampler code as flux1's sweep (fast tier); the full suite runs this one
@pytest.mark.parametrize("sampler, schedule", COMBOS)
def test_every_sampler_and_schedule_runs(edit_server, sampler, schedule):
    from diffusionapi.jobs.resolve import resolve_job

    body = {**EDIT, "reference_images": [b64_png(pattern(32, 32, 1))], "seed": 1, "steps": 2,
            "sampler_name": sampler, "scheduler_type": schedule}
    plan = resolve_job("edit", body, edit_server.app.state.registry, edit_server.settings).plan
    result = edit_server.engine.generate(plan, lambda phase, value: None, lambda: False)
    img = np.asarray(result.images[0].image)
    assert img.shape == (32, 32, 3) and img.std() > 0
    assert result.images[0].params["Sampler"] == SAMPLERS[sampler].base_name


def test_the_job_record_is_plain_json_and_rebuilds_the_same_plan(edit_server):
    """What a worker receives (embedded or Celery): the record, through JSON, makes the same job."""
    from diffusionapi.jobs.resolve import resolve_job
    from diffusionapi.schemas import EditRequest

    jobs = edit_server.app.state.jobs
    job = jobs.resolve("edit", EditRequest(**EDIT, reference_images=[REF_A, REF_B], seed=5))
    again = resolve_job(job.kind, json.loads(json.dumps(job.payload)), edit_server.app.state.registry,
                        edit_server.settings)
    assert again.kind == "edit" and again.plan.seed == 5 and len(again.plan.references) == 2
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(job.plan.references,
                                                                          again.plan.references))


def test_reference_images_leave_the_record_when_the_job_ends(edit_server):
    r = edit_server.client.post("/edit", json={**EDIT, "reference_images": [REF_A], "seed": 2, "steps": 2})
    job_id = r.json()["job_id"]
    jobs = edit_server.app.state.jobs
    deadline = time.time() + 120
    while not (st := jobs.status(job_id)).is_final:  # watched without collecting the result
        assert time.time() < deadline
        time.sleep(0.02)
    assert st.state == "done"
    store = edit_server.app.state.backend.store
    # The status file is written first, then the worker's thread drops the inputs.
    while (record := store.read_job(job_id))["payload"]["reference_images"] is not None:
        assert time.time() < deadline
        time.sleep(0.02)
    assert record["kind"] == "edit" and record["payload"]["mask"] is None
    assert record["payload"]["prompt"] == EDIT["prompt"]
    assert edit_server.wait(job_id)["state"] == "done"


def test_mask_keeps_the_first_reference_outside_it(edit_server):
    ref = pattern(64, 64, 1)
    mask = np.zeros((64, 64, 3), np.uint8)
    mask[16:48, 16:48] = 255
    out = px(edit(edit_server, reference_images=[b64_png(ref)], mask=b64_png(mask), mask_blur=0, seed=4))
    outside = mask[..., 0] == 0
    assert np.array_equal(out[outside], ref[outside].astype(np.int16))
    assert not np.array_equal(out[~outside], ref[~outside].astype(np.int16))
    bad = edit_server.client.post("/edit", json={**EDIT, "reference_images": [REF_A],
                                                 "mask": b64_png(np.zeros((32, 32, 3)))})
    assert bad.status_code == 422 and "mask" in bad.text


def test_sdapi_img2img_on_kontext_equals_the_native_edit(edit_server):
    """Forge's way: img2img on an editing model runs the edit, init_images the references."""
    native = px(edit(edit_server, reference_images=[REF_A, REF_B], seed=12, width=64, height=64,
                     sampler_name="Euler", distilled_cfg_scale=2.5))
    body = {"prompt": "make it red", "init_images": [REF_A, REF_B], "width": 64, "height": 64, "steps": 4,
            "seed": 12, "sampler_name": "Euler", "scheduler": "Simple", "cfg_scale": 1, "denoising_strength": 0.6,
            "distilled_cfg_scale": 2.5, "override_settings": {"sd_model_checkpoint": "tiny-kontext"}}
    r = edit_server.client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    assert np.array_equal(img.astype(np.int16), native)
    assert r.json()["parameters"]["init_images"] is None  # as for img2img: not echoed unless asked


def test_refusals_name_the_problem_and_queue_nothing(edit_server):
    before = queued_count(edit_server)
    # An edit on a model that cannot edit (native shape).
    r = edit_server.client.post("/edit", json={**EDIT, "model": "tiny-flux", "reference_images": [REF_A]})
    assert r.status_code == 422 and r.json()["status"] == "error"
    assert "cannot edit" in r.json()["error"] and "flux1-kontext" in r.json()["error"] and "model" in r.text
    # img2img (native) on an editing model points to /edit.
    r = edit_server.client.post("/img2img", json={**EDIT, "init_image": REF_A})
    assert r.status_code == 422 and "/edit" in r.json()["error"]
    # More references than the operator allows (max_reference_images=3), native and /sdapi shapes.
    r = edit_server.client.post("/edit", json={**EDIT, "reference_images": [REF_A] * 4})
    assert r.status_code == 422 and "reference_images" in r.text and "3" in r.json()["error"]
    r = edit_server.client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [REF_A] * 4, "steps": 2,
                                                           "override_settings": {"sd_model_checkpoint": "tiny-kontext"}})
    assert r.status_code == 422 and r.json()["error"] == "HTTPException" and "reference_images" in r.json()["detail"]
    # No references, or a broken one: the field is named.
    r = edit_server.client.post("/edit", json={**EDIT, "reference_images": []})
    assert r.status_code == 422 and "reference_images" in r.text
    r = edit_server.client.post("/edit", json={**EDIT, "reference_images": [REF_A, "bm90IGFuIGltYWdl"]})
    assert r.status_code == 422 and "reference_images[1]" in r.text
    assert queued_count(edit_server) == before


def test_sdapi_img2img_on_a_model_that_cannot_edit_stays_img2img(edit_server):
    body = {"prompt": "a red cube", "init_images": [REF_A], "width": 64, "height": 64, "steps": 4, "seed": 3,
            "denoising_strength": 0.5, "override_settings": {"sd_model_checkpoint": "tiny-flux"}}
    r = edit_server.client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    assert "Denoising strength: 0.5" in json.loads(r.json()["info"])["infotexts"][0]


def test_openai_images_edits_on_kontext_is_the_native_edit(edit_server):
    """OpenAI's /v1/images/edits on an editing model: every image a reference (gpt-image-1 takes
    several), the same pixels as the native edit job."""
    import openai

    native = px(edit(edit_server, reference_images=[REF_A, REF_B], seed=5, steps=3))
    with openai.OpenAI(base_url=edit_server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        res = client.images.edit(model="tiny-kontext", prompt="make it red", extra_body={"steps": 3, "seed": 5},
                                 image=[("a.png", base64.b64decode(REF_A), "image/png"),
                                        ("b.png", base64.b64decode(REF_B), "image/png")])
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json))).convert("RGB"))
    assert np.array_equal(out.astype(np.int16), native)


def test_previews_and_progress_of_an_edit_job(edit_server):
    """The edit kind reports steps and sends previews like the other kinds (engine observer)."""
    from diffusionapi.engine.plan import PreviewPlan
    from diffusionapi.jobs.resolve import resolve_job

    seen, phases = Recorder(), []
    body = {**EDIT, "reference_images": [REF_A], "seed": 1, "steps": 4}
    plan = resolve_job("edit", body, edit_server.app.state.registry, edit_server.settings).plan
    plan.preview = PreviewPlan("approx", 1)
    edit_server.engine.generate(plan, lambda phase, value: phases.append((phase, value)), lambda: False, seen)
    previews, steps = seen.previews, seen.steps
    assert len(previews) >= 2 and any(not np.array_equal(previews[0], p) for p in previews[1:])
    assert {t for _, t in steps} == {4} and "encoding" in {p for p, _ in phases}
    values = [v for _, v in phases]
    assert values == sorted(values)


def test_batches_equal_solo_seeds_and_a_flux_lora_changes_and_unloads(edit_server):
    pair = edit(edit_server, reference_images=[REF_A], seed=30, batch_size=2)
    imgs = [np.asarray(Image.open(io.BytesIO(base64.b64decode(i["image"]))).convert("RGB")).astype(np.int16)
            for i in pair["images"]]
    base = px(edit(edit_server, reference_images=[REF_A], seed=30))
    assert np.array_equal(imgs[0], base)
    assert np.array_equal(imgs[1], px(edit(edit_server, reference_images=[REF_A], seed=31)))
    styled = px(edit(edit_server, reference_images=[REF_A], seed=30, loras=[{"name": "flux-style", "scale": 1.0}]))
    assert not np.array_equal(base, styled)
    assert np.array_equal(base, px(edit(edit_server, reference_images=[REF_A], seed=30)))
