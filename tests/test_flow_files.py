"""Flux.1 / SD 3.x as people store them: transformer-only files (BFL / Stability layout) with
component files in stable_diffusion/text_encoders/ and stable_diffusion/vae/, and ComfyUI-layout
all-in-one checkpoints. Each generates through HTTP and equals the diffusers folder of the same
weights (same seed)."""
from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionapi.components import ComponentIndex, classify
from diffusionapi.config import Settings
from diffusionapi.demo import tiny_sd15_pipeline
from diffusionapi.images import read_infotext
from diffusionapi.errors import RequestError
from diffusionapi.jobs.resolve import resolve_txt2img
from diffusionapi.registry import Registry
from diffusionapi.schemas import Txt2ImgRequest

from .cluster_fixtures import redis_server  # noqa: F401 - fixture
from .conftest import LiveServer, make_settings
from .test_flux import save_flux_lora
from .flow_files import (city96_flux_q4_k_m, flux_to_bfl, fp8_copy, save, tiny_flux_for_files, vae_to_ldm, wide_flux_transformer,
                         write_flux_files, write_gguf)

# Slow tier: every storage form (fp8, GGUF, all-in-one, transformer-only) is built and loaded per
# module; the full suite runs it, the fast tier keeps the family detection (test_families.py).
pytestmark = pytest.mark.slow

LEGACY_GGUF = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")
K_GGUF = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
FLUX = dict(prompt="a red cube", width=64, height=64, steps=3, fileType="png", sampler_name="Euler")


def px(r):
    assert r["state"] == "done", r
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r["image"]))).convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def flow_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-files")
    pipe = tiny_flux_for_files(0)
    pipe.save_pretrained(root / "models" / "flux-folder")
    write_flux_files(pipe, root, "flux-transformer", all_in_one="flux-all-in-one")
    bfl = flux_to_bfl(pipe.transformer.state_dict())
    save(fp8_copy(bfl), root / "models" / "flux-fp8.safetensors")
    save(fp8_copy(bfl, scaled=True), root / "models" / "flux-fp8-scaled.safetensors")
    write_gguf(bfl, root / "models" / "flux-q8.gguf")
    for qtype in LEGACY_GGUF:
        write_gguf(bfl, root / "models" / f"flux-{qtype.lower()}.gguf", qtype=qtype)
    # K-quants need 256-value rows: a 256-wide transformer with the same text widths (its own
    # full-precision file is the reference), run with the same component files.
    wide = flux_to_bfl(wide_flux_transformer(1).state_dict())
    save(wide, root / "models" / "flux-wide.safetensors")
    for qtype in K_GGUF:
        write_gguf(wide, root / "models" / f"flux-wide-{qtype.lower()}.gguf", qtype=qtype)
    write_gguf(wide, root / "models" / "flux-wide-q4_k_m.gguf", type_of=city96_flux_q4_k_m)
    save(pipe.transformer.state_dict(), root / "models" / "flux-diffusers-keys.safetensors")
    (root / "text_encoders" / "broken_clip.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    # An SD 1.5 folder and A1111-style VAE files for it (sd_vae): its own VAE's weights, and others.
    sd15 = tiny_sd15_pipeline(0)
    sd15.save_pretrained(root / "models" / "tiny-sd15")
    save(vae_to_ldm(sd15.vae.state_dict()), root / "vae" / "sd15-same-vae.safetensors")
    save({f"first_stage_model.{k}": v for k, v in vae_to_ldm(tiny_sd15_pipeline(3).vae.state_dict()).items()},
         root / "vae" / "sd15-other-vae.safetensors")
    save_flux_lora(root / "loras" / "flux-style.safetensors")
    (root / "upscalers").mkdir()
    (root / "labels.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def flow_server(flow_store, tmp_path_factory):
    settings = make_settings(flow_store, tmp_path_factory.mktemp("flow-work"), default_model="flux-folder")
    with LiveServer(settings) as s:
        yield s


def test_files_are_listed_as_flux1(flow_server):
    models = {m["name"]: m for m in flow_server.client.get("/models").json()["models"]}
    for name in ("flux-folder", "flux-transformer", "flux-all-in-one"):
        assert (models[name]["family"], models[name]["prediction"]) == ("flux1", "flow"), models[name]


def same_image(a, b) -> bool:
    """Equal up to the last bit of float rounding: the loaded weights are bit-identical (checked
    below), but the CPU's matmul kernels round differently for tensors at different memory
    alignment (a diffusers folder's tensors sit at the file's offsets in the mmap; ours are fresh
    allocations; with both cloned the images are bit-identical), which can flip a pixel by 1."""
    d = np.abs(a - b)
    return d.max() <= 1 and (d == 0).mean() > 0.99


def plain_config(model) -> dict:
    """A model's architecture config, without bookkeeping (paths, versions, dtype)."""
    cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    skip = {"dtype", "torch_dtype", "architectures", "transformers_version", "output_attentions", "return_dict"}
    return json.loads(json.dumps({k: v for k, v in cfg.items() if not k.startswith("_") and k not in skip}))


@pytest.mark.parametrize("name", ["flux-transformer", "flux-all-in-one"])
def test_single_files_equal_the_diffusers_folder(flow_server, flow_store, name):
    from diffusers import FluxPipeline

    folder = px(flow_server.run(**FLUX, model="flux-folder", seed=5))
    got = flow_server.run(**FLUX, model=name, seed=5)
    assert same_image(px(got), folder) and px(got).std() > 0
    loaded = flow_server.engine.cache._items[name].pipe
    ref = FluxPipeline.from_pretrained(flow_store / "models" / "flux-folder")
    for part in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        ours, theirs = getattr(loaded, part).state_dict(), getattr(ref, part).state_dict()
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours), part
        assert plain_config(getattr(loaded, part)) == plain_config(getattr(ref, part)), part
    assert plain_config(loaded.scheduler) == plain_config(ref.scheduler)
    # The components it ran with are in the record: every worker loads the same ones.
    assert got["payload"]["modules"] == (["clip_l", "t5xxl_fp16", "ae"] if name == "flux-transformer" else [])


def test_transformer_file_is_deterministic_and_prompt_sensitive(flow_server):
    a = px(flow_server.run(**FLUX, model="flux-transformer", seed=9))
    assert np.array_equal(a, px(flow_server.run(**FLUX, model="flux-transformer", seed=9)))
    assert not np.array_equal(a, px(flow_server.run(**FLUX, model="flux-transformer", seed=10)))
    assert not np.array_equal(a, px(flow_server.run(**dict(FLUX, prompt="a blue sphere"), model="flux-transformer",
                                                    seed=9)))


def test_named_modules_by_name_file_name_or_path(flow_server, flow_store):
    base = px(flow_server.run(**FLUX, model="flux-transformer", seed=2))
    forge_style = [str(flow_store / "text_encoders" / "clip_l.safetensors"), "t5xxl_fp16.safetensors", "ae"]
    r = flow_server.run(**FLUX, model="flux-transformer", seed=2, modules=forge_style)
    assert np.array_equal(px(r), base) and r["payload"]["modules"] == ["clip_l", "t5xxl_fp16", "ae"]


def test_wrong_or_unknown_modules_are_a_422_naming_them(flow_server):
    c = flow_server.client
    r = c.post("/txt2img", json={**FLUX, "model": "flux-transformer", "modules": ["nope.safetensors"]})
    assert r.status_code == 422 and "modules" in r.text and "nope.safetensors" in r.text and "clip_l" in r.text
    r = c.post("/txt2img", json={**FLUX, "model": "flux-all-in-one", "modules": ["ae"]})
    assert r.status_code == 422 and "carries its own VAE" in r.text, r.text
    r = c.post("/txt2img", json={**FLUX, "model": "flux-folder", "modules": ["clip_l"]})
    assert r.status_code == 422 and "'clip_l'" in r.text and "CLIP-L" in r.text, r.text


def test_modules_are_listed_with_kind_and_family(flow_server):
    listed = {m["name"]: m for m in flow_server.client.get("/modules").json()["modules"]}
    assert (listed["clip_l"]["kind"], listed["clip_l"]["role"]) == ("clip_l", "text_encoder")
    assert listed["t5xxl_fp16"]["kind"] == "t5xxl" and listed["t5xxl_fp16"]["storage"] == "F32"
    assert (listed["ae"]["kind"], listed["ae"]["families"], listed["ae"]["width"]) == ("vae", ["flux1", "sd3"], 16)
    assert listed["sd15-other-vae"]["families"] == ["sd15", "sd2", "sdxl"]
    forge = {m["model_name"] for m in flow_server.client.get("/sdapi/v1/sd-modules").json()}
    assert {"clip_l", "t5xxl_fp16", "ae", "sd15-same-vae"} <= forge
    assert {m["model_name"] for m in flow_server.client.get("/sdapi/v1/sd-vae").json()} == \
        {"ae", "sd15-same-vae", "sd15-other-vae"}


def test_sdapi_forge_modules_equal_the_native_job_and_infotext_round_trips(flow_server, flow_store):
    native = flow_server.run(**FLUX, model="flux-transformer", seed=12)
    info = read_infotext(base64.b64decode(native["image"]))
    assert "Module 1: clip_l, Module 2: t5xxl_fp16, Module 3: ae" in info, info
    back = flow_server.client.post("/png-info", json={"image": native["image"]}).json()
    assert back["parameters"]["modules"] == ["clip_l", "t5xxl_fp16", "ae"], back
    body = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 3, "seed": 12, "sampler_name": "Euler",
            "scheduler": "Simple", "cfg_scale": 1, "override_settings": {
                "sd_model_checkpoint": "flux-transformer",
                "forge_additional_modules": [str(flow_store / "vae" / "ae.safetensors"),
                                             "C:\\forge\\models\\text_encoder\\clip_l.safetensors",
                                             "t5xxl_fp16.safetensors"]}}
    r = flow_server.client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    assert np.array_equal(img.astype(np.int16), px(native))
    assert "Module 1: " in r.json()["info"]
    bad = dict(body, override_settings={**body["override_settings"], "forge_additional_modules": ["clip_g.safetensors"]})
    r = flow_server.client.post("/sdapi/v1/txt2img", json=bad)
    assert r.status_code == 422 and "clip_g.safetensors" in r.text, r.text


def test_sd_vae_replaces_an_sd15_models_vae(flow_server):
    p = dict(prompt="a red cube", width=64, height=64, steps=3, fileType="png", model="tiny-sd15", seed=3)
    own = px(flow_server.run(**p))
    same = flow_server.run(**p, modules=["sd15-same-vae"])
    assert np.array_equal(px(same), own)  # the same weights from an A1111-layout file
    assert "Module 1: sd15-same-vae" in read_infotext(base64.b64decode(same["image"]))
    assert not np.array_equal(px(flow_server.run(**p, modules=["sd15-other-vae"])), own)
    body = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 3, "seed": 3,
            "override_settings": {"sd_model_checkpoint": "tiny-sd15", "sd_vae": "sd15-other-vae.safetensors"}}
    r = flow_server.client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200 and "Module 1: sd15-other-vae" in r.json()["info"], r.text
    # Set as an option (A1111 clients POST /options), it applies to later /sdapi jobs.
    c = flow_server.client
    try:
        assert c.post("/sdapi/v1/options", json={"sd_vae": "sd15-other-vae"}).status_code == 200
        assert c.get("/sdapi/v1/options").json()["sd_vae"] == "sd15-other-vae"
        body.pop("override_settings")
        r = c.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_model_checkpoint": "tiny-sd15"}})
        assert r.status_code == 200 and "Module 1: sd15-other-vae" in r.json()["info"], r.text
    finally:
        c.post("/sdapi/v1/options", json={"sd_vae": "Automatic"})
    r = c.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_model_checkpoint": "tiny-sd15"}})
    assert r.status_code == 200 and "Module 1" not in r.json()["info"], r.text
    for wrong in ("ae", "clip_l"):  # a Flux VAE (16 channels), a text encoder
        r = flow_server.client.post("/txt2img", json={**p, "modules": [wrong]})
        assert r.status_code == 422 and wrong in r.text and "sd15-other-vae" in r.text, r.text


def psnr(a, b) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.mark.parametrize("name, stored", [("flux-fp8", torch.float8_e4m3fn), ("flux-fp8-scaled", torch.float32)])
def test_fp8_files_run_close_to_full_precision(flow_server, name, stored):
    """fp8 weights: deterministic, close to the fp32 file's image and not equal to it. Plain fp8
    stays fp8 in memory (upcast per layer); scaled fp8 is dequantized at load."""
    full = px(flow_server.run(**FLUX, model="flux-transformer", seed=6))
    a = px(flow_server.run(**FLUX, model=name, seed=6))
    assert np.array_equal(a, px(flow_server.run(**FLUX, model=name, seed=6)))
    # Measured on the tiny model (CPU, fp32 compute): 44.8 dB (fp8) and 44.9 dB (scaled fp8).
    assert not np.array_equal(a, full) and psnr(a, full) > 35
    linear = flow_server.engine.cache._items[name].pipe.transformer.transformer_blocks[0].attn.to_q
    assert linear.weight.dtype == stored


def test_gguf_q8_transformer_generates_close_to_full_precision(flow_server):
    """A city96-layout Q8_0 GGUF (BFL names) through diffusers' GGUF layers: listed as flux1,
    deterministic, prompt-sensitive, close to the full-precision file's image."""
    from diffusers.quantizers.gguf.utils import GGUFLinear

    models = {m["name"]: m for m in flow_server.client.get("/models").json()["models"]}
    assert models["flux-q8"]["family"] == "flux1"
    full = px(flow_server.run(**FLUX, model="flux-transformer", seed=6))
    a = flow_server.run(**FLUX, model="flux-q8", seed=6)
    assert a["payload"]["modules"] == ["clip_l", "t5xxl_fp16", "ae"]
    assert np.array_equal(px(a), px(flow_server.run(**FLUX, model="flux-q8", seed=6)))
    assert not np.array_equal(px(a), px(flow_server.run(**dict(FLUX, prompt="a blue sphere"), model="flux-q8", seed=6)))
    # Measured on the tiny model (CPU, fp32 compute): 56.4 dB.
    assert not np.array_equal(px(a), full) and psnr(px(a), full) > 45
    to_q = flow_server.engine.cache._items["flux-q8"].pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(to_q, GGUFLinear) and to_q.weight.quant_type.name == "Q8_0"


# Measured on the tiny models (CPU, fp32 compute), dB: Q4_0 38.1, Q4_1 36.9, Q5_0 43.7, Q5_1 42.8
# (tiny Flux.1); Q2_K 29.2, Q3_K 35.1, Q4_K 41.1, Q5_K 47.0, Q6_K 52.0 (its 256-wide variant);
# another seed's image is about 13 dB from the reference. Bounds about 6 dB under the measured.
GGUF_MIN_PSNR = {"Q4_0": 32, "Q4_1": 31, "Q5_0": 37, "Q5_1": 37, "Q2_K": 23, "Q3_K": 29, "Q4_K": 35, "Q5_K": 41,
                 "Q6_K": 46}


@pytest.mark.parametrize("qtype", LEGACY_GGUF + K_GGUF)
def test_gguf_block_types_generate_close_to_full_precision(flow_server, flow_store, qtype):
    """city96-layout GGUF files of each block type people run: the legacy ones on tiny Flux.1,
    the K-quants on its 256-wide variant (K-quant blocks span 256-value rows; narrower weights stay
    F16 in the file). Deterministic, prompt-sensitive, close to the same weights' full-precision
    file, with the blocks kept quantized in GGUFLinear and decoded as the gguf package decodes them."""
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFLinear, dequantize_functions, dequantize_gguf_tensor

    wide = qtype in K_GGUF
    name, full_name = (f"flux-wide-{qtype.lower()}", "flux-wide") if wide else (f"flux-{qtype.lower()}",
                                                                               "flux-transformer")
    full = px(flow_server.run(**FLUX, model=full_name, seed=6))
    got = flow_server.run(**FLUX, model=name, seed=6)
    assert got["payload"]["modules"] == ["clip_l", "t5xxl_fp16", "ae"]
    a = px(got)
    assert np.array_equal(a, px(flow_server.run(**FLUX, model=name, seed=6)))
    assert not np.array_equal(a, px(flow_server.run(**dict(FLUX, prompt="a blue sphere"), model=name, seed=6)))
    assert not np.array_equal(a, full) and psnr(a, full) > GGUF_MIN_PSNR[qtype]
    transformer = flow_server.engine.cache._items[name].pipe.transformer
    block, single = transformer.transformer_blocks[0], transformer.single_transformer_blocks[0]
    for layer in (block.attn.to_q, block.attn.add_v_proj, block.ff.net[2], single.attn.to_k, single.proj_mlp,
                  single.proj_out, transformer.norm_out.linear):
        assert isinstance(layer, GGUFLinear) and layer.weight.quant_type.name == qtype, layer
    # The 64-channel input projection: one 32-value block per row, no 256-value super-block.
    assert isinstance(transformer.x_embedder, GGUFLinear) != wide
    # diffusers' torch decoder reads the file's blocks as the gguf package's numpy decoder does
    # (bit for bit when both decode in fp32); what runs decodes in the blocks' scale type, fp16
    # (as ComfyUI-GGUF does by default), then casts: within fp16 rounding of that.
    stored = next(t for t in gguf.GGUFReader(str(flow_store / "models" / f"{name}.gguf")).tensors
                  if t.name == "double_blocks.0.img_mlp.2.weight")
    expected = torch.from_numpy(gguf.quants.dequantize(stored.data, stored.tensor_type))
    weight = block.ff.net[2].weight
    block_size, type_size = gguf.GGML_QUANT_SIZES[weight.quant_type]
    fp32 = dequantize_functions[weight.quant_type](weight.as_tensor().reshape(-1, type_size), block_size, type_size,
                                                   dtype=torch.float32).reshape(expected.shape)
    assert torch.allclose(fp32, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    assert (dequantize_gguf_tensor(weight).float() - expected).abs().max() <= 5e-3 * expected.abs().max()


def test_gguf_mixed_block_types_as_city96_q4_k_m(flow_server):
    """A Q4_K_M file as city96's quantizer writes Flux: types mixed per tensor (fused qkv Q5_K, the
    rest of the blocks Q4_K) and the embedders and final layer left F16 by name; those F16 weights
    run in the running dtype, the quantized ones stay in GGUFLinear."""
    from diffusers.quantizers.gguf.utils import GGUFLinear

    full = px(flow_server.run(**FLUX, model="flux-wide", seed=6))
    a = px(flow_server.run(**FLUX, model="flux-wide-q4_k_m", seed=6))
    assert np.array_equal(a, px(flow_server.run(**FLUX, model="flux-wide-q4_k_m", seed=6)))
    # Measured on the 256-wide tiny Flux.1 (CPU, fp32 compute): 56.3 dB (the all-Q4_K file, whose
    # embedders and final layer are quantized too: 41.1 dB).
    assert not np.array_equal(a, full) and psnr(a, full) > 50
    t = flow_server.engine.cache._items["flux-wide-q4_k_m"].pipe.transformer
    block, single = t.transformer_blocks[0], t.single_transformer_blocks[0]
    types = {"Q5_K": (block.attn.to_q, block.attn.to_v, block.attn.add_k_proj),
             "Q4_K": (block.attn.to_out[0], block.ff.net[0].proj, block.ff.net[2], block.norm1.linear,
                      single.attn.to_q, single.proj_mlp, single.proj_out)}
    for qtype, layers in types.items():
        assert all(isinstance(x, GGUFLinear) and x.weight.quant_type.name == qtype for x in layers), qtype
    for layer in (t.x_embedder, t.context_embedder, t.time_text_embed.timestep_embedder.linear_1,
                  t.time_text_embed.text_embedder.linear_2, t.time_text_embed.guidance_embedder.linear_1,
                  t.norm_out.linear, t.proj_out):
        assert not isinstance(layer, GGUFLinear) and layer.weight.dtype == torch.float32, layer


class _OpensAFile:
    """Unpickling this creates a file: proof that a pickle ran code."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_broken_wrong_family_and_pickled_files_are_422s_naming_them(flow_server, flow_store, tmp_path):
    c = flow_server.client
    r = c.post("/txt2img", json={**FLUX, "model": "flux-transformer", "modules": ["broken_clip.safetensors"]})
    assert r.status_code == 422 and "broken_clip" in r.text and "cannot be used" in r.text, r.text
    r = c.post("/txt2img", json={**FLUX, "model": "flux-transformer", "modules": ["sd15-other-vae"]})
    assert r.status_code == 422 and "is a VAE for sd15" in r.text and "valid choices: clip_l, t5xxl_fp16, ae" in r.text, \
        r.text
    r = c.post("/txt2img", json={**FLUX, "model": "flux-diffusers-keys"})
    assert r.status_code == 422 and "flux-diffusers-keys.safetensors" in r.text and "diffusers-layout" in r.text, r.text
    marker = tmp_path / "pickle-ran"
    torch.save({"state_dict": {"double_blocks.0.img_attn.qkv.weight": _OpensAFile(marker)}},
               flow_store / "models" / "evil-flux.ckpt")
    try:
        r = c.post("/txt2img", json={**FLUX, "model": "evil-flux"})
        assert r.status_code == 422 and "evil-flux.ckpt" in r.text and "refused" in r.text, r.text
        assert "evil-flux" not in {m["name"] for m in c.get("/models").json()["models"]}
        assert not marker.exists()
    finally:
        (flow_store / "models" / "evil-flux.ckpt").unlink()


@pytest.mark.parametrize("name", ["flux-transformer", "flux-fp8", "flux-q8"])
def test_loras_on_single_files_change_and_unload(flow_server, name):
    base = px(flow_server.run(**FLUX, model=name, seed=3))
    styled = px(flow_server.run(**FLUX, model=name, seed=3, loras=[{"name": "flux-style", "scale": 1.0}]))
    assert not np.array_equal(base, styled)
    assert np.array_equal(base, px(flow_server.run(**FLUX, model=name, seed=3)))
    if name == "flux-transformer":  # the same LoRA on the folder of the same weights
        folder = px(flow_server.run(**FLUX, model="flux-folder", seed=3, loras=[{"name": "flux-style", "scale": 1.0}]))
        assert same_image(styled, folder)


def _resolve(settings, **payload):
    return resolve_txt2img(Txt2ImgRequest(**payload), Registry(settings), settings)


def test_missing_parts_say_which_file_to_add_and_where(flow_store, tmp_path):
    """A store without the VAE, then without the T5 tokenizer: 422s naming the file and folder."""
    root = tmp_path / "store"
    shutil.copytree(flow_store, root, ignore=shutil.ignore_patterns("flux-folder", "flux-all-in-one*"))
    settings = make_settings(root, tmp_path / "work", default_model="flux-transformer")
    (root / "vae" / "ae.safetensors").unlink()
    with pytest.raises(RequestError) as e:
        _resolve(settings, **FLUX)
    assert e.value.field == "modules" and "ae.safetensors" in e.value.message and str(root / "vae") in e.value.message
    shutil.copy(flow_store / "vae" / "ae.safetensors", root / "vae" / "ae.safetensors")
    shutil.rmtree(root / "text_encoders" / "t5-tokenizer")
    with pytest.raises(RequestError) as e:
        _resolve(settings, **FLUX)
    assert "spiece.model" in e.value.message and str(root / "text_encoders" / "t5-tokenizer") in e.value.message
    # Two T5 files: neither is picked silently; naming one works.
    shutil.copytree(flow_store / "text_encoders" / "t5-tokenizer", root / "text_encoders" / "t5-tokenizer")
    shutil.copy(root / "text_encoders" / "t5xxl_fp16.safetensors", root / "text_encoders" / "t5xxl_other.safetensors")
    with pytest.raises(RequestError) as e:
        _resolve(settings, **FLUX)
    assert "t5xxl_fp16" in e.value.message and "t5xxl_other" in e.value.message
    assert _resolve(settings, **FLUX, modules=["t5xxl_other"]).echo["modules"] == ["clip_l", "t5xxl_other", "ae"]


def test_component_kinds_are_read_from_the_tensors(flow_store, tmp_path):
    settings = Settings(models_dir=flow_store / "models")
    found = {c.name: c for c in ComponentIndex(settings).files()}
    assert (found["clip_l"].kind, found["t5xxl_fp16"].kind, found["ae"].kind) == ("clip_l", "t5xxl", "vae")
    assert found["ae"].families == ("flux1", "sd3") and found["ae"].width == 16
    # Published widths decide CLIP-L / CLIP-G whatever the file is called.
    assert classify({"text_model.embeddings.token_embedding.weight": {"shape": [49408, 1280]}}, "clip_l.x")[0] == "clip_g"
    assert classify({"embeddings.token_embedding.weight": {"shape": [49408, 768]}}, "clip_g.x")[0] == "clip_l"


# ---------------------------------------------------------------------------- SD 3.x

SD3 = dict(prompt="a red cube", width=64, height=64, steps=3, fileType="png", sampler_name="Euler", cfg_scale=4.0)


@pytest.fixture(scope="module")
def sd3_store(tmp_path_factory):
    """An "incl_clips_t5xxl"-style all-in-one file and a transformer-only file whose store has CLIP-L,
    CLIP-G and the VAE but no T5 file: it runs with zeros for T5, as diffusers does without one."""
    from .flow_files import tiny_sd3_for_files, write_sd3_files, write_t5_tokenizer

    root = tmp_path_factory.mktemp("sd3-files")
    pipe = tiny_sd3_for_files(0)
    pipe.save_pretrained(root / "models" / "sd3-folder")
    write_sd3_files(pipe, root, "sd3-transformer", t5=False, all_in_one=None)
    write_t5_tokenizer(pipe.tokenizer_3, root / "text_encoders")
    from .flow_files import clip_file, save, sd3_to_stability, t5_file, vae_to_ldm

    sd = {f"model.diffusion_model.{k}": v for k, v in sd3_to_stability(pipe.transformer.state_dict()).items()}
    for kind, te in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2)):
        sd.update({f"text_encoders.{kind}.transformer.{k}": v for k, v in clip_file(te).items()})
    sd.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5_file(pipe.text_encoder_3).items()})
    sd.update({f"first_stage_model.{k}": v for k, v in vae_to_ldm(pipe.vae.state_dict()).items()})
    save(sd, root / "models" / "sd3-incl-clips-t5.safetensors")
    save(fp8_copy(sd3_to_stability(pipe.transformer.state_dict())), root / "models" / "sd3-fp8.safetensors")
    write_gguf(sd3_to_stability(pipe.transformer.state_dict()), root / "models" / "sd3-q8.gguf", arch="sd3")
    (root / "loras").mkdir()
    (root / "upscalers").mkdir()
    (root / "labels.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def sd3_server(sd3_store, tmp_path_factory):
    settings = make_settings(sd3_store, tmp_path_factory.mktemp("sd3-work"), default_model="sd3-folder")
    with LiveServer(settings) as s:
        yield s


@pytest.mark.parametrize("name, modules", [("sd3-incl-clips-t5", []), ("sd3-transformer", ["clip_l", "clip_g", "sd3_vae"])])
def test_sd3_files_generate_deterministically(sd3_server, name, modules):
    a = sd3_server.run(**SD3, model=name, seed=8)
    assert px(a).std() > 0 and a["payload"]["modules"] == modules
    assert np.array_equal(px(a), px(sd3_server.run(**SD3, model=name, seed=8)))
    assert not np.array_equal(px(a), px(sd3_server.run(**dict(SD3, prompt="a blue sphere"), model=name, seed=8)))


def test_sd3_all_in_one_equals_the_diffusers_folder(sd3_server):
    assert same_image(px(sd3_server.run(**SD3, model="sd3-incl-clips-t5", seed=4)),
                      px(sd3_server.run(**SD3, model="sd3-folder", seed=4)))


def test_sd3_without_t5_is_diffusers_without_text_encoder_3(sd3_server, sd3_store):
    """No T5 file installed: T5's part of the prompt is zeros, as StableDiffusion3Pipeline does
    with text_encoder_3=None (compared as test_sd3 compares the folder: Simple sigmas, 2/255)."""
    from diffusers import StableDiffusion3Pipeline

    ours = px(sd3_server.run(**dict(SD3, steps=4), model="sd3-transformer", seed=7))
    assert not np.array_equal(ours, px(sd3_server.run(**dict(SD3, steps=4), model="sd3-folder", seed=7)))
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_store / "models" / "sd3-folder", text_encoder_3=None,
                                                    tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(7))
    ref = pipe("a red cube", height=64, width=64, num_inference_steps=4, guidance_scale=4.0, latents=noise,
               sigmas=list(np.linspace(1.0, 1 / 4, 4)), output_type="np").images[0]
    ref = np.rint(ref * 255).astype(np.int16)
    assert np.abs(ours - ref).max() <= 2 and np.abs(ours - ref).mean() < 0.5
    r = sd3_server.client.post("/txt2img", json={**SD3, "model": "sd3-transformer", "modules": ["clip_l", "nope"]})
    assert r.status_code == 422 and "'nope'" in r.text and "clip_g" in r.text, r.text


@pytest.mark.broker
def test_a_cluster_api_node_chooses_modules_from_the_workers_catalog(redis_server, flow_store, tmp_path):  # noqa: F811
    """An API node has no model files: it chooses components from what the live workers publish;
    the worker resolves the job record's names against its own files, to the same ones."""
    from diffusionapi.jobs.backends.celery.catalog import CatalogRegistry, catalog_of
    from diffusionapi.jobs.backends.celery.state import RedisJobState
    from diffusionapi.jobs.resolve import resolve_job

    state = RedisJobState(redis_server.url)
    state.r.flushdb()
    try:
        worker_settings = make_settings(flow_store, tmp_path / "w", default_model="flux-transformer")
        local = Registry(worker_settings)
        models = {m.name: m for m in local.models()}
        state.heartbeat("w", {"device": "cuda:0"}, ttl=30, catalog=catalog_of(local, [models["flux-transformer"]]))
        (tmp_path / "api-store").mkdir()
        api_settings = make_settings(tmp_path / "api-store", tmp_path / "api", default_model="flux-transformer")
        api = CatalogRegistry(api_settings, state, refresh_sec=0)
        assert {c.name for c in api.components.files()} >= {"clip_l", "t5xxl_fp16", "ae"}
        job = resolve_txt2img(Txt2ImgRequest(**FLUX), api, api_settings)
        assert job.echo["modules"] == ["clip_l", "t5xxl_fp16", "ae"]
        ran = resolve_job("txt2img", job.payload, local, worker_settings).plan.model
        assert [p.name for p in ran.modules] == ["clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors"]
        assert ran.modules[0].parent == flow_store / "text_encoders"
        with pytest.raises(RequestError) as e:
            resolve_txt2img(Txt2ImgRequest(**FLUX, modules=["clip_g"]), api, api_settings)
        assert e.value.field == "modules" and "valid choices" in e.value.message
    finally:
        state.close()


@pytest.mark.parametrize("name", ["sd3-fp8", "sd3-q8"])
def test_sd3_fp8_and_gguf_files_run_close_to_full_precision(sd3_server, name):
    """SD 3.x MMDiT files in fp8 and Q8_0 GGUF (Stability's key names), without T5 as the store has none."""
    full = px(sd3_server.run(**SD3, model="sd3-transformer", seed=6))
    a = px(sd3_server.run(**SD3, model=name, seed=6))
    assert np.array_equal(a, px(sd3_server.run(**SD3, model=name, seed=6)))
    # Measured on the tiny model (CPU, fp32 compute): 41.8 dB (fp8), 54.6 dB (Q8_0).
    assert not np.array_equal(a, full) and psnr(a, full) > (32 if name == "sd3-fp8" else 45)
