"""Hires fix through HTTP: latent modes, spandrel upscalers, A1111 step semantics, phases."""
from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from .tiny_files import write_tiny_upscaler
from diffusionapi.images import read_infotext
from diffusionapi.vocabulary import LATENT_UPSCALE_MODES
from diffusionapi.engine.plan import hires_total_steps

from .conftest import SMALL, LiveServer, make_settings

UPSCALERS = {"ESRGAN_old_4x": ("esrgan-old", 4, ".pth"), "RealESRGAN_new_2x": ("esrgan-new", 2, ".pth"),
             "Compact_2x": ("compact", 2, ".safetensors")}


@pytest.fixture(scope="module")
def hires_server(model_store, tmp_path_factory):
    work = tmp_path_factory.mktemp("hires-work")
    ups = work / "upscalers"
    for name, (kind, scale, ext) in UPSCALERS.items():
        write_tiny_upscaler(ups / f"{name}{ext}", kind, scale=scale)
    (ups / "not-a-model.pth").write_bytes(b"junk")
    # Tile the VAE from 96x96 up, so the tiled path runs on tiny images too.
    with LiveServer(make_settings(model_store, work, upscalers_dir=ups, vae_tiling_pixels=96 * 96)) as s:
        yield s


def img(resp):
    assert resp["state"] == "done", resp
    return Image.open(io.BytesIO(base64.b64decode(resp["image"])))


def test_upscalers_listing(hires_server):
    ups = hires_server.client.get("/upscalers").json()["upscalers"]
    names = [u["name"] for u in ups]
    assert names[:len(LATENT_UPSCALE_MODES)] == list(LATENT_UPSCALE_MODES)
    assert all(u["path"] == "internal" for u in ups[:len(LATENT_UPSCALE_MODES)])
    assert set(names[len(LATENT_UPSCALE_MODES):]) == set(UPSCALERS)  # junk file not listed
    for u in ups[len(LATENT_UPSCALE_MODES):]:
        assert u["path"].endswith(u["name"] + UPSCALERS[u["name"]][2])


@pytest.mark.parametrize("upscaler", list(LATENT_UPSCALE_MODES) + list(UPSCALERS))
def test_each_upscaler_gives_the_final_size(hires_server, upscaler):
    r = hires_server.run(**dict(SMALL, model="tiny-sd15", seed=1, width=64, height=48, fileType="png",
                                hires={"enabled": True, "scale": 1.5, "upscaler": upscaler, "steps": 2,
                                       "denoising_strength": 0.5}))
    assert (r["width"], r["height"]) == (96, 72) == img(r).size
    info = read_infotext(base64.b64decode(r["image"]))
    assert "Size: 64x48" in info
    assert "Denoising strength: 0.5, Hires upscale: 1.5, Hires steps: 2, Hires upscaler: " in info
    assert r["payload"]["hires"]["upscaler"] == upscaler


def test_hires_disabled_is_plain(hires_server):
    r = hires_server.run(**dict(SMALL, model="tiny-sd15", hires={"enabled": False, "scale": 2}))
    assert (r["width"], r["height"]) == (64, 64)


@pytest.mark.parametrize("steps, strength", [(10, 0.7), (3, 0.4), (5, 1.0), (1, 0.05), (7, 0.33)])
@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M Karras", "Heun", "DDIM", "UniPC", "DPM fast"])
def test_second_pass_runs_exactly_hires_steps(hires_server, steps, strength, sampler):
    from diffusionapi.engine.sampling import CFGDenoiser, NoiseFactory, encode, img2img_tail, make_schedule
    from diffusionapi.engine.samplers import resolve_sampler

    loaded = hires_server.engine.cache.get(hires_server.app.state.registry.resolve_model("tiny-sd15"))
    plan = img2img_tail(make_schedule(loaded, resolve_sampler(sampler, None), hires_total_steps(steps, strength)), steps)
    assert plan.steps == steps
    calls = []
    x = torch.randn(1, 4, 8, 8) * plan.start_sigma
    with torch.inference_mode():
        den = CFGDenoiser(loaded, encode(loaded, "x", "", 64, 64), 7.0, lambda: None)
        plan.run(den, x, NoiseFactory(torch.Generator().manual_seed(0), 0), calls.append)
    # Steps are sigma intervals; each reports once per model evaluation (Heun: two, the last one).
    assert len(calls) == den.evals == (2 * steps - 1 if sampler == "Heun" else steps)
    assert calls == sorted(calls) and calls[-1] == 1.0


def test_phases_and_monotonic_progress(hires_server):
    seen = []
    r = hires_server.wait(hires_server.submit(**dict(SMALL, model="tiny-sd15", steps=12, width=128, height=128,
                                                     hires={"enabled": True, "steps": 12, "scale": 2})),
                          on_poll=lambda b: seen.append((b["current_phase"], b["progress"])))
    assert r["state"] == "done" and (r["width"], r["height"]) == (256, 256)
    values = [p for _, p in seen]
    assert values == sorted(values)
    for phase, p in seen:
        if phase == "initial generation":
            assert p <= 50
        if phase == "upscaling":
            assert 50 <= p < 100
    # The engine's own reports, unthrottled:
    from diffusionapi.jobs.resolve import resolve_request
    from diffusionapi.schemas import Txt2ImgRequest

    spec = resolve_request(Txt2ImgRequest(**dict(SMALL, model="tiny-sd15", hires={"enabled": True, "steps": 3})),
                           hires_server.app.state.registry, hires_server.settings)
    reports = []
    hires_server.engine.generate(spec, lambda ph, p: reports.append((ph, p)), lambda: False)
    phases = [ph for ph, _ in reports]
    assert phases.index("upscaling") > max(i for i, ph in enumerate(phases) if ph == "initial generation")
    assert [p for _, p in reports] == sorted(p for _, p in reports)


def test_corrupt_upscaler_fails_the_job_and_next_job_works(hires_server):
    ups = hires_server.settings.upscalers_dir
    victim = ups / "Victim_2x.pth"
    write_tiny_upscaler(victim, "compact", scale=2)
    blocker, job = hires_server.submit_held(**dict(SMALL, model="tiny-sd15", steps=8,
                                                    hires={"enabled": True, "upscaler": "Victim_2x"}))
    victim.write_bytes(b"\x80\x02garbage")
    try:
        hires_server.wait(blocker)
        r = hires_server.wait(job)
    finally:
        victim.unlink()
    assert r["state"] == "error" and "Victim_2x.pth" in r["error"], r
    assert hires_server.run(**dict(SMALL, model="tiny-sd15", hires={"enabled": True, "upscaler": "Compact_2x"}))["state"] == "done"


def test_hires_is_deterministic_and_uses_loras_pipeline(hires_server):
    payload = dict(SMALL, model="tiny-sd15", seed=9, fileType="png",
                   hires={"enabled": True, "upscaler": "Latent (bicubic antialiased)", "steps": 2})
    a, b = hires_server.run(**payload), hires_server.run(**payload)
    assert a["image"] == b["image"]


def test_sdxl_hires_and_refiner(hires_server):
    for upscaler in ("Latent", "Compact_2x"):
        r = hires_server.run(**dict(SMALL, model="tiny-sdxl", refiner_checkpoint="tiny-sdxl-refiner", steps=5,
                                    hires={"enabled": True, "upscaler": upscaler, "steps": 2}))
        assert (r["width"], r["height"]) == (128, 128) == img(r).size


def test_hires_limits(hires_server):
    r = hires_server.client.post("/txt2img", json=dict(SMALL, hires={"enabled": True, "scale": 50}))
    assert r.status_code == 422 and "hires.scale" in r.json()["error"]
    r = hires_server.client.post("/txt2img", json=dict(SMALL, hires={"enabled": True, "denoising_strength": 0}))
    assert r.status_code == 422 and "denoising_strength" in r.json()["error"]
