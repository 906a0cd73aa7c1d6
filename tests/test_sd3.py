"""SD 3.x (family sd3) on a tiny random-weight model: HTTP, /sdapi, every sampler and schedule on
its flow sigmas, and bare diffusers for comparison."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionapi.demo import tiny_sd3_pipeline
from diffusionapi.engine.samplers import SAMPLER_NAMES, SAMPLERS, SCHEDULER_TYPES

from .conftest import LiveServer, make_settings

SMALL_SD3 = dict(prompt="a red cube", width=64, height=64, steps=4, model="tiny-sd3", fileType="png")


def px(r):
    assert r["state"] == "done", r
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r["image"]))).convert("RGB")).astype(np.int16)


def save_sd3_lora(path, seed: int = 5):
    """A diffusers-format SD 3 LoRA (PEFT keys under ``transformer.``) for the tiny transformer."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    transformer = tiny_sd3_pipeline(0).transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                       init_lora_weights=False))
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusion3Pipeline.save_lora_weights(str(path.parent),
                                               transformer_lora_layers=get_peft_model_state_dict(transformer),
                                               weight_name=path.name)


@pytest.fixture(scope="module")
def sd3_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3-store")
    tiny_sd3_pipeline(0).save_pretrained(root / "models" / "tiny-sd3")
    save_sd3_lora(root / "loras" / "sd3-style.safetensors")
    (root / "upscalers").mkdir()
    (root / "labels.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def sd3_server(sd3_store, tmp_path_factory):
    settings = make_settings(sd3_store, tmp_path_factory.mktemp("sd3-work"), default_model="tiny-sd3")
    with LiveServer(settings) as s:
        yield s


def test_listed_deterministic_and_prompt_sensitive(sd3_server):
    models = {m["name"]: m for m in sd3_server.client.get("/models").json()["models"]}
    assert (models["tiny-sd3"]["family"], models["tiny-sd3"]["prediction"]) == ("sd3", "flow")
    a, b = sd3_server.run(**SMALL_SD3, seed=3), sd3_server.run(**SMALL_SD3, seed=3)
    assert np.array_equal(px(a), px(b)) and px(a).std() > 0
    assert not np.array_equal(px(a), px(sd3_server.run(**dict(SMALL_SD3, prompt="a blue sphere"), seed=3)))
    # The family's defaults where the request is silent: CFG 4.5, Euler on the Simple schedule.
    assert (a["payload"]["cfg_scale"], a["payload"]["sampler_name"], a["payload"]["scheduler_type"]) == \
        (4.5, "Euler", "simple")


def test_equals_bare_diffusers_sd3_pipeline(sd3_server, sd3_store):
    """Euler + Simple with CFG and an empty negative prompt is diffusers' StableDiffusion3Pipeline
    given the Simple sigmas (its own default spacing differs)."""
    from diffusers import StableDiffusion3Pipeline

    ours = px(sd3_server.run(**SMALL_SD3, seed=7, sampler_name="Euler", cfg_scale=4.5))
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_store / "models" / "tiny-sd3")
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(7))
    ref = pipe("a red cube", height=64, width=64, num_inference_steps=4, guidance_scale=4.5, latents=noise,
               sigmas=list(np.linspace(1.0, 1 / 4, 4)), output_type="np").images[0]
    ref = np.rint(ref * 255).astype(np.int16)
    assert np.abs(ours - ref).max() <= 2 and np.abs(ours - ref).mean() < 0.5


def test_cfg_1_is_one_pass_without_the_negative_prompt(sd3_server):
    one = px(sd3_server.run(**SMALL_SD3, seed=2, cfg_scale=1.0))
    assert np.array_equal(one, px(sd3_server.run(**SMALL_SD3, seed=2, cfg_scale=1.0, negative_prompt="blurry")))
    assert not np.array_equal(px(sd3_server.run(**SMALL_SD3, seed=2)),
                              px(sd3_server.run(**SMALL_SD3, seed=2, negative_prompt="blurry")))


COMBOS = [(n, t) for n in SAMPLER_NAMES for t in SCHEDULER_TYPES if t in SAMPLERS[n].schedules]


@pytest.mark.parametrize("sampler, schedule", COMBOS)
def test_every_sampler_and_schedule_runs(sd3_server, sampler, schedule):
    from diffusionapi.jobs.resolve import resolve_request
    from diffusionapi.schemas import Txt2ImgRequest

    plan = resolve_request(Txt2ImgRequest(**{**SMALL_SD3, "width": 32, "height": 32, "seed": 1, "steps": 2,
                                             "sampler_name": sampler, "scheduler_type": schedule}),
                           sd3_server.app.state.registry, sd3_server.settings)
    result = sd3_server.engine.generate(plan, lambda phase, value: None, lambda: False)
    img = np.asarray(result.images[0].image)
    assert img.shape == (32, 32, 3) and img.std() > 0


def test_sdapi_equals_the_native_job(sd3_server):
    native = px(sd3_server.run(**SMALL_SD3, seed=12, sampler_name="DPM++ 2M", scheduler_type="sgm_uniform",
                               cfg_scale=5.0))
    body = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 4, "seed": 12, "sampler_name": "DPM++ 2M",
            "scheduler": "SGM Uniform", "cfg_scale": 5, "override_settings": {"sd_model_checkpoint": "tiny-sd3"}}
    r = sd3_server.client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    assert np.array_equal(img.astype(np.int16), native)
    assert "Schedule type: SGM Uniform" in r.json()["info"]


def test_lora_changes_and_unloads_exactly(sd3_server):
    base = px(sd3_server.run(**SMALL_SD3, seed=5))
    styled = px(sd3_server.run(**dict(SMALL_SD3, prompt="a red cube <lora:sd3-style:1>"), seed=5))
    assert not np.array_equal(base, styled)
    assert np.array_equal(base, px(sd3_server.run(**SMALL_SD3, seed=5)))


def test_encoding_plain_text_is_diffusers_and_weights_reach_the_tokens_not_the_pooled_vectors():
    """engine/flow.encode_sd3: without weights it is the pipeline's own encode_prompt; a weight
    changes the CLIP part of the sequence (its tokens scaled, the chunk's mean restored) and T5's
    (engine/flow.encode_t5_weighted), never the pooled vectors (taken before weighting, as A1111
    and Forge do)."""
    from diffusionapi.engine.flow import encode_sd3

    pipe = tiny_sd3_pipeline(0)
    with torch.no_grad():
        ref, _, ref_pooled, _ = pipe.encode_prompt(prompt="a red cube", prompt_2=None, prompt_3=None, device="cpu",
                                                   do_classifier_free_guidance=False, max_sequence_length=256)
        plain, pooled, n = encode_sd3(pipe, "a red cube", "cpu")
        same, _, _ = encode_sd3(pipe, "a red (cube:1.0)", "cpu")
        weighted, w_pooled, _ = encode_sd3(pipe, "a red (cube:1.5)", "cpu")
        broken, _, broken_n = encode_sd3(pipe, "a red BREAK cube", "cpu")
    assert torch.equal(plain, ref) and torch.equal(pooled, ref_pooled)
    assert torch.equal(same, plain)
    clip = 77
    assert weighted.shape == plain.shape and not torch.equal(weighted[:, clip:], plain[:, clip:])
    assert torch.equal(w_pooled, pooled)
    assert not torch.equal(weighted[:, :clip], plain[:, :clip])
    # BREAK: a second 77-token CLIP chunk in the sequence (Forge's chunks), T5 reads "a red cube".
    assert (n, broken_n) == (1, 2)
    assert broken.shape[1] == plain.shape[1] + clip and torch.equal(broken[:, 2 * clip:], plain[:, clip:])


def test_prompt_weights_change_the_image_and_weight_1_does_not(sd3_server):
    plain = px(sd3_server.run(**SMALL_SD3, seed=6))
    assert np.array_equal(plain, px(sd3_server.run(**dict(SMALL_SD3, prompt="a red (cube:1.0)"), seed=6)))
    # Encoded after the plain text: the conditioning cache keys by the text with its weights.
    weighted = px(sd3_server.run(**dict(SMALL_SD3, prompt="a red (cube:1.5)"), seed=6))
    assert not np.array_equal(plain, weighted)
    # BREAK: two CLIP chunks; the negative prompt's encoding is padded to as many for the CFG batch,
    # and a prompt shorter than its negative prompt the other way.
    assert not np.array_equal(plain, px(sd3_server.run(**dict(SMALL_SD3, prompt="a red BREAK cube"), seed=6)))
    assert not np.array_equal(plain, px(sd3_server.run(**SMALL_SD3, seed=6, negative_prompt="dark BREAK blurry")))
