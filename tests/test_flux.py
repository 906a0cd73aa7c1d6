"""Flux.1 (family flux1) on tiny random-weight models: diffusers folders through HTTP and the
/sdapi dialect, the engine's samplers and schedules on flow sigmas, LoRA, img2img, inpainting,
previews; compared with bare diffusers."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionapi.demo import tiny_flux_pipeline
from diffusionapi.engine.samplers import SAMPLER_NAMES, SCHEDULER_TYPES, SAMPLERS
from diffusionapi.images import read_infotext

from .conftest import LiveServer, make_settings

SMALL_FLUX = dict(prompt="a red cube", width=64, height=64, steps=4, model="tiny-flux", fileType="png")


def px(r):
    assert r["state"] == "done", r
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r["image"]))).convert("RGB")).astype(np.int16)


def save_flux_lora(path, seed: int = 5):
    """A diffusers-format Flux LoRA (PEFT keys under ``transformer.``) for the tiny transformer."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    transformer = tiny_flux_pipeline(0).transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                       init_lora_weights=False))
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(str(path.parent), transformer_lora_layers=get_peft_model_state_dict(transformer),
                                   weight_name=path.name)
    return path


@pytest.fixture(scope="module")
def flux_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-store")
    tiny_flux_pipeline(0).save_pretrained(root / "models" / "tiny-flux")
    tiny_flux_pipeline(1, guidance=False).save_pretrained(root / "models" / "tiny-flux-schnell")
    save_flux_lora(root / "loras" / "flux-style.safetensors")
    (root / "upscalers").mkdir()
    (root / "labels.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def flux_server(flux_store, tmp_path_factory):
    settings = make_settings(flux_store, tmp_path_factory.mktemp("flux-work"), default_model="tiny-flux")
    with LiveServer(settings) as s:
        yield s


def test_listed_as_flux1_flow(flux_server):
    models = {m["name"]: m for m in flux_server.client.get("/models").json()["models"]}
    assert (models["tiny-flux"]["family"], models["tiny-flux"]["prediction"]) == ("flux1", "flow")
    assert models["tiny-flux-schnell"]["family"] == "flux1"


def test_deterministic_prompt_sensitive_and_family_defaults(flux_server):
    a, b = flux_server.run(**SMALL_FLUX, seed=3), flux_server.run(**SMALL_FLUX, seed=3)
    assert np.array_equal(px(a), px(b)) and px(a).std() > 0
    assert not np.array_equal(px(a), px(flux_server.run(**dict(SMALL_FLUX, prompt="a blue sphere"), seed=3)))
    assert not np.array_equal(px(a), px(flux_server.run(**SMALL_FLUX, seed=4)))
    # Left out: Flux's CFG 1 (one pass, no negative prompt) and the Simple schedule, as Forge runs it.
    assert a["payload"]["cfg_scale"] == 1.0 and a["payload"]["scheduler_type"] == "simple"
    info = read_infotext(base64.b64decode(a["image"]))
    assert "Distilled CFG Scale: 3.5" in info and "Schedule type: Simple" in info and "Shift: " in info


def test_equals_bare_diffusers_flux_pipeline(flux_server, flux_store):
    """Euler + Simple is diffusers' FluxPipeline: same noise (the seed's CPU generator), same
    sigmas, same guidance; only the first step starts at t = 1 - 1e-4 instead of 1."""
    from diffusers import FluxPipeline

    ours = px(flux_server.run(**SMALL_FLUX, seed=7, sampler_name="Euler"))
    pipe = FluxPipeline.from_pretrained(flux_store / "models" / "tiny-flux")
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(7))
    ref = pipe("a red cube", height=64, width=64, num_inference_steps=4, guidance_scale=3.5,
               latents=pipe._pack_latents(noise, 1, 16, 8, 8), output_type="np").images[0]
    ref = np.rint(ref * 255).astype(np.int16)
    assert np.abs(ours - ref).max() <= 2 and np.abs(ours - ref).mean() < 0.5


def test_distilled_cfg_scale_and_cfg(flux_server):
    base = px(flux_server.run(**SMALL_FLUX, seed=2))
    assert not np.array_equal(base, px(flux_server.run(**SMALL_FLUX, seed=2, distilled_cfg_scale=1.5)))
    # CFG 1: the negative prompt is not used (Forge's rule); above 1 it is, in a second pass.
    assert np.array_equal(base, px(flux_server.run(**SMALL_FLUX, seed=2, negative_prompt="blurry")))
    assert not np.array_equal(base, px(flux_server.run(**SMALL_FLUX, seed=2, negative_prompt="blurry",
                                                       cfg_scale=3.0)))
    # schnell has no guidance embedding: the distilled scale changes nothing and is not written.
    s = dict(SMALL_FLUX, model="tiny-flux-schnell", seed=2)
    plain = flux_server.run(**s)
    assert np.array_equal(px(plain), px(flux_server.run(**s, distilled_cfg_scale=1.5)))
    assert "Distilled CFG Scale" not in read_infotext(base64.b64decode(plain["image"]))


def test_sizes_round_to_16_and_bad_fields_are_named(flux_server):
    r = flux_server.run(**dict(SMALL_FLUX, width=72, height=56), seed=1)
    assert (r["width"], r["height"]) == (64, 48)
    for field, value in (("distilled_cfg_scale", -1), ("cfg_rescale", 2), ("scheduler_type", "bogus")):
        bad = flux_server.client.post("/txt2img", json={**SMALL_FLUX, field: value})
        assert bad.status_code == 422 and field in bad.text, bad.text


def _engine_run(server, **kw):
    from diffusionapi.jobs.resolve import resolve_request
    from diffusionapi.schemas import Txt2ImgRequest

    plan = resolve_request(Txt2ImgRequest(**{**SMALL_FLUX, "width": 32, "height": 32, "seed": 1, **kw}),
                           server.app.state.registry, server.settings)
    return server.engine.generate(plan, lambda phase, value: None, lambda: False)


COMBOS = [(n, t) for n in SAMPLER_NAMES for t in SCHEDULER_TYPES if t in SAMPLERS[n].schedules]


# The fast tier sweeps the flow sampler code on sd3 (test_sd3.py); here it runs Euler + Simple and
# leaves the rest of flux1's sweep to the slow tier (the full suite).
@pytest.mark.parametrize("sampler, schedule", [
    pytest.param(n, t, marks=[] if (n, t) == ("Euler", "simple") else [pytest.mark.slow]) for n, t in COMBOS])
def test_every_sampler_and_schedule_runs(flux_server, sampler, schedule):
    result = _engine_run(flux_server, sampler_name=sampler, scheduler_type=schedule, steps=2)
    img = np.asarray(result.images[0].image)
    assert img.shape == (32, 32, 3) and img.std() > 0
    assert result.images[0].params["Sampler"] == SAMPLERS[sampler].base_name


def test_an_impossible_pair_is_a_422_naming_both(flux_server):
    r = flux_server.client.post("/txt2img", json={**SMALL_FLUX, "sampler_name": "DDIM", "scheduler_type": "beta"})
    assert r.status_code == 422 and "DDIM" in r.text and "beta" in r.text


def test_lora_changes_and_unloads_exactly(flux_server):
    base = px(flux_server.run(**SMALL_FLUX, seed=5))
    styled = flux_server.run(**SMALL_FLUX, seed=5, loras=[{"name": "flux-style", "scale": 1.0}])
    assert not np.array_equal(base, px(styled))
    tagged = flux_server.run(**dict(SMALL_FLUX, prompt="a red cube <lora:flux-style:1>"), seed=5)
    assert np.array_equal(px(styled), px(tagged))
    assert np.array_equal(base, px(flux_server.run(**SMALL_FLUX, seed=5)))
    loras = {e["name"]: e for e in flux_server.client.get("/loras").json()["loras"]}
    assert loras["flux-style"]["family"] == "flux1"


def _png_b64(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_img2img_runs_the_a1111_step_count_and_inpainting_keeps_outside(flux_server):
    init = px(flux_server.run(**SMALL_FLUX, seed=8))
    steps_seen = []

    class Observer:
        def step(self, phase, step, total):
            steps_seen.append(total)

        def preview(self, jpeg, step, total):
            pass

    from diffusionapi.jobs.resolve import resolve_job

    body = {**SMALL_FLUX, "init_image": _png_b64(init), "denoising_strength": 0.5, "steps": 10, "seed": 9}
    job = resolve_job("img2img", body, flux_server.app.state.registry, flux_server.settings)
    flux_server.engine.generate(job.plan, lambda p, v: None, lambda: False, Observer())
    assert set(steps_seen) == {6}  # A1111: int(steps * denoising_strength) + 1 (engine/img2img.img2img_steps)
    mask = np.zeros((64, 64, 3), np.uint8)
    mask[16:48, 16:48] = 255
    r = flux_server.client.post("/img2img", json={**body, "mask": _png_b64(mask), "mask_blur": 0})
    assert r.status_code == 200, r.text
    out = px(flux_server.wait(r.json()["job_id"]))
    outside = mask[..., 0] == 0
    assert np.array_equal(out[outside], init[outside]) and not np.array_equal(out[~outside], init[~outside])


def test_previews_of_16_channel_latents_change_over_the_steps(flux_server):
    from diffusionapi.engine.plan import PreviewPlan

    previews = []

    class Observer:
        def step(self, phase, step, total):
            pass

        def preview(self, jpeg, step, total):
            previews.append(np.asarray(Image.open(io.BytesIO(jpeg))).astype(np.int16))

    from diffusionapi.jobs.resolve import resolve_request
    from diffusionapi.schemas import Txt2ImgRequest

    plan = resolve_request(Txt2ImgRequest(**{**SMALL_FLUX, "seed": 1, "steps": 4}), flux_server.app.state.registry,
                           flux_server.settings)
    plan.preview = PreviewPlan("approx", 1)
    flux_server.engine.generate(plan, lambda p, v: None, lambda: False, Observer())
    assert len(previews) >= 2 and any(not np.array_equal(previews[0], p) for p in previews[1:])


def test_sdapi_with_forge_flux_fields_equals_the_native_job(flux_server):
    native = px(flux_server.run(**SMALL_FLUX, seed=12, sampler_name="Euler", cfg_scale=1.0,
                                distilled_cfg_scale=2.5))
    body = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 4, "seed": 12, "sampler_name": "Euler",
            "scheduler": "Simple", "cfg_scale": 1, "distilled_cfg_scale": 2.5, "forge_preset": "flux",
            "override_settings": {"sd_model_checkpoint": "tiny-flux",
                                  "forge_additional_modules": ["ae.safetensors", "t5xxl_fp16.safetensors"]}}
    r = flux_server.client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    assert np.array_equal(img.astype(np.int16), native)
    info = r.json()["info"]
    assert "Distilled CFG Scale: 2.5" in info


def test_webuiapi_client_on_flux(flux_server):
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=flux_server.port)
    result = api.txt2img(prompt="a red cube", width=64, height=64, steps=4, seed=12, cfg_scale=1,
                         sampler_name="Euler", scheduler="Simple",
                         override_settings={"sd_model_checkpoint": "tiny-flux"})
    assert result.image.size == (64, 64)
    assert "Distilled CFG Scale: 3.5" in result.info["infotexts"][0]


def test_png_info_reads_the_flux_infotext_back_into_the_same_image(flux_server):
    first = flux_server.run(**SMALL_FLUX, seed=21, distilled_cfg_scale=2.0, sampler_name="DPM++ 2M",
                            scheduler_type="beta")
    info = flux_server.client.post("/png-info", json={"image": first["image"]}).json()
    params = info["parameters"]
    assert params["distilled_cfg_scale"] == 2.0 and params["scheduler_type"] == "beta"
    again = flux_server.run(**params, fileType="png")
    assert np.array_equal(px(first), px(again))


def test_batches_and_hires_fix(flux_server):
    """Two images in one transformer batch equal the same seeds made alone; a latent hires pass
    re-noises and re-denoises at the final size (its own shift)."""
    pair = flux_server.run(**SMALL_FLUX, seed=30, batch_size=2)
    imgs = [np.asarray(Image.open(io.BytesIO(base64.b64decode(i["image"]))).convert("RGB")).astype(np.int16)
            for i in pair["images"]]
    assert np.array_equal(imgs[0], px(flux_server.run(**SMALL_FLUX, seed=30)))
    assert np.array_equal(imgs[1], px(flux_server.run(**SMALL_FLUX, seed=31)))
    hires = flux_server.run(**SMALL_FLUX, seed=30, hires={"enabled": True, "scale": 1.5, "steps": 2,
                                                          "denoising_strength": 0.5})
    assert px(hires).shape == (96, 96, 3)


def test_taesd_previews_are_a_422_pointing_to_approx(flux_server):
    r = flux_server.client.post("/txt2img", json={**SMALL_FLUX, "preview": {"every": 1, "method": "taesd"}})
    assert r.status_code == 422 and "preview" in r.text and "approx" in r.text, r.text


def test_prompt_weights_reach_flux_through_t5_and_weight_1_and_break_do_not(flux_server):
    """Flux reads CLIP-L only for its pooled vector, which A1111's and Forge's weights never reach
    (taken before emphasis); T5's states take the weights as Forge's T5 engine applies them
    (engine/flow.encode_t5_weighted). A weight of 1 and BREAK (T5 has no chunks) give the plain
    text's image; the conditioning cache keys by the text with its weights."""
    plain = px(flux_server.run(**SMALL_FLUX, seed=14))
    assert np.array_equal(plain, px(flux_server.run(**dict(SMALL_FLUX, prompt="a red (cube:1.0)"), seed=14)))
    assert np.array_equal(plain, px(flux_server.run(**dict(SMALL_FLUX, prompt="a red BREAK cube"), seed=14)))
    weighted = px(flux_server.run(**dict(SMALL_FLUX, prompt="a red (cube:1.5)"), seed=14))
    assert not np.array_equal(plain, weighted)
    assert np.array_equal(weighted, px(flux_server.run(**dict(SMALL_FLUX, prompt="a red (cube:1.5)"), seed=14)))
