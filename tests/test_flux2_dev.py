"""Flux.2 [dev] (family flux2, beside klein; issue #25) on a tiny random-weight model built in code
(demo.tiny_flux2_dev_pipeline: Flux.2's transformer with its guidance embedding, a Mistral 3
text encoder): a diffusers folder through HTTP, its defaults (Flux2Pipeline's embedded guidance 4,
Euler, no negative pass), the guidance reaching the transformer, compared with bare
diffusers' Flux2Pipeline for text-to-image and for an edit with reference images."""
from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionapi.demo import tiny_flux2_dev_pipeline
from diffusionapi.images import read_infotext

from .flow_models import FLUX2_SHARPENED, assert_equals_diffusers, b64_png, new_store, pattern, px, serve, sharpen

pytestmark = pytest.mark.slow  # a 30-layer tiny Mistral: built in seconds, served per module

DEV = dict(prompt="a red cube", width=64, height=64, steps=4, model="tiny-flux2-dev", fileType="png")
PAT_A, PAT_B = pattern(64, 64, 1), pattern(80, 64, 2)


def sharpened_dev(seed: int = 0):
    """The tiny dev with its attention weights, modulations and guidance embedding scaled up 4x
    (flow_models.sharpen): the guidance value and the references then count."""
    return sharpen(tiny_flux2_dev_pipeline(seed), FLUX2_SHARPENED + ("guidance_embedder",))


@pytest.fixture(scope="module")
def dev_store(tmp_path_factory):
    root = new_store(tmp_path_factory, "flux2-dev-store")
    sharpened_dev(0).save_pretrained(root / "models" / "tiny-flux2-dev")
    return root


@pytest.fixture(scope="module")
def dev_server(dev_store, tmp_path_factory):
    yield from serve(dev_store, tmp_path_factory, "flux2-dev-work", "tiny-flux2-dev", max_reference_images=3)


def _bare(dev_store):
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline.from_pretrained(dev_store / "models" / "tiny-flux2-dev")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _noise(seed):
    from diffusionapi.engine.vae_io import patchify

    return patchify(torch.randn((1, 32, 8, 8), generator=torch.Generator().manual_seed(seed)))


def test_listed_as_flux2_and_loaded_with_its_own_pipeline(dev_server):
    models = {m["name"]: m for m in dev_server.client.get("/models").json()["models"]}
    assert (models["tiny-flux2-dev"]["family"], models["tiny-flux2-dev"]["prediction"]) == ("flux2", "flow")
    dev_server.run(**DEV, seed=1)
    assert type(dev_server.engine.cache._items["tiny-flux2-dev"].pipe).__name__ == "Flux2Pipeline"


def test_defaults_are_flux2_pipelines_and_the_guidance_counts(dev_server):
    r = dev_server.client.post("/txt2img", json={"prompt": "a red cube", "width": 64, "height": 64, "steps": 2})
    assert r.status_code == 200, r.text
    done = dev_server.wait(r.json()["job_id"])
    p = done["payload"]
    assert (p["cfg_scale"], p["sampler_name"], p["distilled_cfg_scale"]) == (1.0, "Euler", 4.0)
    info = read_infotext(base64.b64decode(done["image"]))
    assert "Distilled CFG Scale: 4" in info
    a = px(dev_server.run(**DEV, seed=3))
    assert np.array_equal(a, px(dev_server.run(**DEV, seed=3))) and a.std() > 0
    assert not np.array_equal(a, px(dev_server.run(**dict(DEV, prompt="a blue sphere"), seed=3)))
    assert not np.array_equal(a, px(dev_server.run(**DEV, seed=3, distilled_cfg_scale=1.5)))


def test_equals_bare_diffusers_flux2_pipeline(dev_server, dev_store):
    """Euler + Simple at CFG 1 with guidance 2.5 is Flux2Pipeline(guidance_scale=2.5): the same
    noise (patchified 2x2 as the pipeline takes it), shift and embedded guidance."""
    ours = px(dev_server.run(**DEV, seed=7, sampler_name="Euler", cfg_scale=1.0, distilled_cfg_scale=2.5))
    ref = _bare(dev_store)(prompt="a red cube", guidance_scale=2.5, height=64, width=64, num_inference_steps=4,
                           latents=_noise(7), output_type="np").images[0]
    assert_equals_diffusers(ours, ref)


def test_an_edit_with_references_equals_bare_diffusers(dev_server, dev_store):
    body = {**DEV, "prompt": "make it red", "reference_images": [b64_png(PAT_A), b64_png(PAT_B)], "seed": 7,
            "sampler_name": "Euler", "scheduler_type": "simple", "cfg_scale": 1.0}
    r = dev_server.client.post("/edit", json=body)
    assert r.status_code == 200, r.text
    ours = px(dev_server.wait(r.json()["job_id"]))
    assert not np.array_equal(ours, px(dev_server.run(**dict(DEV, prompt="make it red"), seed=7, sampler_name="Euler")))
    ref = _bare(dev_store)(image=[Image.fromarray(PAT_A), Image.fromarray(PAT_B)], prompt="make it red",
                           guidance_scale=4.0, height=64, width=64, num_inference_steps=4, latents=_noise(7),
                           output_type="np").images[0]
    assert_equals_diffusers(ours, ref)
