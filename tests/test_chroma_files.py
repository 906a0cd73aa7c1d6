"""Chroma as people store it: the transformer alone in lodestones' / ComfyUI's key layout
(``chroma-unlocked-v50.safetensors``, Chroma1-HD; fp8 and Q8_0 GGUF copies) with Flux.1's T5-XXL
and ae component files -- no CLIP-L -- and a ComfyUI-layout all-in-one checkpoint. Each
generates through HTTP and equals the diffusers folder of the same tiny weights (same seed)."""
from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionapi.demo import tiny_chroma_pipeline
from diffusionapi.errors import RequestError
from diffusionapi.jobs.resolve import resolve_txt2img
from diffusionapi.registry import Registry
from diffusionapi.schemas import Txt2ImgRequest

from .conftest import LiveServer, make_settings
from .test_dit_families import save_lora
from .flow_files import chroma_to_bfl, clip_file, fp8_copy, save, tiny_flux_for_files, write_chroma_files, write_gguf

# Slow tier: the tiny Chroma is built, written in four storage forms and served per module.
pytestmark = pytest.mark.slow

# CFG 5 with a negative prompt: the prompt and the negative prompt both go through the file's T5.
CHROMA = dict(prompt="a red cube", negative_prompt="blurry", width=64, height=64, steps=3, cfg_scale=5.0,
              fileType="png", sampler_name="Euler")
COMPONENTS = ["t5xxl_fp16", "ae"]


def px(r):
    assert r["state"] == "done", r
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r["image"]))).convert("RGB")).astype(np.int16)


def same_image(a, b) -> bool:
    """Equal up to the last bit of float rounding (test_flow_files.same_image: the weights are
    bit-identical; the CPU's kernels may round a pixel by 1 for differently aligned tensors)."""
    d = np.abs(a - b)
    return d.max() <= 1 and (d == 0).mean() > 0.99


def psnr(a, b) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("chroma-files")
    pipe = tiny_chroma_pipeline(0)
    pipe.save_pretrained(root / "models" / "chroma-folder")
    write_chroma_files(pipe, root, "chroma-transformer", all_in_one="chroma-all-in-one")
    bfl = chroma_to_bfl(pipe.transformer.state_dict())
    save(fp8_copy(bfl), root / "models" / "chroma-fp8.safetensors")
    write_gguf(bfl, root / "models" / "chroma-q8.gguf", arch="chroma")
    save(pipe.transformer.state_dict(), root / "models" / "chroma-diffusers-keys.safetensors")
    # A Flux.1 CLIP-L beside them, as a Flux.1 user's store has: never picked for Chroma.
    save(clip_file(tiny_flux_for_files(0).text_encoder), root / "text_encoders" / "clip_l.safetensors")
    save_lora(tiny_chroma_pipeline(0), ["to_q", "to_k", "to_v", "to_out.0"], root / "loras" / "chroma-style.safetensors")
    (root / "upscalers").mkdir()
    (root / "labels.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    settings = make_settings(store, tmp_path_factory.mktemp("chroma-work"), default_model="chroma-folder")
    with LiveServer(settings) as s:
        yield s


def test_the_mapping_agrees_with_diffusers_at_chromas_full_width():
    """diffusers' own converter splits the single blocks' fused projection at Chroma's 3072 (so it
    cannot read the tiny files): on tensors of Chroma's widths (one input feature each, values
    random) ours gives the same keys and the same values."""
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers

    from diffusionapi.engine.convert_flow import chroma_bfl_to_diffusers

    inner, mlp = 3072, 4 * 3072
    rows = {"qkv": 3 * inner, "linear1": 3 * inner + mlp, "img_mlp.0": mlp, "txt_mlp.0": mlp}
    g = torch.Generator().manual_seed(0)
    bfl = {}
    for k in chroma_to_bfl(tiny_chroma_pipeline(0).transformer.state_dict()):
        n = next((v for part, v in rows.items() if f".{part}." in k), 8)
        bfl[k] = torch.randn(n, 1, generator=g)
    cfg = dict(attention_head_dim=128, num_attention_heads=inner // 128, num_layers=1, num_single_layers=1,
               approximator_layers=1)
    ours = chroma_bfl_to_diffusers(bfl, cfg)
    theirs = convert_chroma_transformer_checkpoint_to_diffusers(dict(bfl))
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_files_are_listed_as_chroma(server):
    models = {m["name"]: m for m in server.client.get("/models").json()["models"]}
    for name in ("chroma-folder", "chroma-transformer", "chroma-all-in-one", "chroma-fp8", "chroma-q8"):
        assert (models[name]["family"], models[name]["prediction"]) == ("chroma", "flow"), models[name]


def plain_config(model) -> dict:
    cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    skip = {"dtype", "torch_dtype", "architectures", "transformers_version", "output_attentions", "return_dict"}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()
            if not k.startswith("_") and k not in skip}


@pytest.mark.parametrize("name, modules", [("chroma-transformer", COMPONENTS), ("chroma-all-in-one", [])])
def test_single_files_equal_the_diffusers_folder(server, store, name, modules):
    from diffusers import ChromaPipeline

    # Measured: bit-identical images on CPU (same_image allows test_flow_files' 1/255 rounding).
    folder = px(server.run(**CHROMA, model="chroma-folder", seed=5))
    got = server.run(**CHROMA, model=name, seed=5)
    assert same_image(px(got), folder) and px(got).std() > 0
    # The components it ran with are in the record (no CLIP-L, though one is installed).
    assert got["payload"]["modules"] == modules
    loaded = server.engine.cache._items[name].pipe
    ref = ChromaPipeline.from_pretrained(store / "models" / "chroma-folder")
    assert type(loaded) is ChromaPipeline
    for part in ("transformer", "text_encoder", "vae"):
        ours, theirs = getattr(loaded, part).state_dict(), getattr(ref, part).state_dict()
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours), part
        assert plain_config(getattr(loaded, part)) == plain_config(getattr(ref, part)), part
    assert plain_config(loaded.scheduler) == plain_config(ref.scheduler)


def test_transformer_file_is_deterministic_and_prompt_sensitive(server):
    a = px(server.run(**CHROMA, model="chroma-transformer", seed=9))
    assert np.array_equal(a, px(server.run(**CHROMA, model="chroma-transformer", seed=9)))
    assert not np.array_equal(a, px(server.run(**CHROMA, model="chroma-transformer", seed=10)))
    assert not np.array_equal(a, px(server.run(**dict(CHROMA, prompt="a blue sphere"), model="chroma-transformer",
                                               seed=9)))
    assert not np.array_equal(a, px(server.run(**dict(CHROMA, negative_prompt="sharp"), model="chroma-transformer",
                                               seed=9)))


@pytest.mark.parametrize("name", ["chroma-transformer", "chroma-q8"])
def test_loras_on_single_files_change_and_unload(server, name):
    """A Chroma LoRA (diffusers keys) on the single file: it changes the image, unloads exactly,
    and on the transformer-only file gives the folder's image with the same LoRA."""
    lora = [{"name": "chroma-style", "scale": 1.0}]
    base = px(server.run(**CHROMA, model=name, seed=3))
    styled = px(server.run(**CHROMA, model=name, seed=3, loras=lora))
    assert not np.array_equal(base, styled)
    assert np.array_equal(base, px(server.run(**CHROMA, model=name, seed=3)))
    if name == "chroma-transformer":
        assert same_image(styled, px(server.run(**CHROMA, model="chroma-folder", seed=3, loras=lora)))


def test_named_modules_and_forge_additional_modules(server, store):
    """Modules by name, file name or path (Forge sends full paths); forge_additional_modules on
    /sdapi gives the native job's image. A CLIP-L for Chroma is a 422 naming the valid choices."""
    base = server.run(**CHROMA, model="chroma-transformer", seed=2)
    named = server.run(**CHROMA, model="chroma-transformer", seed=2,
                       modules=[str(store / "vae" / "ae.safetensors"), "t5xxl_fp16.safetensors"])
    assert np.array_equal(px(named), px(base)) and named["payload"]["modules"] == COMPONENTS
    body = {"prompt": "a red cube", "negative_prompt": "blurry", "width": 64, "height": 64, "steps": 3, "seed": 2,
            "sampler_name": "Euler", "scheduler": "Simple", "cfg_scale": 5.0, "override_settings": {
                "sd_model_checkpoint": "chroma-transformer",
                "forge_additional_modules": ["C:\\forge\\models\\text_encoder\\t5xxl_fp16.safetensors",
                                             str(store / "vae" / "ae.safetensors")]}}
    r = server.client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    assert np.array_equal(img.astype(np.int16), px(base))
    assert "Module 1: t5xxl_fp16, Module 2: ae" in r.json()["info"]
    r = server.client.post("/txt2img", json={**CHROMA, "model": "chroma-transformer",
                                             "modules": ["clip_l", "t5xxl_fp16", "ae"]})
    assert r.status_code == 422 and "'clip_l'" in r.text and "chroma takes no CLIP-L" in r.text \
        and "valid choices: t5xxl_fp16, ae" in r.text, r.text
    forge = dict(body, override_settings={**body["override_settings"], "forge_additional_modules": [
        "clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors"]})
    r = server.client.post("/sdapi/v1/txt2img", json=forge)
    assert r.status_code == 422 and "clip_l" in r.text and "t5xxl_fp16, ae" in r.text, r.text
    r = server.client.post("/txt2img", json={**CHROMA, "model": "chroma-all-in-one", "modules": ["ae"]})
    assert r.status_code == 422 and "carries its own VAE" in r.text, r.text
    r = server.client.post("/txt2img", json={**CHROMA, "model": "chroma-diffusers-keys"})
    assert r.status_code == 422 and "diffusers-layout chroma" in r.text, r.text


def test_fp8_file_runs_close_to_full_precision(server):
    """fp8 weights stay fp8 in memory (upcast per layer): deterministic, close to the fp32 file."""
    full = px(server.run(**CHROMA, model="chroma-transformer", seed=6))
    a = px(server.run(**CHROMA, model="chroma-fp8", seed=6))
    assert np.array_equal(a, px(server.run(**CHROMA, model="chroma-fp8", seed=6)))
    # Measured on the tiny model (CPU, fp32 compute): 44.9 dB.
    assert not np.array_equal(a, full) and psnr(a, full) > 35
    linear = server.engine.cache._items["chroma-fp8"].pipe.transformer.transformer_blocks[0].attn.to_q
    assert linear.weight.dtype == torch.float8_e4m3fn


def test_gguf_q8_file_runs_close_to_full_precision(server):
    from diffusers.quantizers.gguf.utils import GGUFLinear

    full = px(server.run(**CHROMA, model="chroma-transformer", seed=6))
    a = server.run(**CHROMA, model="chroma-q8", seed=6)
    assert a["payload"]["modules"] == COMPONENTS
    assert np.array_equal(px(a), px(server.run(**CHROMA, model="chroma-q8", seed=6)))
    assert not np.array_equal(px(a), px(server.run(**dict(CHROMA, prompt="a blue sphere"), model="chroma-q8", seed=6)))
    # Measured on the tiny model (CPU, fp32 compute): 56.4 dB.
    assert not np.array_equal(px(a), full) and psnr(px(a), full) > 45
    to_q = server.engine.cache._items["chroma-q8"].pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(to_q, GGUFLinear) and to_q.weight.quant_type.name == "Q8_0"


def _resolve(settings, **payload):
    return resolve_txt2img(Txt2ImgRequest(**payload), Registry(settings), settings)


def test_missing_t5_or_vae_says_which_file_to_add_and_where(store, tmp_path):
    """As for Flux.1 files: a 422 on ``modules`` naming the file to add and its folder."""
    root = tmp_path / "store"
    shutil.copytree(store, root, ignore=shutil.ignore_patterns("chroma-folder", "chroma-all-in-one*"))
    settings = make_settings(root, tmp_path / "work", default_model="chroma-transformer")
    p = {k: v for k, v in CHROMA.items() if k != "negative_prompt"}
    assert _resolve(settings, **p).echo["modules"] == COMPONENTS
    (root / "vae" / "ae.safetensors").unlink()
    with pytest.raises(RequestError) as e:
        _resolve(settings, **p)
    assert e.value.field == "modules" and "ae.safetensors" in e.value.message and str(root / "vae") in e.value.message
    shutil.copy(store / "vae" / "ae.safetensors", root / "vae" / "ae.safetensors")
    (root / "text_encoders" / "t5xxl_fp16.safetensors").unlink()
    with pytest.raises(RequestError) as e:
        _resolve(settings, **p)
    assert e.value.field == "modules" and "T5-XXL" in e.value.message and "t5xxl_fp16.safetensors" in e.value.message \
        and str(root / "text_encoders") in e.value.message, e.value.message
    shutil.copy(store / "text_encoders" / "t5xxl_fp16.safetensors", root / "text_encoders" / "t5xxl_fp16.safetensors")
    shutil.rmtree(root / "text_encoders" / "t5-tokenizer")
    with pytest.raises(RequestError) as e:
        _resolve(settings, **p)
    assert "spiece.model" in e.value.message and str(root / "text_encoders" / "t5-tokenizer") in e.value.message
