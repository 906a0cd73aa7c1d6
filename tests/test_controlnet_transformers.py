"""Flux.1 and SD 3.x ControlNets (diffusers' FluxControlNetModel: InstantX's, Shakker's union;
SD3ControlNetModel: InstantX's and SD 3.5's kind) through HTTP on tiny random models: diffusers
folders, single files in the diffusers key layout, a union model; compared with bare diffusers'
FluxControlNetPipeline and StableDiffusion3ControlNetPipeline."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionapi.demo import save_tiny_model, tiny_flux_pipeline, tiny_sd3_pipeline

from .controlnet_factory import control_image, png
from .flow_models import new_store, px, serve

# Slow tier: Flux / SD 3 ControlNets against diffusers' pipelines; the full suite runs it, the
# fast tier keeps the SD 1.5 / SDXL ControlNet tests.
pytestmark = pytest.mark.slow

SMALL = dict(prompt="a red cube", width=64, height=64, steps=4, seed=7, model="tiny-flux", fileType="png",
             sampler_name="Euler")


def tiny_flux_controlnet(transformer, seed: int, num_mode: int | None = None):
    """A FluxControlNetModel of the tiny transformer's config (one block of each kind), its
    zero-initialised control projections given random weights so that it does something."""
    from diffusers import FluxControlNetModel

    c = transformer.config
    torch.manual_seed(seed)
    cn = FluxControlNetModel(in_channels=c.in_channels, num_layers=1, num_single_layers=1,
                             attention_head_dim=c.attention_head_dim, num_attention_heads=c.num_attention_heads,
                             joint_attention_dim=c.joint_attention_dim, pooled_projection_dim=c.pooled_projection_dim,
                             guidance_embeds=c.guidance_embeds, axes_dims_rope=list(c.axes_dims_rope),
                             num_mode=num_mode)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith("controlnet_"):
                p.normal_(0, 0.3)
    return cn.eval()


def tiny_sd3_controlnet(transformer, seed: int, sd35: bool = False):
    """An SD3ControlNetModel of the tiny transformer's config: InstantX's kind (text, its own
    position embedding, zero pooled vector) or SD 3.5's (no text, the transformer's position
    embedding); the zero-initialised control projections given random weights."""
    from diffusers import SD3ControlNetModel

    c = transformer.config
    torch.manual_seed(seed)
    cn = SD3ControlNetModel(sample_size=c.sample_size, patch_size=c.patch_size, in_channels=c.in_channels,
                            out_channels=c.out_channels, num_layers=1, attention_head_dim=c.attention_head_dim,
                            num_attention_heads=c.num_attention_heads,
                            joint_attention_dim=None if sd35 else c.joint_attention_dim,
                            caption_projection_dim=c.caption_projection_dim,
                            pooled_projection_dim=c.pooled_projection_dim, pos_embed_max_size=c.pos_embed_max_size,
                            use_pos_embed=not sd35, force_zeros_for_pooled_projection=not sd35)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_blocks", "pos_embed_input")):
                p.normal_(0, 0.3)
    return cn.eval()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from safetensors.torch import save_file

    root = new_store(tmp_path_factory, "flux-cn")
    pipe = tiny_flux_pipeline(0)
    pipe.save_pretrained(root / "models" / "tiny-flux")
    save_tiny_model("sd15", root / "models" / "tiny-sd15")
    cdir = root / "controlnet"
    cn = tiny_flux_controlnet(pipe.transformer, seed=1)
    cn.save_pretrained(cdir / "tiny-cn-flux")
    for sub in ("flux", "sd3"):
        (cdir / sub).mkdir()
    # the published single files: the same tensors, diffusers' names
    save_file({k: v.contiguous() for k, v in cn.state_dict().items()}, str(cdir / "flux" / "cn_flux_single.safetensors"))
    union = tiny_flux_controlnet(pipe.transformer, seed=2, num_mode=7)
    union.save_pretrained(cdir / "tiny-union-flux")
    save_file({k: v.contiguous() for k, v in union.state_dict().items()},
              str(cdir / "flux" / "union_flux_single.safetensors"))
    # XLabs' layout (BFL's block names, its own hint encoder): listed, not read
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4), "input_hint_block.0.weight":
               torch.zeros(16, 3, 3, 3)}, str(cdir / "flux" / "flux-canny-controlnet-v3.safetensors"))
    sd3 = tiny_sd3_pipeline(0)
    sd3.save_pretrained(root / "models" / "tiny-sd3")
    cn3 = tiny_sd3_controlnet(sd3.transformer, seed=3)
    cn3.save_pretrained(cdir / "tiny-cn-sd3")
    save_file({k: v.contiguous() for k, v in cn3.state_dict().items()}, str(cdir / "sd3" / "cn_sd3_single.safetensors"))
    cn35 = tiny_sd3_controlnet(sd3.transformer, seed=4, sd35=True)
    cn35.save_pretrained(cdir / "tiny-cn-sd35")
    save_file({k: v.contiguous() for k, v in cn35.state_dict().items()},
              str(cdir / "sd3" / "cn_sd35_single.safetensors"))
    return root


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    yield from serve(store, tmp_path_factory, "flux-cn-work", "tiny-flux")


def unit(**kw):
    return {"model": "tiny-cn-flux", "image": png(control_image()), **kw}


def test_listed_as_flux1_controlnets(server):
    got = {c["name"]: c for c in server.client.get("/controlnets").json()["controlnets"]}
    assert (got["tiny-cn-flux"]["family"], got["tiny-cn-flux"]["kind"]) == ("flux1", "controlnet")
    assert (got["flux/cn_flux_single"]["family"], got["flux/cn_flux_single"]["format"]) == ("flux1", "single-file")
    assert (got["tiny-union-flux"]["family"], got["tiny-union-flux"]["kind"]) == ("flux1", "controlnet-union")
    assert got["flux/union_flux_single"]["kind"] == "controlnet-union"
    xlabs = got["flux/flux-canny-controlnet-v3"]
    assert xlabs["family"] == "flux1" and "XLabs" in xlabs["error"]


def test_a_unit_changes_the_image_weight_0_does_not_and_the_single_file_is_the_folder(server):
    plain = px(server.run(**SMALL))
    on = px(server.run(**SMALL, controlnets=[unit()]))
    assert np.abs(on - plain).mean() > 1
    assert np.array_equal(px(server.run(**SMALL, controlnets=[unit(weight=0)])), plain)
    assert np.array_equal(px(server.run(**SMALL, controlnets=[unit(model="cn_flux_single")])), on)
    half = px(server.run(**SMALL, controlnets=[unit(weight=0.5)]))
    assert not np.array_equal(half, on) and not np.array_equal(half, plain)
    other = px(server.run(**SMALL, controlnets=[unit(image=png(control_image(seed=5)))]))
    assert not np.array_equal(other, on)


def test_guidance_window_decides_the_steps(server):
    plain = px(server.run(**SMALL))
    full = px(server.run(**SMALL, controlnets=[unit()]))
    late = px(server.run(**SMALL, controlnets=[unit(guidance_start=0.5)]))
    assert not np.array_equal(late, full) and not np.array_equal(late, plain)
    # Steps 0-3 see 0, 0, 1, 2 of 4 (A1111's count): a window from 0.9 holds none of them.
    assert np.array_equal(px(server.run(**SMALL, controlnets=[unit(guidance_start=0.9)])), plain)


def test_equals_bare_diffusers_flux_controlnet_pipeline(server, store, monkeypatch):
    """Euler + Simple is FluxControlNetPipeline: same noise, sigmas, guidance and control latents
    (the pipeline samples the VAE posterior of the control image; here it takes its mode, as
    the engine does)."""
    import functools

    import diffusers.pipelines.flux.pipeline_flux_controlnet as fcn
    from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxPipeline

    ours = px(server.run(**SMALL, controlnets=[unit(weight=0.8)]))
    monkeypatch.setattr(fcn, "retrieve_latents", functools.partial(fcn.retrieve_latents, sample_mode="argmax"))
    base = FluxPipeline.from_pretrained(store / "models" / "tiny-flux")
    pipe = FluxControlNetPipeline(**base.components,
                                  controlnet=FluxControlNetModel.from_pretrained(store / "controlnet" / "tiny-cn-flux"))
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(7))
    ref = pipe("a red cube", control_image=control_image(), controlnet_conditioning_scale=0.8, height=64, width=64,
               num_inference_steps=4, guidance_scale=3.5, latents=pipe._pack_latents(noise, 1, 16, 8, 8),
               output_type="np").images[0]
    ref = np.rint(ref * 255).astype(np.int16)
    plain = px(server.run(**SMALL))
    assert np.abs(ref - plain).mean() > 1  # (the reference is controlled too)
    assert np.abs(ours - ref).max() <= 3 and np.abs(ours - ref).mean() < 0.5


def test_union_modes(server):
    def run(kind):
        return px(server.run(**SMALL, controlnets=[unit(model="tiny-union-flux", union_control_type=kind)]))

    depth, canny = run("Depth"), run("canny")
    assert np.array_equal(depth, px(server.run(**SMALL, controlnets=[
        unit(model="union_flux_single", union_control_type="Depth")])))
    assert not np.array_equal(depth, canny) and not np.array_equal(depth, px(server.run(**SMALL)))
    for bad in ("Soft Edge", None):
        r = server.client.post("/txt2img", json={**SMALL, "controlnets": [
            unit(model="tiny-union-flux", union_control_type=bad)]})
        assert r.status_code == 422 and "controlnets.0.union_control_type" in r.text, r.text


def test_wrong_family_is_a_422(server):
    r = server.client.post("/txt2img", json={**SMALL, "model": "tiny-sd15", "controlnets": [unit()]})
    assert r.status_code == 422 and "controlnets.0.model" in r.text and "Flux" in r.text, r.text


def test_sdapi_alwayson_controlnet_on_flux(server):
    title = next(t for t in server.client.get("/controlnet/model_list").json()["model_list"]
                 if t.startswith("tiny-cn-flux ["))
    body = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 4, "seed": 7, "sampler_name": "Euler",
            "scheduler": "Simple", "cfg_scale": 1.0, "override_settings": {"sd_model_checkpoint": "tiny-flux"}}
    c = server.client
    args = {"enabled": True, "module": "none", "model": title, "weight": 1.0, "image": png(control_image()),
            "resize_mode": "Crop and Resize", "control_mode": "Balanced"}
    r = c.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [args]}}}, timeout=120)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert f"ControlNet 0: \"Module: none, Model: {title}" in info["infotexts"][0]
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")).astype(np.int16)
    assert np.array_equal(got, px(server.run(**SMALL, controlnets=[unit()])))


SMALL_SD3 = dict(SMALL, model="tiny-sd3", cfg_scale=4.5)


def test_sd3_units_change_the_image_weight_0_does_not_and_the_single_file_is_the_folder(server):
    got = {c["name"]: c for c in server.client.get("/controlnets").json()["controlnets"]}
    assert {got[n]["family"] for n in ("tiny-cn-sd3", "sd3/cn_sd3_single", "tiny-cn-sd35")} == {"sd3"}
    plain = px(server.run(**SMALL_SD3))
    on = px(server.run(**SMALL_SD3, controlnets=[unit(model="tiny-cn-sd3")]))
    assert np.abs(on - plain).mean() > 1
    assert np.array_equal(px(server.run(**SMALL_SD3, controlnets=[unit(model="tiny-cn-sd3", weight=0)])), plain)
    assert np.array_equal(px(server.run(**SMALL_SD3, controlnets=[unit(model="cn_sd3_single")])), on)
    sd35 = px(server.run(**SMALL_SD3, controlnets=[unit(model="tiny-cn-sd35")]))
    assert np.array_equal(px(server.run(**SMALL_SD3, controlnets=[unit(model="cn_sd35_single")])), sd35)
    both = px(server.run(**SMALL_SD3, controlnets=[unit(model="tiny-cn-sd3"), unit(model="tiny-cn-sd35")]))
    assert not np.array_equal(both, on) and not np.array_equal(both, sd35)
    # "ControlNet is more important": the negative pass runs without control
    assert not np.array_equal(px(server.run(**SMALL_SD3, controlnets=[
        unit(model="tiny-cn-sd3", control_mode="ControlNet is more important")])), on)


@pytest.mark.parametrize("name", ["tiny-cn-sd3", "tiny-cn-sd35"])
def test_equals_bare_diffusers_sd3_controlnet_pipeline(server, store, monkeypatch, name):
    """Euler + Simple with CFG is StableDiffusion3ControlNetPipeline given the Simple sigmas (the
    pipeline samples the VAE posterior of the control image; here it takes its mode, as the
    engine does)."""
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline, StableDiffusion3Pipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    ours = px(server.run(**SMALL_SD3, controlnets=[unit(model=name, weight=0.8)]))
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    base = StableDiffusion3Pipeline.from_pretrained(store / "models" / "tiny-sd3")
    pipe = StableDiffusion3ControlNetPipeline(**base.components,
                                              controlnet=SD3ControlNetModel.from_pretrained(store / "controlnet" / name))
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(7))
    ref = pipe("a red cube", control_image=control_image(), controlnet_conditioning_scale=0.8, height=64, width=64,
               num_inference_steps=4, guidance_scale=4.5, latents=noise, sigmas=list(np.linspace(1.0, 1 / 4, 4)),
               output_type="np").images[0]
    ref = np.rint(ref * 255).astype(np.int16)
    assert np.abs(ref - px(server.run(**SMALL_SD3))).mean() > 1  # (the reference is controlled too)
    assert np.abs(ours - ref).max() <= 3 and np.abs(ours - ref).mean() < 0.5
