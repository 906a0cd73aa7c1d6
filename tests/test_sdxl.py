"""SDXL and the SDXL refiner through HTTP on tiny models."""
from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
from PIL import Image

from diffusionapi.images import read_infotext

from .conftest import SMALL


def px(r):
    assert r["state"] == "done", r
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r["image"]))))


def test_sdxl_generates_deterministically(server):
    p = dict(SMALL, model="Tiny XL", seed=5, fileType="png", width=64, height=96)
    a, b = server.run(**p), server.run(**p)
    assert px(a).shape == (96, 64, 3) and np.array_equal(px(a), px(b))
    assert a["payload"]["model"] == "tiny-sdxl"


def test_refiner_hand_off(server):
    p = dict(SMALL, model="tiny-sdxl", seed=5, fileType="png", steps=10)
    plain = px(server.run(**p))
    seen = []
    job = server.submit(**dict(p, refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0.6))
    refined = server.wait(job, on_poll=lambda b: seen.append((b["current_phase"], b["progress"])))
    assert not np.array_equal(plain, px(refined))
    assert np.array_equal(px(refined), px(server.run(**dict(p, refiner_checkpoint="tiny-sdxl-refiner",
                                                           refiner_switch_at=0.6))))
    values = [v for _, v in seen]
    assert values == sorted(values)
    info = read_infotext(base64.b64decode(refined["image"]))
    assert "Refiner: tiny-sdxl-refiner, Refiner switch at: 0.6" in info
    # The engine's own phase reports: generation up to the switch share, then refining to the end.
    from diffusionapi.jobs.resolve import resolve_request
    from diffusionapi.schemas import Txt2ImgRequest

    spec = resolve_request(Txt2ImgRequest(**dict(p, refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0.6)),
                           server.app.state.registry, server.settings)
    reports = []
    server.engine.generate(spec, lambda ph, v: reports.append((ph, v)), lambda: False)
    gen = [v for ph, v in reports if ph == "generation"]
    ref = [v for ph, v in reports if ph == "refining"]
    assert max(gen) == pytest.approx(60.0) and min(ref) == pytest.approx(60.0) and max(ref) == 99.0
    assert [v for _, v in reports] == sorted(v for _, v in reports)


def test_refiner_shares_vae_and_text_encoder_2(server):
    server.run(**dict(SMALL, model="tiny-sdxl", refiner_checkpoint="tiny-sdxl-refiner", steps=5))
    cache = server.engine.cache
    base, ref = cache._items["tiny-sdxl"], cache._items["tiny-sdxl-refiner"]
    assert ref.pipe.vae is base.pipe.vae
    assert ref.pipe.text_encoder_2 is base.pipe.text_encoder_2


def test_refiner_switch_leaving_no_steps_is_4xx(server):
    r = server.client.post("/txt2img", json=dict(SMALL, model="tiny-sdxl", steps=2,
                                                  refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0.1))
    assert r.status_code == 422 and "refiner_switch_at" in r.json()["error"]


def test_nan_image_is_an_error_not_a_black_image(server):
    import torch
    from safetensors.torch import load_file, save_file

    models = server.settings.models_dir
    bad = models / "tiny-sdxl-nan"
    shutil.copytree(models / "tiny-sdxl", bad)
    try:
        f = bad / "vae" / "diffusion_pytorch_model.safetensors"
        sd = load_file(str(f))
        sd["post_quant_conv.weight"] = torch.full_like(sd["post_quant_conv.weight"], float("nan"))
        save_file(sd, str(f))
        r = server.run(**dict(SMALL, model="tiny-sdxl-nan"))
    finally:
        shutil.rmtree(bad)
    assert r["state"] == "error" and "NaN" in r["error"]
    assert server.run(**dict(SMALL, model="tiny-sdxl"))["state"] == "done"


def test_refiner_leaves_with_the_base_it_borrows_from(model_store, tmp_path):
    import shutil

    from .conftest import LiveServer, make_settings

    models = tmp_path / "models"
    for name in ("tiny-sdxl", "tiny-sdxl-refiner"):
        shutil.copytree(model_store / "models" / name, models / name)
    shutil.copytree(model_store / "models" / "tiny-sdxl", models / "other-sdxl")
    with LiveServer(make_settings(model_store, tmp_path, models_dir=models)) as s:
        s.run(**SMALL, model="tiny-sdxl", refiner_checkpoint="tiny-sdxl-refiner")
        s.run(**SMALL, model="other-sdxl", refiner_checkpoint="tiny-sdxl-refiner")
        cache = s.engine.cache
        assert sorted(cache.resident()) == ["other-sdxl", "tiny-sdxl-refiner"]
        assert cache._items["tiny-sdxl-refiner"].pipe.vae is cache._items["other-sdxl"].pipe.vae
