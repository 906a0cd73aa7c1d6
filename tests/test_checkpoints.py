"""Single-file checkpoints and hub-cache folders for SD 1.5 and SDXL, loaded offline through HTTP."""
from __future__ import annotations

import base64
import io
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionapi.demo import tiny_sd15_pipeline, tiny_sdxl_pipeline, tiny_sdxl_refiner_pipeline

from .checkpoint_factory import save_original_checkpoint
from .conftest import SMALL, LiveServer, make_settings


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {_Evil.marker}",))


@pytest.fixture(scope="module")
def ckpt_server(model_store, tmp_path_factory):
    work = tmp_path_factory.mktemp("ckpt")
    models = work / "models"
    shutil.copytree(model_store / "models", models)
    save_original_checkpoint(tiny_sd15_pipeline(0), models / "single-sd15.safetensors")
    save_original_checkpoint(tiny_sd15_pipeline(0), models / "old" / "single-sd15-ckpt.ckpt", fmt="ckpt")
    xl = tiny_sdxl_pipeline(0)
    save_original_checkpoint(xl, models / "xl" / "single-sdxl.safetensors")
    save_original_checkpoint(tiny_sdxl_refiner_pipeline(0, base=xl), models / "xl" / "single-refiner.safetensors")
    hub = models / "models--testorg--tiny-hub-sdxl"
    shutil.copytree(models / "tiny-sdxl", hub / "snapshots" / "feed")
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("feed")
    # Header intact, tensor data cut short: found by the registry, fails when loaded.
    good = (models / "single-sd15.safetensors").read_bytes()
    (models / "cut-sd15.safetensors").write_bytes(good[: len(good) - 4096])
    shutil.copytree(models / "single-sd15.config", models / "cut-sd15.config")
    (models / "garbage.safetensors").write_bytes(b"\x05\x00")
    _Evil.marker = work / "pwned"
    with open(models / "evil.ckpt", "wb") as f:  # legacy pickle format
        pickle.dump({"state_dict": {"x": _Evil()}}, f)
    torch.save({"state_dict": {"x": _Evil()}}, str(models / "evil-zip.ckpt"))  # torch's zip format
    settings = make_settings(model_store, work, models_dir=models)
    with LiveServer(settings) as s:
        yield s


def px(r):
    assert r["state"] == "done", r
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r["image"]))))


def test_listing_types_and_formats(ckpt_server):
    models = {m["name"]: m for m in ckpt_server.client.get("/models").json()["models"]}
    assert models["single-sd15"]["type"] == "sd15" and models["single-sd15"]["format"] == "single-file"
    assert models["single-sd15-ckpt"]["format"] == "single-file"
    assert models["single-sdxl"]["type"] == "sdxl" and models["single-refiner"]["type"] == "sdxl-refiner"
    assert models["models--testorg--tiny-hub-sdxl"]["type"] == "sdxl"
    assert models["models--testorg--tiny-hub-sdxl"]["format"] == "hub-cache"
    assert not any(n.endswith(".config") for n in models)
    assert "evil" not in models and "garbage" not in models


@pytest.mark.parametrize("single, folder", [("single-sd15", "tiny-sd15"), ("single-sd15-ckpt", "tiny-sd15"),
                                            ("single-sdxl", "tiny-sdxl"), ("tiny-hub-sdxl", "tiny-sdxl")])
def test_single_file_and_hub_cache_match_the_folder(ckpt_server, single, folder):
    p = dict(SMALL, seed=17, fileType="png")
    assert np.array_equal(px(ckpt_server.run(**p, model=single)), px(ckpt_server.run(**p, model=folder)))


def test_single_file_sdxl_with_single_file_refiner(ckpt_server):
    p = dict(SMALL, seed=3, fileType="png", steps=6, refiner_switch_at=0.5)
    a = ckpt_server.run(**p, model="single-sdxl", refiner_checkpoint="single-refiner")
    b = ckpt_server.run(**p, model="tiny-sdxl", refiner_checkpoint="tiny-sdxl-refiner")
    assert np.array_equal(px(a), px(b))


@pytest.mark.parametrize("name", ["evil", "evil-zip"])
def test_malicious_pickle_refused_and_never_run(ckpt_server, name):
    r = ckpt_server.client.post("/txt2img", json=dict(SMALL, model=name))
    assert r.status_code == 422 and "not usable" in r.json()["error"] and "refused" in r.json()["error"], r.text
    assert not _Evil.marker.exists()


def test_garbage_file_is_4xx(ckpt_server):
    r = ckpt_server.client.post("/txt2img", json=dict(SMALL, model="garbage"))
    assert r.status_code == 422 and "garbage" in r.json()["error"]


def test_truncated_checkpoint_fails_the_job_and_server_goes_on(ckpt_server):
    r = ckpt_server.run(**dict(SMALL, model="cut-sd15"))
    assert r["state"] == "error" and "cut-sd15" in r["error"]
    assert ckpt_server.run(**dict(SMALL, model="single-sd15"))["state"] == "done"


def test_checkpoint_without_config_uses_the_shipped_one_offline(ckpt_server, tmp_path):
    # A tiny checkpoint does not fit the shipped (real SD 1.5) config: a clear job error, no hub access.
    models = ckpt_server.settings.models_dir
    shutil.copy(models / "single-sd15.safetensors", models / "no-config.safetensors")
    try:
        r = ckpt_server.run(**dict(SMALL, model="no-config"))
    finally:
        (models / "no-config.safetensors").unlink()
    assert r["state"] == "error" and "no-config" in r["error"]


def test_shipped_tokenizer_and_configs():
    from transformers import CLIPTokenizer

    from diffusionapi.engine.checkpoints import packaged_config

    for fam, toks in (("sd15", ["tokenizer"]), ("sdxl", ["tokenizer", "tokenizer_2"]), ("sdxl-refiner", ["tokenizer_2"])):
        folder = packaged_config(fam)
        for t in toks:
            tok = CLIPTokenizer.from_pretrained(str(folder / t))
            assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert json.loads((folder / "model_index.json").read_text())["_class_name"].startswith("StableDiffusion")


def test_shipped_configs_build_the_published_architectures():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffusionapi.engine.checkpoints import PACKAGED

    def count(m):
        return round(sum(p.numel() for p in m.parameters()) / 1e6, 2)

    expect = {"sd15": (859.52, 123.06, None), "sdxl": (2567.46, 123.06, 694.66), "sdxl-refiner": (2259.53, None, 694.66)}
    with torch.device("meta"):
        for fam, (unet, te, te2) in expect.items():
            cfg = lambda part: json.loads((PACKAGED / fam / part / "config.json").read_text())  # noqa: E731
            assert count(UNet2DConditionModel.from_config(cfg("unet"))) == unet
            assert count(AutoencoderKL.from_config(cfg("vae"))) == 83.65
            if te:
                assert count(CLIPTextModel(CLIPTextConfig(**cfg("text_encoder")))) == te
            if te2:
                assert count(CLIPTextModelWithProjection(CLIPTextConfig(**cfg("text_encoder_2")))) == te2


def test_infotext_model_hash_for_single_files(ckpt_server):
    import hashlib

    from diffusionapi.images import read_infotext

    path = ckpt_server.settings.models_dir / "single-sd15.safetensors"
    short = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    info = read_infotext(base64.b64decode(ckpt_server.run(**dict(SMALL, model="single-sd15", fileType="png"))["image"]))
    assert f"Model hash: {short}, Model: single-sd15," in info
    info = read_infotext(base64.b64decode(ckpt_server.run(**dict(SMALL, model="tiny-sd15", fileType="png"))["image"]))
    assert "Model hash" not in info  # a diffusers folder has no single file to hash
    cache = json.loads((ckpt_server.settings.queue_dir / ".file-hashes.json").read_text())
    assert any(v.startswith(short) for v in cache.values())
