"""ControlNet through HTTP on tiny random models: native units, preprocessors, files in every layout.

The ControlNets are built in code from the tiny UNets (tests/controlnet_factory.py) and saved as a
diffusers folder and as single files (lllyasviel's original layout, .safetensors and .pth, and a
diffusers-layout .safetensors); everything runs the real diffusers models in the real server.
"""
from __future__ import annotations

import base64
import io
import json
import time

import shutil

import numpy as np
import pytest
import torch
from diffusers import T2IAdapter, UNet2DConditionModel
from PIL import Image

from diffusionapi.demo import tiny_sd15_pipeline

from .conftest import LiveServer, make_settings
from .controlnet_factory import (control_image, png, save_diffusers_single_file, save_ldm,
                                 save_t2i_adapter_original, tiny_anime_lineart_file, tiny_clip_vision,
                                 tiny_control_lora, tiny_controlnet, tiny_depth_anything, tiny_hed_file,
                                 tiny_ip_adapter, tiny_ip_adapter_plus, tiny_lineart_file, tiny_openpose_body_file,
                                 tiny_union_controlnet)

SMALL = dict(prompt="a tiny test", width=64, height=64, steps=4, seed=7, fileType="png",
             sampler_name="Euler", scheduler_type="default")


@pytest.fixture(scope="module")
def cn_dirs(model_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("cn")
    cdir, adir = root / "controlnet", root / "annotators"
    adir.mkdir()
    sd15 = tiny_controlnet(model_store / "models" / "tiny-sd15" / "unet", seed=1)
    sd15.save_pretrained(cdir / "tiny-cn-sd15")
    save_ldm(sd15, cdir / "control_tiny_sd15.safetensors")                    # control_v11* layout
    save_ldm(sd15, cdir / "old" / "control_tiny_pth_sd15.pth", prefix="", fmt="pth")
    other = tiny_controlnet(model_store / "models" / "tiny-sd15" / "unet", seed=2)
    other.save_pretrained(cdir / "tiny-cn-sd15-b")
    xl = tiny_controlnet(model_store / "models" / "tiny-sdxl" / "unet", seed=3)
    xl.save_pretrained(cdir / "tiny-cn-sdxl")
    save_diffusers_single_file(xl, cdir / "xl" / "diffusers_xl_tiny.safetensors")  # SDXL downloads' layout
    (cdir / "broken.safetensors").write_bytes(b"\x00" * 16)
    union = tiny_union_controlnet(model_store / "models" / "tiny-sdxl" / "unet", seed=6)
    union.save_pretrained(cdir / "tiny-union-sdxl")
    save_diffusers_single_file(union, cdir / "xl" / "union_tiny_promax.safetensors")
    tiny_control_lora(model_store / "models" / "tiny-sd15" / "unet", cdir / "control-lora-tiny-rank2.safetensors",
                      cdir / "expected" / "control_lora_merged_sd15.safetensors", seed=7)
    tiny_control_lora(model_store / "models" / "tiny-sdxl" / "unet", cdir / "xl" / "control-lora-tiny-xl.safetensors",
                      cdir / "expected" / "control_lora_merged_sdxl.safetensors", seed=10)
    # annotators: tiny random networks in the published layouts (sk_model2.pth and the MiDaS folder left out)
    tiny_hed_file(adir / "ControlNetHED.pth")
    tiny_lineart_file(adir / "sk_model.pth")
    tiny_anime_lineart_file(adir / "netG.pth")
    tiny_openpose_body_file(adir / "body_pose_model.pth")
    tiny_depth_anything(adir / "depth-anything")
    (adir / "table5_pidinet.pth").write_bytes(b"present, but no network here runs it")
    # T2I-Adapters add their features inside the UNet's down blocks: a tiny SD 1.5 model whose
    # blocks sit where real SD 1.5's do (attention blocks first, the last one plain) takes them.
    models = root / "models"
    for name in ("tiny-sd15", "tiny-sdxl"):
        shutil.copytree(model_store / "models" / name, models / name)
    pipe = tiny_sd15_pipeline()
    torch.manual_seed(4)
    pipe.unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=32,
                                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                     norm_num_groups=8, attention_head_dim=4).eval()
    pipe.save_pretrained(models / "tiny-sd15-t2i")
    # SDXL's adapter ("full_adapter_xl", x16 down): its four features go after the plain first block,
    # into the two attention blocks and the middle, so the tiny SDXL UNet here has SDXL's block order.
    from diffusionapi.demo import SDXL_TE1, SDXL_TE2, SDXL_TIME_DIM, tiny_sdxl_pipeline

    xl_pipe = tiny_sdxl_pipeline()
    torch.manual_seed(8)
    xl_pipe.unet = UNet2DConditionModel(
        block_out_channels=(16, 32, 64), layers_per_block=1, sample_size=32, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
        cross_attention_dim=SDXL_TE1 + SDXL_TE2, addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_DIM + SDXL_TE2, transformer_layers_per_block=(1, 1, 1)).eval()
    xl_pipe.save_pretrained(models / "tiny-sdxl-t2i")
    torch.manual_seed(9)
    T2IAdapter(in_channels=3, channels=[16, 32, 64, 64], num_res_blocks=1, downscale_factor=16,
               adapter_type="full_adapter_xl").save_pretrained(cdir / "t2iadapter_tiny_sdxl")
    torch.manual_seed(5)
    adapter = T2IAdapter(in_channels=3, channels=[16, 32], num_res_blocks=1, downscale_factor=8,
                         adapter_type="full_adapter")
    adapter.save_pretrained(cdir / "t2iadapter_tiny_sd15")
    save_t2i_adapter_original(adapter, cdir / "t2i" / "t2iadapter_tiny_original_sd15.pth")
    save_diffusers_single_file(adapter, cdir / "t2i" / "t2iadapter_tiny_diffusers_sd15.safetensors")
    # IP-Adapters and their image encoder (folders next to models/, as stable_diffusion/ has them)
    tiny_clip_vision(root / "clip_vision" / "tiny-vit")
    tiny_ip_adapter(models / "tiny-sd15" / "unet", root / "ipadapter" / "ip-adapter_tiny_sd15.safetensors")
    tiny_ip_adapter(models / "tiny-sdxl" / "unet", root / "ipadapter" / "ip-adapter_tiny_sdxl.safetensors", seed=1)
    tiny_ip_adapter(models / "tiny-sd15" / "unet", root / "ipadapter" / "ip-adapter_no_encoder.safetensors",
                    image_dim=24)
    # h94's .bin layout: {"image_proj": {...}, "ip_adapter": {...}} (torch.save), the same weights
    from safetensors.torch import load_file

    flat = load_file(str(root / "ipadapter" / "ip-adapter_tiny_sd15.safetensors"))
    (root / "ipadapter" / "bin").mkdir()
    torch.save({part: {k[len(part) + 1:]: v for k, v in flat.items() if k.startswith(part + ".")}
                for part in ("image_proj", "ip_adapter")}, root / "ipadapter" / "bin" / "ip-adapter_tiny_bin_sd15.bin")
    tiny_ip_adapter_plus(models / "tiny-sd15" / "unet", root / "ipadapter" / "ip-adapter-plus_tiny_sd15.safetensors",
                         seed=2)
    return cdir, adir, models


@pytest.fixture(scope="module")
def cn_server(model_store, cn_dirs, tmp_path_factory):
    cdir, adir, models = cn_dirs
    settings = make_settings(model_store, tmp_path_factory.mktemp("work"), controlnet_dir=cdir, annotators_dir=adir,
                             models_dir=models)
    with LiveServer(settings) as s:
        yield s


def pixels(body: dict, k: int = 0) -> np.ndarray:
    data = body["images"][k]["image"] if k else body["image"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")).astype(int)


def run(server, path="/txt2img", **payload) -> dict:
    r = server.client.post(path, json={**SMALL, **payload})
    assert r.status_code == 200, r.text
    body = server.wait(r.json()["job_id"])
    assert body["state"] == "done", body
    return body


def unit(model="tiny-cn-sd15", **kw) -> dict:
    return {"model": model, "image": png(control_image()), **kw}


# ---------------------------------------------------------------------------- listings

def test_controlnets_are_listed_with_family_and_format_read_from_the_files(cn_server):
    got = {c["name"]: c for c in cn_server.client.get("/controlnets").json()["controlnets"]}
    assert {k: (v["family"], v["format"]) for k, v in got.items() if "error" not in v} == {
        "tiny-cn-sd15": ("sd15", "diffusers"), "tiny-cn-sd15-b": ("sd15", "diffusers"),
        "control_tiny_sd15": ("sd15", "single-file"), "old/control_tiny_pth_sd15": ("sd15", "single-file"),
        "tiny-cn-sdxl": ("sdxl", "diffusers"), "xl/diffusers_xl_tiny": ("sdxl", "single-file"),
        "t2iadapter_tiny_sd15": ("sd15", "diffusers"), "t2i/t2iadapter_tiny_original_sd15": ("sd15", "single-file"),
        "t2i/t2iadapter_tiny_diffusers_sd15": ("sd15", "single-file"), "t2iadapter_tiny_sdxl": ("sdxl", "diffusers"), "tiny-union-sdxl": ("sdxl", "diffusers"),
        "xl/union_tiny_promax": ("sdxl", "single-file"), "control-lora-tiny-rank2": ("sd15", "single-file"),
        "expected/control_lora_merged_sd15": ("sd15", "single-file"), "xl/control-lora-tiny-xl": ("sdxl", "single-file"),
        "expected/control_lora_merged_sdxl": ("sdxl", "single-file")}
    assert got["t2iadapter_tiny_sd15"]["kind"] == "t2i-adapter"
    assert got["tiny-union-sdxl"]["kind"] == got["xl/union_tiny_promax"]["kind"] == "controlnet-union"
    assert got["control-lora-tiny-rank2"]["kind"] == "control-lora"
    assert "unreadable" in got["broken"]["error"]
    assert got["tiny-cn-sd15"]["title"] == f"tiny-cn-sd15 [{got['tiny-cn-sd15']['title'][-9:-1]}]"


def test_preprocessors_say_which_run_and_which_file_a_networked_one_needs(cn_server):
    got = {p["name"]: p for p in cn_server.client.get("/preprocessors").json()["preprocessors"]}
    for name in ("none", "invert", "canny", "threshold", "blur_gaussian", "tile_resample", "t2ia_color_grid",
                 "shuffle", "scribble_xdog", "lineart_standard", "inpaint", "inpaint_only"):
        assert got[name]["available"], name
    assert not got["depth_midas"]["available"] and "dpt-hybrid-midas/" in got["depth_midas"]["reason"]
    for name in ("softedge_hed", "scribble_hed", "lineart_realistic", "lineart_anime", "depth_anything",
                 "openpose"):  # their files are there
        assert got[name]["available"], name
    assert "sk_model2.pth" in got["lineart_coarse"]["reason"]
    assert "cannot run that network yet" in got["softedge_pidinet"]["reason"]
    assert [s["name"] for s in got["canny"]["sliders"]] == ["Resolution", "Canny Low Threshold",
                                                            "Canny High Threshold"]


# ---------------------------------------------------------------------------- generation

def test_a_unit_changes_the_image_weight_zero_does_not_and_two_units_differ_from_one(cn_server):
    plain = pixels(run(cn_server))
    one = run(cn_server, controlnets=[unit()])
    assert np.abs(pixels(one) - plain).mean() > 1.0
    assert np.array_equal(pixels(run(cn_server, controlnets=[unit(weight=0)])), plain)
    half = pixels(run(cn_server, controlnets=[unit(weight=0.5)]))
    assert not np.array_equal(half, plain) and not np.array_equal(half, pixels(one))
    two = pixels(run(cn_server, controlnets=[unit(), unit("tiny-cn-sd15-b")]))
    assert np.abs(two - pixels(one)).mean() > 1.0
    # the payload echo describes the unit's image; the infotext carries the unit as the extension writes it
    echo = one["payload"]["controlnets"][0]
    assert echo["image"] == "<PNG 64x64>" and echo["model"] == "tiny-cn-sd15"
    assert 'ControlNet 0: "Module: none, Model: tiny-cn-sd15 [' in one["infotext"]


@pytest.mark.parametrize("name", ["control_tiny_sd15", "old/control_tiny_pth_sd15", "control_tiny_sd15 [deadbeef]"])
def test_single_files_in_the_original_layout_give_the_folders_image(cn_server, name):
    # Same weights saved three ways: the single-file path (key conversion, config read from the
    # tensors and the base UNet) must rebuild exactly the model the diffusers folder holds.
    folder = pixels(run(cn_server, controlnets=[unit()]))
    assert np.array_equal(pixels(run(cn_server, controlnets=[unit(name)])), folder)


def test_sdxl_units_folder_and_diffusers_single_file(cn_server):
    base = dict(model="tiny-sdxl")
    plain = pixels(run(cn_server, **base))
    folder = pixels(run(cn_server, **base, controlnets=[unit("tiny-cn-sdxl")]))
    assert np.abs(folder - plain).mean() > 1.0
    assert np.array_equal(pixels(run(cn_server, **base, controlnets=[unit("xl/diffusers_xl_tiny")])), folder)


def test_union_controlnet_takes_its_control_type_from_the_module_or_the_unit(cn_server):
    base = dict(model="tiny-sdxl")
    plain = pixels(run(cn_server, **base))
    union = "tiny-union-sdxl"
    canny = pixels(run(cn_server, **base, controlnets=[unit(union, preprocessor="canny")]))
    assert np.abs(canny - plain).mean() > 1.0
    assert np.array_equal(pixels(run(cn_server, **base, controlnets=[unit(union, preprocessor="canny", weight=0)])),
                          plain)
    # the same map told to be another type is another control
    as_hard_edge = pixels(run(cn_server, **base, controlnets=[unit(union, union_control_type="Canny / Lineart / MLSD")]))
    as_depth = pixels(run(cn_server, **base, controlnets=[unit(union, union_control_type="depth")]))
    assert not np.array_equal(as_hard_edge, as_depth)
    assert np.array_equal(pixels(run(cn_server, **base, controlnets=[unit(union, union_control_type=3)])), as_hard_edge)
    # the diffusers-layout single file is the same model
    assert np.array_equal(pixels(run(cn_server, **base, controlnets=[unit("xl/union_tiny_promax",
                                                                         union_control_type=1)])), as_depth)
    r = cn_server.client.post("/txt2img", json={**SMALL, **base, "controlnets": [unit(union)]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][1:4] == ["controlnets", "0", "union_control_type"]
    assert "Depth" in r.json()["error"]
    r = cn_server.client.post("/txt2img", json={**SMALL, **base, "controlnets": [unit(union, union_control_type="x")]})
    assert r.status_code == 422 and "valid choices" in r.json()["error"]


def test_control_lora_is_the_base_unets_controlnet_plus_its_diffs(cn_server):
    plain = pixels(run(cn_server))
    on = pixels(run(cn_server, controlnets=[unit("control-lora-tiny-rank2")]))
    assert np.abs(on - plain).mean() > 1.0
    assert np.array_equal(pixels(run(cn_server, controlnets=[unit("control-lora-tiny-rank2", weight=0)])), plain)
    # the ControlNet it means, merged in the test (UNet weight + up @ down) and saved in full: the same image
    assert np.array_equal(pixels(run(cn_server, controlnets=[unit("expected/control_lora_merged_sd15")])), on)
    r = cn_server.client.post("/txt2img", json={**SMALL, "model": "tiny-sdxl",
                                                 "controlnets": [unit("control-lora-tiny-rank2")]})
    assert r.status_code == 422 and "is for SD 1.5" in r.json()["error"]
    # SDXL (Stability's Control-LoRAs are SDXL ones): the micro-conditioning embedding is a diff too
    xl_plain = pixels(run(cn_server, model="tiny-sdxl"))
    xl_on = pixels(run(cn_server, model="tiny-sdxl", controlnets=[unit("control-lora-tiny-xl")]))
    assert np.abs(xl_on - xl_plain).mean() > 1.0
    assert np.array_equal(pixels(run(cn_server, model="tiny-sdxl",
                                     controlnets=[unit("expected/control_lora_merged_sdxl")])), xl_on)


def test_a_control_lora_is_built_per_base_unet_not_per_config(cn_dirs, model_store):
    """Two checkpoints of one architecture share a UNet config; a Control-LoRA built from one must
    not serve the other, even when the new UNet object reuses the old one's id."""
    from diffusionapi.engine.controlnet.files import ControlNetFiles
    from diffusionapi.engine.controlnet.loading import ControlNetCache

    cdir, adir, models = cn_dirs
    entry = ControlNetFiles(make_settings(model_store, cdir.parent / "w", controlnet_dir=cdir,
                                          models_dir=models)).resolve("control-lora-tiny-rank2")
    first = UNet2DConditionModel.from_pretrained(str(models / "tiny-sd15" / "unet")).eval()
    second = UNet2DConditionModel.from_pretrained(str(models / "tiny-sd15" / "unet")).eval()
    with torch.no_grad():
        second.conv_in.weight.add_(0.5)
    cache = ControlNetCache()
    a = cache.get(entry, first, "cpu")
    assert cache.get(entry, first, "cpu") is a and cache.loads == 1
    b = cache.get(entry, second, "cpu")
    assert b is not a and not torch.equal(a.conv_in.weight, b.conv_in.weight)
    key = next(k for k, m in cache._items.items() if m is a)
    cache._bases[key] = lambda: None  # as if ``first`` had gone and a new UNet had its id
    assert cache.get(entry, first, "cpu") is not a and cache.loads == 3


def test_t2i_adapter_unit_changes_the_image_and_respects_weight_and_window(cn_server):
    base = dict(model="tiny-sd15-t2i")
    plain = pixels(run(cn_server, **base))
    t2i = "t2iadapter_tiny_sd15"
    on = pixels(run(cn_server, **base, controlnets=[unit(t2i, preprocessor="t2ia_color_grid")]))
    assert np.abs(on - plain).mean() > 1.0
    assert np.array_equal(pixels(run(cn_server, **base, controlnets=[unit(t2i, weight=0)])), plain)
    late = pixels(run(cn_server, **base, controlnets=[unit(t2i, guidance_start=0.5)]))
    assert not np.array_equal(late, plain) and not np.array_equal(late, pixels(run(cn_server, **base,
                                                                                      controlnets=[unit(t2i)])))
    soft = pixels(run(cn_server, **base, controlnets=[unit(t2i, control_mode=1)]))
    assert not np.array_equal(soft, on)
    # the same adapter as single files: TencentARC's original layout (.pth) and diffusers' (.safetensors)
    for name in ("t2i/t2iadapter_tiny_original_sd15", "t2iadapter_tiny_diffusers_sd15"):
        assert np.array_equal(pixels(run(cn_server, **base, controlnets=[unit(name, preprocessor="t2ia_color_grid")])),
                              on), name


def test_sdxl_t2i_adapter_unit_changes_the_image_and_weight_zero_does_not(cn_server):
    base = dict(model="tiny-sdxl-t2i")
    plain = pixels(run(cn_server, **base))
    t2i = "t2iadapter_tiny_sdxl"
    on = pixels(run(cn_server, **base, controlnets=[unit(t2i, preprocessor="canny")]))
    assert np.abs(on - plain).mean() > 1.0
    assert np.array_equal(pixels(run(cn_server, **base, controlnets=[unit(t2i, weight=0)])), plain)
    assert not np.array_equal(pixels(run(cn_server, **base, controlnets=[unit(t2i, weight=0.5)])), on)
    r = cn_server.client.post("/txt2img", json={**SMALL, "controlnets": [unit(t2i)]})
    assert r.status_code == 422 and "is for SDXL" in r.json()["error"]


def test_ip_adapter_changes_the_image_and_leaves_the_unet_as_it_was(cn_server):
    plain = pixels(run(cn_server))
    ref = [png(control_image(seed=11))]
    body = run(cn_server, ip_adapters=[{"model": "ip-adapter_tiny_sd15", "images": ref}])
    on = pixels(body)
    assert np.abs(on - plain).mean() > 1.0
    assert 'IP-Adapter 0: "Model: ip-adapter_tiny_sd15, Weight: 1.0' in body["infotext"]
    assert body["payload"]["ip_adapters"][0]["images"] == ["<PNG 64x64>"]
    assert np.array_equal(pixels(run(cn_server)), plain)  # the adapter's layers left the resident UNet
    # the same weights in h94's .bin layout
    assert np.array_equal(pixels(run(cn_server, ip_adapters=[{"model": "ip-adapter_tiny_bin_sd15", "images": ref}])), on)
    assert np.array_equal(pixels(run(cn_server, ip_adapters=[{"model": "ip-adapter_tiny_sd15", "images": ref,
                                                              "weight": 0}])), plain)
    late = pixels(run(cn_server, ip_adapters=[{"model": "ip-adapter_tiny_sd15", "images": ref,
                                               "guidance_start": 0.5}]))
    assert not np.array_equal(late, on) and not np.array_equal(late, plain)
    both = pixels(run(cn_server, controlnets=[unit()], ip_adapters=[{"model": "ip-adapter_tiny_sd15", "images": ref}]))
    assert not np.array_equal(both, on)


def test_ip_adapter_plus_resampler_tokens_change_the_image(cn_server):
    plain = pixels(run(cn_server))
    ref = [png(control_image(seed=11))]
    plus = {"model": "ip-adapter-plus_tiny_sd15", "images": ref}
    on = pixels(run(cn_server, ip_adapters=[plus]))
    assert np.abs(on - plain).mean() > 1.0
    assert not np.array_equal(on, pixels(run(cn_server, ip_adapters=[{**plus, "model": "ip-adapter_tiny_sd15"}])))
    assert not np.array_equal(on, pixels(run(cn_server, ip_adapters=[{**plus, "images": [png(control_image(seed=12))]}])))
    assert np.array_equal(pixels(run(cn_server, ip_adapters=[{**plus, "weight": 0}])), plain)
    assert np.array_equal(pixels(run(cn_server)), plain)  # its layers left the resident UNet
    listed = {a["name"]: a for a in cn_server.client.get("/ipadapters").json()["ip_adapters"]}
    assert listed["ip-adapter-plus_tiny_sd15"]["image_encoder"] == "tiny-vit"
    assert (listed["ip-adapter-plus_tiny_sd15"]["variant"], listed["ip-adapter-plus_tiny_sd15"]["tokens"]) == ("plus", 8)


def test_ip_adapter_sdxl_and_as_an_a1111_unit(cn_server):
    ref = [png(control_image(seed=11))]
    plain = pixels(run(cn_server, model="tiny-sdxl"))
    on = pixels(run(cn_server, model="tiny-sdxl", ip_adapters=[{"model": "ip-adapter_tiny_sdxl", "images": ref}]))
    assert np.abs(on - plain).mean() > 1.0
    title = next(t for t in cn_server.client.get("/controlnet/model_list").json()["model_list"]
                 if t.startswith("ip-adapter_tiny_sd15 ["))
    r = cn_server.client.post("/sdapi/v1/txt2img", json={
        "prompt": "x", "width": 64, "height": 64, "steps": 4, "seed": 5, "sampler_name": "Euler",
        "alwayson_scripts": {"ControlNet": {"args": [{"enabled": True, "module": "ip-adapter_clip_sd15",
                                                      "model": title, "image": ref[0], "weight": 0.7}]}}}, timeout=120)
    assert r.status_code == 200, r.text
    assert 'IP-Adapter 0: "Model: ip-adapter_tiny_sd15, Weight: 0.7' in \
        json.loads(r.json()["info"])["infotexts"][0]


@pytest.mark.parametrize("payload, words", [
    ({"ip_adapters": [{"model": "ip-adapter_no_encoder", "images": ["x"]}]}, "projection_dim 24"),
    ({"model": "tiny-sdxl", "ip_adapters": [{"model": "ip-adapter_tiny_sd15", "images": ["x"]}]}, "is for"),
    ({"ip_adapters": [{"model": "nope", "images": ["x"]}]}, "unknown IP-Adapter 'nope'"),
])
def test_bad_ip_adapters_are_422_naming_the_field(cn_server, payload, words):
    r = cn_server.client.post("/txt2img", json={**SMALL, **payload})
    assert r.status_code == 422 and words in r.json()["error"], r.text
    assert r.json()["detail"][0]["loc"][1:4] == ["ip_adapters", "0", "model"]


def test_control_modes_are_three_different_things(cn_server):
    imgs = [pixels(run(cn_server, controlnets=[unit(control_mode=m)])) for m in (0, 1, 2)]
    assert not np.array_equal(imgs[0], imgs[1]) and not np.array_equal(imgs[1], imgs[2]) \
        and not np.array_equal(imgs[0], imgs[2])
    # names and numbers mean the same
    assert np.array_equal(pixels(run(cn_server, controlnets=[unit(control_mode="My prompt is more important")])),
                          imgs[1])


def test_hires_option_picks_the_passes_a_unit_guides(cn_server):
    hires = {"enabled": True, "scale": 1.5, "upscaler": "Latent", "steps": 2, "denoising_strength": 0.5}
    plain = pixels(run(cn_server, hires=hires))
    imgs = {opt: pixels(run(cn_server, hires=hires, controlnets=[unit(hires=opt)])) for opt in ("both", "low", "high")}
    assert imgs["both"].shape == (96, 96, 3)
    for a, b in (("both", "low"), ("both", "high"), ("low", "high")):
        assert not np.array_equal(imgs[a], imgs[b]), (a, b)
    assert all(not np.array_equal(im, plain) for im in imgs.values())


def _counting(cn_server, name="tiny-cn-sd15"):
    """A forward hook on the resident ControlNet: how many evaluations it ran in (observes, changes nothing)."""
    run(cn_server, controlnets=[unit(name)])  # loads it
    # the most recently used entry for that file (older ones were built for a since-reloaded UNet)
    models = [m for key, m in cn_server.engine.controlnets._items.items() if key[0].endswith("/" + name)]
    calls = []
    handle = models[-1].register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("sampler", ["Euler", "DDIM", "Heun"])
def test_guidance_start_and_end_choose_the_steps_as_the_extension_counts_them(cn_server, sampler):
    calls, handle = _counting(cn_server)
    try:
        steps, start, end = 10, 0.2, 0.5
        run(cn_server, steps=steps, sampler_name=sampler, controlnets=[unit(guidance_start=start, guidance_end=end)])
    finally:
        handle.remove()
    # A1111: state.sampling_step is 0 until the callback after step i sets it to i, so the
    # evaluations of step i see max(i - 1, 0); the unit is on when start <= that / steps <= end.
    on = [i for i in range(steps) if start <= max(i - 1, 0) / steps <= end]
    assert on == [3, 4, 5, 6]
    evals_per_step = {"Euler": [1] * steps, "DDIM": [1] * steps, "Heun": [2] * (steps - 1) + [1]}[sampler]
    assert len(calls) == sum(evals_per_step[i] for i in on)


def test_img2img_unit_defaults_to_the_init_image_and_inpaint_keeps_pixels_outside_the_mask(cn_server):
    init = control_image(seed=5)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    body = run(cn_server, "/img2img", init_image=png(init), mask=png(Image.fromarray(mask)), mask_blur=0,
               denoising_strength=0.9, controlnets=[{"model": "tiny-cn-sd15", "preprocessor": "inpaint_only"}])
    out = pixels(body)
    outside = mask == 0
    assert np.array_equal(out[outside], np.asarray(init).astype(int)[outside])
    assert body["payload"]["controlnets"][0]["image"] is None
    plain = pixels(run(cn_server, "/img2img", init_image=png(init), mask=png(Image.fromarray(mask)), mask_blur=0,
                       denoising_strength=0.9))
    assert not np.array_equal(out, plain)


def test_txt2img_inpaint_only_keeps_the_unmasked_pixels_of_its_image(cn_server):
    image = control_image(seed=6)
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 24:56] = 255
    body = run(cn_server, controlnets=[{"model": "tiny-cn-sd15", "preprocessor": "inpaint_only", "image": png(image),
                                        "mask": png(Image.fromarray(mask))}])
    out = pixels(body)
    assert np.array_equal(out[mask == 0], np.asarray(image).astype(int)[mask == 0])
    assert not np.array_equal(out[mask > 0], np.asarray(image).astype(int)[mask > 0])


def test_detected_maps_come_back_when_asked(cn_server):
    body = run(cn_server, controlnets=[unit(preprocessor="canny", save_detected_map=True)])
    assert len(body["images"]) == 2
    detected = pixels(body, 1)
    assert set(np.unique(detected)) <= {0, 255} and detected.shape == (64, 64, 3)


def test_infotext_is_read_back_by_png_info(cn_server):
    body = run(cn_server, controlnets=[unit(preprocessor="canny", weight=0.8, guidance_end=0.9,
                                            preprocessor_params={"threshold_a": 50, "threshold_b": 150})])
    info = cn_server.client.post("/png-info", json={"image": body["image"]}).json()
    text = info["items"]["ControlNet 0"]
    assert text.startswith("Module: canny, Model: tiny-cn-sd15 [") and "Weight: 0.8" in text
    assert "Threshold A: 50.0, Threshold B: 150.0, Guidance Start: 0.0, Guidance End: 0.9" in text
    assert text.endswith("Pixel Perfect: False, Control Mode: Balanced")


def test_a_job_that_ended_keeps_no_unit_images_in_its_record(cn_server):
    """Like init images, the units' images (megabytes of base64 each) leave the job record on disk
    when the job ends; the unread result still answers, its echo describing them."""
    ref = png(control_image(seed=12))
    blocker = cn_server.submit_blocker()  # the job waits behind it: its record is read while it is queued
    r = cn_server.client.post("/img2img", json={**SMALL, "init_image": png(control_image(seed=13)),
                                                 "controlnets": [unit(mask=png(Image.new("L", (64, 64), 255)))],
                                                 "ip_adapters": [{"model": "ip-adapter_tiny_sd15",
                                                                  "images": [ref, ref]}]})
    assert r.status_code == 200, r.text
    job = r.json()["job_id"]
    store = cn_server.app.state.backend.store
    raw = store.job_path(job).read_text()
    assert ref in raw  # kept while the job may still run
    cn_server.wait(blocker)
    deadline = time.time() + 120
    while not any(e["job_id"] == job and e["state"] == "done" for e in cn_server.client.get("/queue").json()["jobs"]):
        assert time.time() < deadline
        time.sleep(0.05)
    raw = store.job_path(job).read_text()
    record = json.loads(raw)["payload"]
    assert record["init_image"] is None and ref not in raw and len(raw) < 4_000
    assert [(u["image"], u["mask"], u["model"]) for u in record["controlnets"]] == [(None, None, "tiny-cn-sd15")]
    assert [(u["images"], u["weight"]) for u in record["ip_adapters"]] == [(None, 1.0)]
    body = cn_server.client.get(f"/queue/{job}").json()
    assert body["state"] == "done" and body["payload"]["controlnets"][0]["image"] == "<PNG 64x64>"
    assert body["payload"]["ip_adapters"][0]["images"] == ["<PNG 64x64>", "<PNG 64x64>"]


# ---------------------------------------------------------------------------- refusals

def _queued(server) -> int:
    return len(server.client.get("/queue").json()["jobs"])


@pytest.mark.parametrize("change, status, loc, words", [
    ({"model": "nope"}, 422, ["controlnets", "0", "model"], "unknown ControlNet 'nope'"),
    ({"model": "tiny-cn-sdxl"}, 422, ["controlnets", "0", "model"], "is for SDXL, but model 'tiny-sd15' is SD 1.5"),
    ({"model": "broken"}, 422, ["controlnets", "0", "model"], "cannot be used"),
    ({"preprocessor": "nope"}, 422, ["controlnets", "0", "preprocessor"], "unknown preprocessor"),
    ({"preprocessor": "depth_midas"}, 422, ["controlnets", "0", "preprocessor"], "dpt-hybrid-midas/"),
    ({"preprocessor": "lineart_coarse"}, 422, ["controlnets", "0", "preprocessor"], "sk_model2.pth"),
    ({"preprocessor": "softedge_pidinet"}, 422, ["controlnets", "0", "preprocessor"], "cannot run that network"),
    ({"weight": 3}, 422, ["controlnets", 0, "weight"], "less than or equal to 2"),
    ({"guidance_start": 0.6, "guidance_end": 0.5}, 422, ["controlnets", 0], "guidance_start"),
    ({"image": "bm90IGFuIGltYWdl"}, 422, ["controlnets", "0", "image"], "not a PNG"),
    ({"image": None}, 422, ["controlnets", "0", "image"], "needs an image"),
    ({"control_mode": "loud"}, 422, ["controlnets", 0, "control_mode"], "unknown control mode"),
])
def test_bad_units_are_4xx_naming_the_field_and_nothing_is_queued(cn_server, change, status, loc, words):
    before = _queued(cn_server)
    r = cn_server.client.post("/txt2img", json={**SMALL, "controlnets": [{**unit(), **change}]})
    assert r.status_code == status, r.text
    body = r.json()
    assert words in body["error"], body
    assert body["detail"][0]["loc"][1:len(loc) + 1] == loc
    assert _queued(cn_server) == before


def test_controlnet_units_count_in_the_cost_budget(model_store, cn_dirs, tmp_path):
    """Each unit is one more network per UNet evaluation: units that take a job over the budget are
    refused at submit like any over-budget job (422 on ``cost``, nothing queued), in both dialects."""
    cdir, adir, models = cn_dirs
    # 64x64 x 4 steps = 0.016 Mpx-steps; a unit adds half of that: 3 units fit under 0.042, 4 do not
    settings = make_settings(model_store, tmp_path, controlnet_dir=cdir, annotators_dir=adir, models_dir=models,
                             max_cost=0.042)
    with LiveServer(settings) as s:
        r = s.client.post("/txt2img", json={**SMALL, "controlnets": [unit()] * 4})
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["detail"][0]["loc"][1] == "cost" and "controlnets" in body["error"]
        assert "x ControlNets 3" in body["error"] and "DIFFUSIONAPI_MAX_COST" in body["error"]
        title = next(t for t in s.client.get("/controlnet/model_list").json()["model_list"]
                     if t.startswith("tiny-cn-sd15 ["))
        a1111 = {"enabled": True, "module": "none", "model": title, "image": png(control_image())}
        r = s.client.post("/sdapi/v1/txt2img", json={
            "prompt": "x", "width": 64, "height": 64, "steps": 4, "alwayson_scripts": {"controlnet": {"args": [a1111] * 4}}})
        assert r.status_code == 422 and "DIFFUSIONAPI_MAX_COST" in r.json()["detail"], r.text
        assert _queued(s) == 0
        # three units, or four whose windows are halved, are within it and run
        assert run(s, controlnets=[unit()] * 3)["state"] == "done"
        assert run(s, controlnets=[unit(guidance_end=0.5)] * 4)["state"] == "done"


# ---------------------------------------------------------------------------- detect

def test_canny_detect_equals_opencv_canny_at_the_given_thresholds(cn_server):
    import cv2

    im = control_image(96, seed=3)
    r = cn_server.client.post("/controlnet/detect", json={
        "controlnet_module": "canny", "controlnet_input_images": [png(im)], "controlnet_processor_res": 96,
        "controlnet_threshold_a": 40, "controlnet_threshold_b": 120})
    assert r.status_code == 200, r.text
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))
    want = cv2.Canny(np.asarray(im), 40, 120)
    assert np.array_equal(got[:, :, 0], want) and want.any()


def test_detect_refuses_unknown_and_networked_modules_and_no_image(cn_server):
    c = cn_server.client
    r = c.post("/controlnet/detect", json={"controlnet_module": "nope", "controlnet_input_images": [png(control_image())]})
    assert r.status_code == 422
    r = c.post("/controlnet/detect", json={"controlnet_module": "openpose_hand",
                                           "controlnet_input_images": [png(control_image())]})
    assert r.status_code == 422 and "hand_pose_model.pth" in r.json()["error"]
    assert c.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": []}).status_code == 422


def _detect(server, module, im, res=None):
    r = server.client.post("/controlnet/detect", json={"controlnet_module": module, "controlnet_input_images": [png(im)],
                                                       **({"controlnet_processor_res": res} if res else {})})
    assert r.status_code == 200, r.text
    return Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))


@pytest.mark.parametrize("module", ["softedge_hed", "scribble_hed", "lineart_realistic", "lineart_anime",
                                    "depth_anything"])
def test_networked_preprocessors_run_from_their_annotator_files(cn_server, module):
    """Tiny random networks saved in the published layouts: the map has the preprocessor's size
    (shorter side = processor resolution), is RGB, depends on the input and is deterministic."""
    a, b = control_image(96, seed=21), control_image(96, seed=22).transpose(Image.FLIP_LEFT_RIGHT)
    wide = Image.fromarray(np.concatenate([np.asarray(a), np.asarray(b)[:48]], axis=0))  # 96 x 144
    got = _detect(cn_server, module, wide, res=64)
    assert got.mode == "RGB" and got.size == (64, 96)
    first, second = np.asarray(_detect(cn_server, module, a, 64)), np.asarray(_detect(cn_server, module, b, 64))
    assert first.shape == (64, 64, 3) and np.abs(first.astype(int) - second).mean() > 1.0
    assert np.array_equal(first, np.asarray(_detect(cn_server, module, a, 64)))
    assert len(np.unique(first)) > 1
    if module == "scribble_hed":
        assert set(np.unique(first)) <= {0, 255}


def test_openpose_detect_answers_the_map_and_the_poses_json(cn_server):
    """The body network runs from body_pose_model.pth (a tiny random one here: what it finds is noise;
    tests/test_controlnet_units.py checks the assembly of people on drawn maps)."""
    im = control_image(96, seed=24)
    r = cn_server.client.post("/controlnet/detect", json={"controlnet_module": "openpose", "controlnet_processor_res": 64,
                                                           "controlnet_input_images": [png(im), png(im)]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 2 and len(body["poses"]) == 2
    pose = body["poses"][0]
    assert (pose["canvas_width"], pose["canvas_height"]) == (64, 64) and body["poses"][1] == pose
    for person in pose["people"]:
        kp = person["pose_keypoints_2d"]
        assert len(kp) == 54 and all(0 <= v < 64 for v in kp) and person["hand_left_keypoints_2d"] is None
    got = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert got.mode == "RGB" and got.size == (64, 64)
    assert np.asarray(got).any() == bool(pose["people"])  # people drawn, or a black map
    job = run(cn_server, controlnets=[unit(preprocessor="openpose", image=png(im), save_detected_map=True,
                                           preprocessor_params={"resolution": 64})])
    assert np.array_equal(pixels(job, 1), np.asarray(got).astype(int))
    assert "poses" not in _detect_body(cn_server, "canny")


def _detect_body(server, module):
    r = server.client.post("/controlnet/detect", json={"controlnet_module": module,
                                                       "controlnet_input_images": [png(control_image())]})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_networked_unit_guides_a_job_with_the_map_detect_makes(cn_server):
    im = control_image(seed=23)
    body = run(cn_server, controlnets=[unit(preprocessor="lineart_realistic", image=png(im), save_detected_map=True,
                                            preprocessor_params={"resolution": 64})])
    assert np.array_equal(pixels(body, 1), np.asarray(_detect(cn_server, "lineart_realistic", im, 64)).astype(int))
    assert not np.array_equal(pixels(body), pixels(run(cn_server, controlnets=[unit(image=png(im))])))
    assert 'Module: lineart_realistic, Model: tiny-cn-sd15' in body["infotext"]


def test_a_cluster_api_node_detects_with_built_in_modules_only(cn_server):
    """An API node of a Celery cluster loads no torch: networked modules are refused there (the map
    comes with a job instead); built-in ones still run. (The route reads the node's settings.)"""
    app = cn_server.app
    own = app.state.settings
    app.state.settings = own.model_copy(update={"backend": "celery"})
    try:
        r = cn_server.client.post("/controlnet/detect", json={"controlnet_module": "softedge_hed",
                                                               "controlnet_input_images": [png(control_image())]})
        assert r.status_code == 422 and "save_detected_map" in r.json()["detail"], r.text
        assert r.json()["errors"][0]["loc"] == ["body", "controlnet_module"]
        assert _detect(cn_server, "canny", control_image(), 64).size == (64, 64)
    finally:
        app.state.settings = own


def test_detect_names_a_missing_annotator_file(cn_server):
    for module, words in (("lineart_coarse", "sk_model2.pth"), ("depth_midas", "dpt-hybrid-midas/")):
        r = cn_server.client.post("/controlnet/detect", json={"controlnet_module": module,
                                                               "controlnet_input_images": [png(control_image())]})
        assert r.status_code == 422 and words in r.json()["detail"], r.text


# ---------------------------------------------------------------------------- A1111 / Forge clients

def _a1111(cn_server):
    import webuiapi

    return webuiapi.WebUIApi(baseurl=cn_server.url + "/sdapi/v1", sampler="Euler", steps=4)


def test_webuiapi_controlnet_unit_and_detect_work_unchanged(cn_server):
    import webuiapi

    api = _a1111(cn_server)
    assert api.controlnet_version() == 3
    titles = api.controlnet_model_list()
    title = next(t for t in titles if t.startswith("tiny-cn-sd15 ["))
    assert "canny" in api.controlnet_module_list()
    im = control_image()
    plain = api.txt2img(prompt="x", width=64, height=64, seed=3)
    assert len(plain.images) == 1  # has_controlnet made it send {"args": []}: no unit
    unit_ = webuiapi.ControlNetUnit(image=im, module="canny", model=title, processor_res=64,
                                    threshold_a=50, threshold_b=150)
    r = api.txt2img(prompt="x", width=64, height=64, seed=3, controlnet_units=[unit_])
    assert len(r.images) == 2  # the detected map follows (save_detected_map defaults to true, as in the extension)
    assert np.abs(np.asarray(r.images[0]).astype(int) - np.asarray(plain.images[0]).astype(int)).mean() > 1.0
    assert 'ControlNet 0: "Module: canny, Model: ' + title in r.info["infotexts"][0]
    import cv2

    detected = api.controlnet_detect([im], module="canny", processor_res=64, threshold_a=50, threshold_b=150)
    assert np.array_equal(np.asarray(detected.images[0])[:, :, 0], cv2.Canny(np.asarray(im), 50, 150))
    assert np.array_equal(np.asarray(r.images[1])[:, :, 0], cv2.Canny(np.asarray(im), 50, 150))


def _data_url(im: Image.Image) -> str:
    return "data:image/png;base64," + png(im)


def test_openoutpaint_style_request_works(cn_server):
    # js/ui/tool/dream.js: data URLs, string modes, a reference-only unit placed first, key "controlnet"
    title = next(t for t in cn_server.client.get("/controlnet/model_list").json()["model_list"]
                 if t.startswith("tiny-cn-sd15 ["))
    init, mask = control_image(seed=8), Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 4, "seed": 5, "sampler_name": "Euler",
            "init_images": [_data_url(init)], "mask": _data_url(mask), "denoising_strength": 0.8,
            "alwayson_scripts": {"controlnet": {"args": [
                {"enabled": True, "module": "reference_only", "model": "None", "threshold_a": 0.5,
                 "control_mode": "Balanced", "image": _data_url(init)},
                {"enabled": True, "module": "none", "model": title, "control_mode": "My prompt is more important",
                 "image": _data_url(control_image()), "mask": _data_url(mask), "processor_res": 64,
                 "resize_mode": "Crop and Resize"}]}}}
    r = cn_server.client.post("/sdapi/v1/img2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert "Control Mode: My prompt is more important" in info["infotexts"][0]
    assert "ControlNet 1" not in info["infotexts"][0]  # the reference unit is skipped (logged), not an error


def test_photoshop_plugin_style_legacy_names_work(cn_server):
    title = next(t for t in cn_server.client.get("/controlnet/model_list").json()["model_list"]
                 if t.startswith("tiny-cn-sd15 ["))
    args = {"input_image": png(control_image()), "module": "none", "model": title, "weight": 1.0,
            "lowvram": False, "guessmode": False, "processor_res": 64, "threshold_a": 64, "threshold_b": 64,
            "guidance_start": 0.0, "guidance": 0.5, "resize_mode": 1, "save_detected_map": False}
    base = {"prompt": "x", "width": 64, "height": 64, "steps": 4, "seed": 5, "sampler_name": "Euler",
            "init_images": [png(control_image(seed=9))], "denoising_strength": 0.8}
    c = cn_server.client
    on = c.post("/sdapi/v1/img2img", json={**base, "alwayson_scripts": {"ControlNet": {"args": [
        {**args, "enabled": True}]}}}, timeout=120).json()
    assert len(on["images"]) == 1
    text = json.loads(on["info"])["infotexts"][0]
    assert "Guidance End: 0.5" in text and "Resize Mode: Crop and Resize" in text
    # the extension's units are disabled unless they say so
    off = c.post("/sdapi/v1/img2img", json={**base, "alwayson_scripts": {"controlnet": {"args": [args]}}},
                 timeout=120).json()
    assert "ControlNet" not in json.loads(off["info"])["infotexts"][0]


def test_a1111_controlnet_listings(cn_server):
    c = cn_server.client
    detail = c.get("/controlnet/module_list").json()["module_detail"]["canny"]
    assert detail["sliders"][1] == {"name": "Canny Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1}
    assert "canny" in c.get("/controlnet/module_list?alias_names=true").json()["module_list"]
    types = c.get("/controlnet/control_types").json()["control_types"]
    assert types["Canny"]["default_option"] == "canny" and "none" in types["Canny"]["module_list"]
    assert c.get("/controlnet/settings").json() == {"control_net_unit_count": 3}
    r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 2, "alwayson_scripts": {
        "controlnet": {"args": [{"enabled": True, "module": "none", "model": "nope", "image": png(control_image())}]}}})
    assert r.status_code == 422 and "nope" in r.text


def test_an_api_node_resolves_units_without_torch(cn_dirs, model_store, tmp_path):
    """API nodes validate units (files, modules, images) without loading torch (tests/test_layers.py
    says why); only the worker builds models. Safetensors headers are read as JSON (a .pth file is a
    pickle: reading its tensor names takes torch, so the copy here leaves the .pth out)."""
    import json
    import subprocess
    import sys

    src, adir, models = cn_dirs
    cdir = tmp_path / "controlnet"
    shutil.copytree(src, cdir, ignore=shutil.ignore_patterns("*.pth"))
    img = png(control_image())
    code = f"""
import sys, json
from diffusionapi.config import Settings
from diffusionapi.engine.controlnet.request import ControlNetUnitRequest, resolve_units, files_for
from diffusionapi.registry import Registry
from diffusionapi.api.sdapi.controlnet import controlnet_units
s = Settings(models_dir={str(models)!r}, controlnet_dir={str(cdir)!r}, annotators_dir={str(adir)!r},
             queue_dir={str(tmp_path / "q")!r}, outputs_dir={str(tmp_path / "o")!r})
model = next(m for m in Registry(s).models() if m.name == "tiny-sd15")
units = [ControlNetUnitRequest(model=n, image={img!r}, preprocessor="canny")
         for n in ("tiny-cn-sd15", "control_tiny_sd15")]
plans, echo, record = resolve_units(units, model, s, has_init=False)
assert controlnet_units({{"ControlNet": {{"args": [{{"enabled": True, "model": "x", "image": "y"}}]}}}}, [])
print(json.dumps([len(plans), "torch" in sys.modules]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [2, False]
