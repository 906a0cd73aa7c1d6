"""Qwen-Image, Z-Image, Chroma and Flux.2 klein (families qwen-image, z-image, chroma, flux2) on tiny
random-weight models: diffusers
folders through HTTP, every sampler and schedule on their flow sigmas, CFG with a negative
prompt, LoRAs, previews, /sdapi and infotext; compared with bare diffusers."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionapi.demo import (tiny_chroma_pipeline, tiny_flux2_klein_pipeline, tiny_qwen_image_pipeline,
                              tiny_z_image_pipeline)
from diffusionapi.engine.samplers import SAMPLER_NAMES, SAMPLERS, SCHEDULER_TYPES
from diffusionapi.images import read_infotext

from .flow_models import approx_previews, assert_equals_diffusers, new_store, px, save_lora, serve

# Slow tier: four tiny DiT families built and served per module; the full suite runs it, the fast
# tier keeps their detection (test_families.py) and the sampler code (test_flux.py, test_sd3.py).
pytestmark = pytest.mark.slow

QWEN = dict(prompt="a red cube", width=64, height=64, steps=4, model="tiny-qwen-image", fileType="png")
ZIMG = dict(prompt="a red cube", width=64, height=64, steps=4, model="tiny-z-image", fileType="png")
CHROMA = dict(prompt="a red cube", width=64, height=64, steps=4, model="tiny-chroma", fileType="png")
FLUX2 = dict(prompt="a red cube", width=64, height=64, steps=4, model="tiny-flux2-klein", fileType="png")
SMALL = {"qwen-image": QWEN, "z-image": ZIMG, "chroma": CHROMA, "flux2": FLUX2}
FAMILIES = tuple(SMALL)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = new_store(tmp_path_factory, "qz-store")
    tiny_qwen_image_pipeline(0).save_pretrained(root / "models" / "tiny-qwen-image")
    tiny_z_image_pipeline(0).save_pretrained(root / "models" / "tiny-z-image")
    save_lora(tiny_qwen_image_pipeline(0), ["to_q", "to_k", "to_v", "add_q_proj", "img_mlp.net.2"],
              root / "loras" / "qwen-style.safetensors")
    save_lora(tiny_z_image_pipeline(0), ["to_q", "to_k", "to_v", "to_out.0"], root / "loras" / "zimage-style.safetensors")
    tiny_chroma_pipeline(0).save_pretrained(root / "models" / "tiny-chroma")
    save_lora(tiny_chroma_pipeline(0), ["to_q", "to_k", "to_v", "to_out.0"], root / "loras" / "chroma-style.safetensors")
    tiny_flux2_klein_pipeline(0).save_pretrained(root / "models" / "tiny-flux2-klein")
    save_lora(tiny_flux2_klein_pipeline(0), ["to_q", "to_k", "to_v", "to_qkv_mlp_proj"],
              root / "loras" / "flux2-style.safetensors")
    return root


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    yield from serve(store, tmp_path_factory, "qz-work", "tiny-qwen-image")


@pytest.mark.parametrize("keys, family", [
    ({"transformer_blocks.0.img_mod.1.weight", "transformer_blocks.0.txt_mod.1.weight"}, "qwen-image"),
    ({"model.diffusion_model.transformer_blocks.0.img_mod.1.weight",
      "model.diffusion_model.transformer_blocks.0.txt_mod.1.weight"}, "qwen-image"),
    ({"noise_refiner.0.attention.to_q.weight", "context_refiner.0.attention.to_q.weight"}, "z-image"),
    ({"double_stream_modulation_img.lin.weight", "double_blocks.0.img_attn.qkv.weight"}, "flux2"),
])
def test_single_files_are_recognised_and_refused_with_the_reason(keys, family):
    from diffusionapi.families import BY_ID, detect_checkpoint_keys

    assert detect_checkpoint_keys(keys).family == family
    assert "diffusers folder" in BY_ID[family].single_files


@pytest.mark.parametrize("keys", [
    {"distilled_guidance_layer.in_proj.weight", "double_blocks.0.img_attn.qkv.weight"},
    {"model.diffusion_model.distilled_guidance_layer.in_proj.weight", "model.diffusion_model.img_in.weight"},
])
def test_chroma_single_files_are_recognised_and_load(keys):
    """Chroma's files share Flux.1's block names; its approximator decides (test_chroma_files runs them)."""
    from diffusionapi.families import BY_ID, detect_checkpoint_keys

    assert detect_checkpoint_keys(keys).family == "chroma"
    assert BY_ID["chroma"].single_files is None


def test_bfl_flux1_files_are_not_taken_for_qwen_image():
    # BFL's double blocks carry img_mod / txt_mod too (Qwen-Image's are under transformer_blocks).
    from diffusionapi.families import detect_checkpoint_keys

    keys = {"img_in.weight", "txt_in.weight", "double_blocks.0.img_mod.lin.weight",
            "double_blocks.0.txt_mod.lin.weight", "double_blocks.0.img_attn.qkv.weight",
            "single_blocks.0.linear1.weight"}
    assert detect_checkpoint_keys(keys).family == "flux1"


def test_flux2_dev_folders_are_not_taken_for_flux1(tmp_path):
    import json

    from diffusionapi.families import detect_folder

    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Flux2Pipeline"}))
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "Flux2Transformer2DModel"}))
    assert detect_folder(tmp_path).family == "flux2"  # Flux.2 [dev] (tests/test_flux2_dev.py)


def test_listed_with_their_family_ids(server):
    models = {m["name"]: m for m in server.client.get("/models").json()["models"]}
    assert (models["tiny-qwen-image"]["family"], models["tiny-qwen-image"]["prediction"]) == ("qwen-image", "flow")
    assert (models["tiny-z-image"]["family"], models["tiny-z-image"]["prediction"]) == ("z-image", "flow")
    assert (models["tiny-chroma"]["family"], models["tiny-chroma"]["prediction"]) == ("chroma", "flow")
    assert (models["tiny-flux2-klein"]["family"], models["tiny-flux2-klein"]["prediction"]) == ("flux2", "flow")
    sd = {m["model_name"]: m for m in server.client.get("/sdapi/v1/sd-models").json()}
    assert {"tiny-qwen-image", "tiny-z-image", "tiny-chroma", "tiny-flux2-klein"} <= set(sd)


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic_and_prompt_sensitive(server, family):
    small = SMALL[family]
    a, b = server.run(**small, seed=3), server.run(**small, seed=3)
    assert np.array_equal(px(a), px(b)) and px(a).std() > 0
    assert not np.array_equal(px(a), px(server.run(**dict(small, prompt="a blue sphere"), seed=3)))
    assert not np.array_equal(px(a), px(server.run(**small, seed=4)))
    info = read_infotext(base64.b64decode(a["image"]))
    assert "Schedule type: Simple" in info and "Shift: " in info


def test_family_defaults(server):
    q = server.run(**QWEN, seed=1)
    assert (q["payload"]["cfg_scale"], q["payload"]["sampler_name"], q["payload"]["scheduler_type"]) == \
        (4.0, "Euler", "simple")
    z = server.run(**ZIMG, seed=1)
    assert (z["payload"]["cfg_scale"], z["payload"]["sampler_name"]) == (1.0, "Euler")
    c = server.run(**CHROMA, seed=1)
    assert (c["payload"]["cfg_scale"], c["payload"]["sampler_name"]) == (5.0, "Euler")
    f = server.run(**FLUX2, seed=1)
    assert (f["payload"]["cfg_scale"], f["payload"]["sampler_name"]) == (1.0, "Euler")


def test_negative_prompt_is_used_above_cfg_1(server):
    for family in FAMILIES:
        small = SMALL[family]
        one = px(server.run(**small, seed=2, cfg_scale=1.0))
        assert np.array_equal(one, px(server.run(**small, seed=2, cfg_scale=1.0, negative_prompt="blurry")))
        guided = px(server.run(**small, seed=2, cfg_scale=3.0, negative_prompt="blurry"))
        assert not np.array_equal(one, guided)
        assert not np.array_equal(guided, px(server.run(**small, seed=2, cfg_scale=3.0, negative_prompt="sharp")))


def _noise(seed):
    return torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(seed))


def test_qwen_image_equals_bare_diffusers(server, store):
    """Euler + Simple with CFG 4 and a negative prompt is QwenImagePipeline with true_cfg_scale 4.
    The folder's scheduler stretches its schedule to end at 0.02 (``shift_terminal``, Qwen's
    published config); the engine's Simple schedule does not, so the bare pipeline here runs
    with that stretch off. Same noise (the seed's CPU generator), packed as the pipeline packs."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    ours = px(server.run(**QWEN, seed=7, sampler_name="Euler", cfg_scale=4.0, negative_prompt="blurry"))
    pipe = QwenImagePipeline.from_pretrained(store / "models" / "tiny-qwen-image")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift_terminal=None)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a red cube", negative_prompt="blurry", true_cfg_scale=4.0, height=64, width=64,
               num_inference_steps=4, latents=pipe._pack_latents(_noise(7), 1, 16, 8, 8), output_type="np").images[0]
    assert_equals_diffusers(ours, ref)


def test_z_image_equals_bare_diffusers(server, store):
    """Euler + Simple is ZImagePipeline: cfg_scale 3 is its guidance_scale 2 (pos + g (pos - neg))."""
    from diffusers import ZImagePipeline

    ours = px(server.run(**ZIMG, seed=7, sampler_name="Euler", cfg_scale=3.0, negative_prompt="blurry"))
    pipe = ZImagePipeline.from_pretrained(store / "models" / "tiny-z-image")
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a red cube", negative_prompt="blurry", guidance_scale=2.0, height=64, width=64,
               num_inference_steps=4, latents=_noise(7), output_type="np").images[0]
    assert_equals_diffusers(ours, ref)


def test_chroma_equals_bare_diffusers(server, store):
    """Euler + Simple with CFG 5 and a negative prompt is ChromaPipeline with guidance_scale 5."""
    from diffusers import ChromaPipeline

    ours = px(server.run(**CHROMA, seed=7, sampler_name="Euler", cfg_scale=5.0, negative_prompt="blurry"))
    pipe = ChromaPipeline.from_pretrained(store / "models" / "tiny-chroma")
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a red cube", negative_prompt="blurry", guidance_scale=5.0, height=64, width=64,
               num_inference_steps=4, latents=pipe._pack_latents(_noise(7), 1, 16, 8, 8), output_type="np").images[0]
    assert_equals_diffusers(ours, ref)


def test_flux2_klein_equals_bare_diffusers(server, store):
    """Euler + Simple at CFG 1 is Flux2KleinPipeline (distilled klein): the same noise, patchified
    2x2 as the pipeline takes it, and the same shift (its mu from 16 tokens and 4 steps)."""
    from diffusers import Flux2KleinPipeline

    from diffusionapi.engine.vae_io import patchify

    ours = px(server.run(**FLUX2, seed=7, sampler_name="Euler", cfg_scale=1.0))
    pipe = Flux2KleinPipeline.from_pretrained(store / "models" / "tiny-flux2-klein")
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 32, 8, 8), generator=torch.Generator().manual_seed(7))
    ref = pipe(prompt="a red cube", guidance_scale=1.0, height=64, width=64, num_inference_steps=4,
               latents=patchify(noise), output_type="np").images[0]
    assert_equals_diffusers(ours, ref)


# The fast tier runs one sampler per family (the sampler table's code is the same for every flow
# family and is swept on flux1 and sd3 in the fast tier); every pair of every family (each sweep a
# minute or more on a busy CPU) is the slow tier's, which the full suite runs.
COMBOS = [pytest.param(f, n, t, marks=[] if (n, t) == ("Euler", "simple") else [pytest.mark.slow])
          for f in FAMILIES for n in SAMPLER_NAMES for t in SCHEDULER_TYPES
          if t in SAMPLERS[n].schedules]


@pytest.mark.parametrize("family, sampler, schedule", COMBOS)
def test_every_sampler_and_schedule_runs(server, family, sampler, schedule):
    from diffusionapi.jobs.resolve import resolve_request
    from diffusionapi.schemas import Txt2ImgRequest

    plan = resolve_request(Txt2ImgRequest(**{**SMALL[family], "width": 32, "height": 32, "seed": 1, "steps": 2,
                                             "sampler_name": sampler, "scheduler_type": schedule}),
                           server.app.state.registry, server.settings)
    result = server.engine.generate(plan, lambda phase, value: None, lambda: False)
    img = np.asarray(result.images[0].image)
    assert img.shape == (32, 32, 3) and img.std() > 0
    assert result.images[0].params["Sampler"] == SAMPLERS[sampler].base_name


@pytest.mark.parametrize("family, lora", [("qwen-image", "qwen-style"), ("z-image", "zimage-style"),
                                          ("chroma", "chroma-style"), ("flux2", "flux2-style")])
def test_lora_changes_and_unloads_exactly(server, family, lora):
    small = SMALL[family]
    base = px(server.run(**small, seed=5))
    styled = px(server.run(**small, seed=5, loras=[{"name": lora, "scale": 1.0}]))
    assert not np.array_equal(base, styled)
    tagged = px(server.run(**dict(small, prompt=f"a red cube <lora:{lora}:1>"), seed=5))
    assert np.array_equal(styled, tagged)
    assert np.array_equal(base, px(server.run(**small, seed=5)))
    loras = {e["name"]: e for e in server.client.get("/loras").json()["loras"]}
    assert loras[lora]["family"] == ("flux1" if family == "chroma" else family)  # Chroma's are Flux.1's keys


def test_a_lora_of_the_other_family_is_refused(server):
    r = server.run(**QWEN, seed=5, loras=[{"name": "zimage-style", "scale": 1.0}])
    assert r["state"] == "error" and "is for Z-Image" in r["error"], r


@pytest.mark.parametrize("family", FAMILIES)
def test_previews_change_over_the_steps(server, family):
    previews = approx_previews(server, {**SMALL[family], "seed": 1, "steps": 4})
    assert len(previews) >= 2 and any(not np.array_equal(previews[0], p) for p in previews[1:])


def test_sdapi_txt2img_equals_the_native_job(server):
    native = px(server.run(**QWEN, seed=12, sampler_name="DPM++ 2M", scheduler_type="sgm_uniform", cfg_scale=5.0,
                           negative_prompt="blurry"))
    body = {"prompt": "a red cube", "negative_prompt": "blurry", "width": 64, "height": 64, "steps": 4, "seed": 12,
            "sampler_name": "DPM++ 2M", "scheduler": "SGM Uniform", "cfg_scale": 5,
            "override_settings": {"sd_model_checkpoint": "tiny-qwen-image"}}
    r = server.client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    assert np.array_equal(img.astype(np.int16), native)
    assert "Schedule type: SGM Uniform" in r.json()["info"]


@pytest.mark.parametrize("family", FAMILIES)
def test_png_info_reads_the_infotext_back_into_the_same_image(server, family):
    first = server.run(**SMALL[family], seed=21, sampler_name="DPM++ 2M", scheduler_type="beta", cfg_scale=2.5,
                       negative_prompt="blurry")
    params = server.client.post("/png-info", json={"image": first["image"]}).json()["parameters"]
    assert params["scheduler_type"] == "beta" and params["cfg_scale"] == 2.5
    again = server.run(**params, fileType="png")
    assert np.array_equal(px(first), px(again))


@pytest.mark.parametrize("family", ["qwen-image", "flux2"])
def test_img2img_encodes_through_the_family_vae(server, family):
    """Qwen-Image's video-style VAE and Flux.2's patch-normalised one, both ways: a low denoising
    strength keeps the image close to its input, a high one departs from it."""
    small = SMALL[family]
    init = px(server.run(**small, seed=8))
    buf = io.BytesIO()
    Image.fromarray(init.astype(np.uint8)).save(buf, "PNG")
    body = {**small, "init_image": base64.b64encode(buf.getvalue()).decode(), "seed": 9, "steps": 10}
    outs = []
    for strength in (0.2, 0.9):
        r = server.client.post("/img2img", json={**body, "denoising_strength": strength})
        assert r.status_code == 200, r.text
        outs.append(px(server.wait(r.json()["job_id"])))
    near, far = (np.abs(o - init).mean() for o in outs)
    assert outs[0].shape == init.shape and 0 < near < far


@pytest.mark.parametrize("family", ["z-image", "flux2"])
def test_hires_fix(server, family):
    hires = server.run(**SMALL[family], seed=30, hires={"enabled": True, "scale": 1.5, "steps": 2,
                                                        "denoising_strength": 0.5})
    assert px(hires).shape == (96, 96, 3)
