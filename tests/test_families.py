"""Model families (diffusionapi/families): detection from files, SD 2.x, v-prediction /
zero-terminal-SNR SDXL single files, CFG rescale; through HTTP on tiny models."""
from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionapi.demo import tiny_sd2_pipeline, tiny_sdxl_pipeline
from diffusionapi.families import (BY_ID, FAMILIES, UnknownFamily, detect_checkpoint_keys, detect_folder,
                                   detect_single_file)
from diffusionapi.images import read_infotext

from .checkpoint_factory import openclip_to_original, save_original_checkpoint, unet_to_original, vae_to_original
from .conftest import SMALL, LiveServer, make_settings


def px(r):
    assert r["state"] == "done", r
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r["image"]))))


def _save_tensors(path, names):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: torch.zeros(2) for n in names}, str(path))
    return path


def _with_markers(src, dst, *markers):
    """``src``'s tensors plus NoobAI-style empty marker tensors (``v_pred``, ``ztsnr``)."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(src))
    sd.update({m: torch.zeros(0) for m in markers})
    save_file(sd, str(dst))


def _scheduler(cfg_dir, **changes):
    f = cfg_dir / "scheduler" / "scheduler_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}, indent=2))


def save_sd2_checkpoint(pipe, target):
    """An SD 2.x original-layout file: OpenCLIP text encoder under cond_stage_model.model."""
    from safetensors.torch import save_file

    sd = {}
    sd.update(unet_to_original(pipe.unet.state_dict(), pipe.unet.config))
    sd.update(vae_to_original(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
    sd.update(openclip_to_original(pipe.text_encoder.state_dict(), "cond_stage_model.model."))
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(target))
    tmp = target.with_name(target.stem + ".full")
    pipe.save_pretrained(tmp)
    shutil.copytree(tmp, target.with_name(target.stem + ".config"), ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.rmtree(tmp)
    return target


# ---------------------------------------------------------------------------- detection, no server

def test_table_has_one_spec_per_family_id():
    assert [f.id for f in FAMILIES] == ["qwen-image-edit", "flux1-kontext", "qwen-image", "z-image", "chroma", "flux2",
                                        "flux1-fill", "flux1", "sd3", "sdxl", "sdxl-refiner", "sd2", "sd15"]
    assert BY_ID["sdxl"].size == 1024 and BY_ID["sd15"].size == 512 and BY_ID["sd2"].size == 768
    assert BY_ID["flux1"].latent_channels == 16 and BY_ID["flux1"].prediction == "flow"
    assert not BY_ID["flux1"].single_files and not BY_ID["sd3"].single_files  # single files load (test_flow_files)


@pytest.mark.parametrize("keys, family", [
    ({"model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.x"}, "sd15"),
    ({"model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.token_embedding.weight"}, "sd2"),
    ({"model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.1.model.ln_final.weight"}, "sdxl"),
    ({"model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.model.ln_final.weight"},
     "sdxl-refiner"),
    ({"double_blocks.0.img_attn.norm.key_norm.scale", "single_blocks.0.linear1.weight"}, "flux1"),
    # BFL's Flux blocks carry img_mod / txt_mod too (Qwen-Image's rule must not take them)
    ({"double_blocks.0.img_mod.lin.weight", "double_blocks.0.txt_mod.lin.weight", "single_blocks.0.linear1.weight"},
     "flux1"),
    ({"model.diffusion_model.transformer_blocks.0.img_mod.1.weight",
      "model.diffusion_model.transformer_blocks.0.txt_mod.1.weight"}, "qwen-image"),
    ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "vae.decoder.conv_in.weight"}, "flux1"),
    ({"single_transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.add_k_proj.weight"}, "flux1"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"}, "sd3"),
    ({"transformer_blocks.0.attn.add_k_proj.weight", "pos_embed.pos_embed"}, "sd3"),
])
def test_checkpoint_keys_decide_the_family(keys, family):
    assert detect_checkpoint_keys(keys).family == family


def test_markers_make_v_prediction_and_ztsnr():
    base = {"model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.1.model.ln_final.weight"}
    assert detect_checkpoint_keys(base).prediction == "epsilon"
    v = detect_checkpoint_keys(base | {"v_pred"})
    assert (v.family, v.prediction, v.ztsnr) == ("sdxl", "v_prediction", False)
    vz = detect_checkpoint_keys(base | {"v_pred", "ztsnr"})
    assert (vz.prediction, vz.ztsnr) == ("v_prediction", True)


def test_a_file_of_no_family_is_named(tmp_path):
    f = _save_tensors(tmp_path / "lora-like.safetensors", ["lora_unet_down.lora_up.weight"])
    with pytest.raises(UnknownFamily, match="lora-like.safetensors"):
        detect_single_file(f)


def test_sd2_folders_read_prediction_from_the_scheduler(tmp_path):
    tiny_sd2_pipeline(0).save_pretrained(tmp_path / "eps")
    tiny_sd2_pipeline(0, "v_prediction").save_pretrained(tmp_path / "v")
    assert detect_folder(tmp_path / "eps").family == "sd2"
    assert (detect_folder(tmp_path / "eps").prediction, detect_folder(tmp_path / "v").prediction) == \
        ("epsilon", "v_prediction")


def test_sd2_single_file_v_prediction_from_the_last_norm_bias(tmp_path):
    """ComfyUI's rule for SD 2 files without a config: trained 768-v weights have a spread-out
    LayerNorm bias in the last output block's transformer."""
    pipe = tiny_sd2_pipeline(0)
    f = save_sd2_checkpoint(pipe, tmp_path / "sd2.safetensors")
    shutil.rmtree(tmp_path / "sd2.config")
    assert detect_single_file(f).prediction == "epsilon"
    with torch.no_grad():
        for block in pipe.unet.up_blocks:
            for attn in getattr(block, "attentions", []):
                attn.transformer_blocks[0].norm1.bias.normal_(0, 0.5)
    f2 = save_sd2_checkpoint(pipe, tmp_path / "sd2v.safetensors")
    shutil.rmtree(tmp_path / "sd2v.config")
    assert detect_single_file(f2).family == "sd2" and detect_single_file(f2).prediction == "v_prediction"


# ---------------------------------------------------------------------------- through HTTP

@pytest.fixture(scope="module")
def fam_server(model_store, tmp_path_factory):
    work = tmp_path_factory.mktemp("families")
    models = work / "models"
    shutil.copytree(model_store / "models", models)
    tiny_sd2_pipeline(0).save_pretrained(models / "tiny-sd2")
    tiny_sd2_pipeline(0, "v_prediction").save_pretrained(models / "tiny-sd2-v")
    save_sd2_checkpoint(tiny_sd2_pipeline(0, "v_prediction"), models / "single-sd2-v.safetensors")
    xl = tiny_sdxl_pipeline(3)
    eps = save_original_checkpoint(xl, models / "xl" / "xl-eps.safetensors")
    # The same weights with NoobAI's marker keys, and with an explicit v-prediction + zero-SNR config.
    _with_markers(eps, models / "xl" / "xl-vpred.safetensors", "v_pred", "ztsnr")
    shutil.copytree(models / "xl" / "xl-eps.config", models / "xl" / "xl-vpred.config")
    shutil.copy(eps, models / "xl" / "xl-vcfg.safetensors")
    shutil.copytree(models / "xl" / "xl-eps.config", models / "xl" / "xl-vcfg.config")
    _scheduler(models / "xl" / "xl-vcfg.config", prediction_type="v_prediction", rescale_betas_zero_snr=True)
    _save_tensors(models / "flux" / "flux-dev-like.safetensors",
                  ["double_blocks.0.img_attn.norm.key_norm.scale", "guidance_in.in_layer.weight"])
    _save_tensors(models / "sd35-like.safetensors", ["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"])
    settings = make_settings(model_store, work, models_dir=models)
    with LiveServer(settings) as s:
        yield s


def test_models_list_family_prediction_and_ztsnr(fam_server):
    models = {m["name"]: m for m in fam_server.client.get("/models").json()["models"]}
    assert models["tiny-sd15"]["family"] == "sd15" and models["tiny-sd15"]["type"] == "sd15"
    assert models["tiny-sdxl"]["family"] == "sdxl" and models["tiny-sdxl-refiner"]["family"] == "sdxl-refiner"
    assert (models["tiny-sd2"]["family"], models["tiny-sd2"]["prediction"]) == ("sd2", "epsilon")
    assert (models["tiny-sd2-v"]["family"], models["tiny-sd2-v"]["prediction"]) == ("sd2", "v_prediction")
    assert models["single-sd2-v"]["prediction"] == "v_prediction"  # its config folder says so
    assert (models["xl-eps"]["prediction"], models["xl-eps"]["ztsnr"]) == ("epsilon", False)
    assert (models["xl-vpred"]["prediction"], models["xl-vpred"]["ztsnr"]) == ("v_prediction", True)
    assert (models["xl-vcfg"]["prediction"], models["xl-vcfg"]["ztsnr"]) == ("v_prediction", True)
    assert (models["flux-dev-like"]["family"], models["sd35-like"]["family"]) == ("flux1", "sd3")
    sd = {m["model_name"]: m for m in fam_server.client.get("/sdapi/v1/sd-models").json()}
    assert (sd["xl-vpred"]["family"], sd["xl-vpred"]["prediction"], sd["xl-vpred"]["ztsnr"]) == \
        ("sdxl", "v_prediction", True)
    assert sd["tiny-sd2-v"]["family"] == "sd2"


@pytest.mark.parametrize("name", ["flux-dev-like", "sd35-like"])
def test_transformer_files_without_their_components_are_a_422_naming_what_to_add(fam_server, name):
    r = fam_server.client.post("/txt2img", json=dict(SMALL, model=name))
    assert r.status_code == 422, r.text
    assert name in r.text and "modules" in r.text and "clip_l.safetensors" in r.text and "text_encoders" in r.text


def test_vpred_markers_change_the_image_and_equal_an_explicit_config(fam_server):
    p = dict(SMALL, seed=11, fileType="png", steps=5, cfg_scale=5.0)
    eps = px(fam_server.run(**p, model="xl-eps"))
    configured = px(fam_server.run(**p, model="xl-vcfg"))
    marked = px(fam_server.run(**p, model="xl-vpred"))
    assert not np.array_equal(eps, marked)
    assert np.array_equal(marked, configured)
    loaded = fam_server.engine.cache._items["xl-vpred"]
    assert loaded.prediction_type == "v_prediction" and loaded.ztsnr
    assert loaded.sigmas.sigma_max > 4000  # zero terminal SNR, capped as A1111 and ComfyUI do


@pytest.mark.parametrize("sampler, schedule", [("Euler a", "karras"), ("DPM++ 2M", "default"), ("DDIM", None),
                                               ("UniPC", None)])
def test_ztsnr_vpred_runs_every_sampler_kind(fam_server, sampler, schedule):
    p = dict(SMALL, seed=2, fileType="png", steps=4, model="xl-vpred", sampler_name=sampler)
    if schedule:
        p["scheduler_type"] = schedule
    img = px(fam_server.run(**p))
    assert np.isfinite(img).all() and img.std() > 0


def test_sd2_v_and_epsilon_differ_and_single_file_equals_folder(fam_server):
    p = dict(SMALL, seed=4, fileType="png")
    eps, v = px(fam_server.run(**p, model="tiny-sd2")), px(fam_server.run(**p, model="tiny-sd2-v"))
    assert not np.array_equal(eps, v)
    assert np.array_equal(v, px(fam_server.run(**p, model="single-sd2-v")))


def test_cfg_rescale_changes_the_image_and_is_in_the_infotext(fam_server):
    p = dict(SMALL, seed=6, fileType="png", model="xl-vpred", cfg_scale=9.0)
    plain = fam_server.run(**p)
    rescaled = fam_server.run(**p, cfg_rescale=0.7)
    assert not np.array_equal(px(plain), px(rescaled))
    assert rescaled["payload"]["cfg_rescale"] == 0.7
    info = read_infotext(base64.b64decode(rescaled["image"]))
    assert "RescaleCFG: 0.7" in info and "RescaleCFG" not in read_infotext(base64.b64decode(plain["image"]))
    r = fam_server.client.post("/txt2img", json=dict(p, cfg_rescale=1.5))
    assert r.status_code == 422 and "cfg_rescale" in r.text


def test_sdapi_rescale_cfg_equals_the_native_field(fam_server):
    body = dict(prompt="a tiny test", width=64, height=64, steps=4, seed=6, cfg_scale=9.0, sampler_name="Euler",
                override_settings={"sd_model_checkpoint": "xl-vpred"})
    native = px(fam_server.run(**dict(SMALL, seed=6, fileType="png", model="xl-vpred", cfg_scale=9.0,
                                      sampler_name="Euler", cfg_rescale=0.7)))
    for extra in ({"rescale_cfg": 0.7}, {"override_settings": {**body["override_settings"], "rescale_cfg": 0.7}}):
        r = fam_server.client.post("/sdapi/v1/txt2img", json={**body, **extra})
        assert r.status_code == 200, r.text
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
        assert np.array_equal(img, native)
    bad = fam_server.client.post("/sdapi/v1/txt2img", json={**body, "rescale_cfg": "lots"})
    assert bad.status_code == 422 and "rescale_cfg" in bad.text
