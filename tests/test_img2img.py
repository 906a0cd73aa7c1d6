"""img2img, inpainting, several images per job and /upscale, through HTTP on tiny models."""
from __future__ import annotations

import functools
import math

import pytest
import torch

from diffusionapi.engine import img2img as i2i
from diffusionapi.engine.kdiffusion import ModelSigmas


# ---------------------------------------------------------------------------- units

@pytest.mark.parametrize("steps, strength, expected", [
    (20, 0.75, 16), (20, 1.0, 20), (10, 0.5, 6), (4, 0.01, 1), (7, 0.33, 3), (30, 0.999, 30), (1, 0.5, 1),
])
def test_steps_run_are_a1111s_t_enc_plus_one(steps, strength, expected):
    # A1111 (img2img_fix_steps off): t_enc = int(min(strength, 0.999) * steps); sigmas[steps - t_enc - 1:]
    # of the steps+1 sigmas is the slice, i.e. t_enc + 1 intervals.
    sigmas = list(range(steps + 1))
    t_enc = int(min(strength, 0.999) * steps)
    assert len(sigmas[steps - t_enc - 1:]) - 1 == expected == i2i.img2img_steps(steps, strength)


class FakeCFG:
    """Stands in for the CFG denoiser: a fixed model output, converted as the real one does."""

    def __init__(self, vpred: bool):
        self.ms = ModelSigmas.from_scheduler_config({})
        self.vpred = vpred
        self.out = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))

    def model_output(self, x_in, t):
        return self.out

    def __call__(self, x, sigma):
        s = float(sigma)
        c_in = 1 / math.sqrt(s * s + 1)
        if self.vpred:
            return x * (1 / (s * s + 1)) - self.out * (s * c_in)
        return x - self.out * s


def implied_x0(out, x_in, sigma, vpred):
    c = 1 / math.sqrt(1 + sigma * sigma)
    if vpred:  # v = c * eps - sigma * c * x0 and x_vp = c * x0 + sigma * c * eps
        return c * x_in - sigma * c * out
    return x_in / c - sigma * out


@pytest.mark.parametrize("vpred", [False, True])
def test_masked_denoiser_keeps_the_init_outside_the_mask_in_both_forms(vpred):
    inner = FakeCFG(vpred)
    init = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    keep = torch.zeros(1, 1, 4, 4)
    keep[..., :2] = 1
    den = i2i.MaskedDenoiser(inner, init, keep)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3)) * 3
    sigma = torch.tensor(3.0)
    x0 = den(x, sigma)
    torch.testing.assert_close(x0[..., :2], init[..., :2])
    torch.testing.assert_close(x0[..., 2:], inner(x, sigma)[..., 2:])
    # The timestep form (eps or v at a timestep) implies the same x0.
    t = inner.ms.sigma_to_t(torch.tensor(3.0, dtype=torch.float64)).reshape(1)
    s = float(inner.ms.t_to_sigma(t)[0])
    x_in = x / math.sqrt(1 + s * s)
    out = den.model_output(x_in, t)
    got = implied_x0(out, x_in, s, vpred)
    torch.testing.assert_close(got[..., :2], init[..., :2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[..., 2:], implied_x0(inner.out, x_in, s, vpred)[..., 2:], atol=1e-4, rtol=1e-4)
    assert den.vpred is vpred  # everything else passes through


@pytest.mark.parametrize("vpred", [False, True])
def test_masked_denoisers_preview_estimate_is_the_blended_one(vpred):
    from diffusionapi.engine.sampling import x0_from_model_output

    inner = FakeCFG(vpred)
    init = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    keep = torch.zeros(1, 1, 4, 4)
    keep[..., :2] = 1
    den = i2i.MaskedDenoiser(inner, init, keep)
    assert den.latest_x0() is None
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3)) * 3
    x0 = den(x, torch.tensor(3.0))
    torch.testing.assert_close(den.latest_x0(), x0)
    # Timestep samplers store the estimate of the (blended) model output on the denoiser they run.
    t = inner.ms.sigma_to_t(torch.tensor(3.0, dtype=torch.float64)).reshape(1)
    s = float(inner.ms.t_to_sigma(t)[0])
    x_in = x / math.sqrt(1 + s * s)
    den._x0 = functools.partial(x0_from_model_output, x_in, den.model_output(x_in, t), s, vpred)
    torch.testing.assert_close(den.latest_x0()[..., :2], init[..., :2], atol=1e-4, rtol=1e-4)


def test_concat_unet_adds_the_conditioning_to_both_cfg_halves():
    seen = {}

    class Unet:
        dtype = torch.float32

        def __call__(self, x, t, **kw):
            seen["x"] = x
            return (x[:, :4],)

    cond = torch.arange(2 * 5 * 2 * 2, dtype=torch.float32).reshape(2, 5, 2, 2)
    wrapped = i2i.ConcatUNet(Unet(), cond)
    x = torch.randn(4, 4, 2, 2)  # [uncond of 2 images; cond of 2 images]
    wrapped(x, torch.tensor([1.0]))
    assert seen["x"].shape == (4, 9, 2, 2)
    assert torch.equal(seen["x"][:2, 4:], cond) and torch.equal(seen["x"][2:, 4:], cond)
    assert wrapped.dtype == torch.float32


# ---------------------------------------------------------------------------- through HTTP

import base64  # noqa: E402
import io  # noqa: E402
import shutil  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from diffusionapi import imageinput as ii  # noqa: E402

from .checkpoint_factory import save_original_checkpoint  # noqa: E402
from .conftest import LiveServer, make_settings  # noqa: E402
from .inpaint_factory import save_tiny_inpaint_model, tiny_inpaint_pipeline  # noqa: E402
from .tiny_files import write_tiny_upscaler  # noqa: E402

INPAINT_MODELS = ("tiny-sd15-inpaint", "tiny-sdxl-inpaint", "tiny-sd15-inpaint-single")


@pytest.fixture(scope="module")
def i2i_server(model_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("i2i-store")
    models = root / "models"
    for name in ("tiny-sd15", "tiny-sdxl"):
        shutil.copytree(model_store / "models" / name, models / name)
    save_tiny_inpaint_model("sd15", models / "tiny-sd15-inpaint")
    save_tiny_inpaint_model("sdxl", models / "tiny-sdxl-inpaint")
    save_original_checkpoint(tiny_inpaint_pipeline("sd15", seed=3), models / "tiny-sd15-inpaint-single.safetensors")
    ups = root / "upscalers"
    write_tiny_upscaler(ups / "ESRGAN_2x.pth", "esrgan-old", scale=2)
    (root / "loras").mkdir()
    (root / "labels.json").write_text("{}")
    settings = make_settings(root, tmp_path_factory.mktemp("i2i-work"), upscalers_dir=ups, max_hires_pixels=4_000_000)
    with LiveServer(settings) as s:
        yield s


def b64png(im: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def picture(w: int = 64, h: int = 64) -> Image.Image:
    """A smooth image with some structure (gradients and a disc)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = (xx / max(w - 1, 1) * 255)
    g = (yy / max(h - 1, 1) * 255)
    b = np.where((xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (min(w, h) / 4) ** 2, 230, 40)
    return Image.fromarray(np.stack([r, g, b], -1).astype(np.uint8))


def square_mask(w=64, h=64, box=(16, 16, 40, 44)) -> Image.Image:
    m = Image.new("L", (w, h), 0)
    m.paste(255, box)
    return m


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode(b64).convert("RGB")).astype(int)


I2I = dict(prompt="a tiny test", steps=4, cfg_scale=5.0, sampler_name="Euler", seed=7, fileType="png")


def run_i2i(server, **payload) -> dict:
    r = server.client.post("/img2img", json=payload)
    assert r.status_code == 200, r.text
    done = server.wait(r.json()["job_id"])
    assert done["state"] == "done", done
    return done


class UNetCalls:
    """Counts a loaded model's UNet calls and records their input channels."""

    def __init__(self, server, model: str):
        entry = server.app.state.registry.resolve_model(model)
        self.unet = server.engine.cache.get(entry).pipe.unet
        self.channels: list[int] = []

    def __enter__(self):
        self.handle = self.unet.register_forward_pre_hook(lambda mod, args: self.channels.append(args[0].shape[1]))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
@pytest.mark.parametrize("steps, strength", [(4, 0.5), (10, 0.75), (5, 1.0), (6, 0.1), (3, 0.34), (8, 0.999)])
def test_img2img_runs_exactly_a1111s_sampler_steps(i2i_server, sampler, steps, strength):
    run_i2i(i2i_server, **dict(I2I, model="tiny-sd15", init_image=b64png(picture()), steps=1))  # loads the model
    with UNetCalls(i2i_server, "tiny-sd15") as calls:
        r = run_i2i(i2i_server, **dict(I2I, model="tiny-sd15", init_image=b64png(picture()), steps=steps,
                                       denoising_strength=strength, sampler_name=sampler))
    # One UNet call per step (CFG batched): t_enc + 1 of them, t_enc = int(min(s, 0.999) * steps).
    assert len(calls.channels) == int(min(strength, 0.999) * steps) + 1
    assert (r["width"], r["height"]) == (64, 64)
    assert f"Steps: {steps}," in r["infotext"] and f"Denoising strength: {strength:g}" in r["infotext"]
    assert r["payload"]["init_image"] == "<PNG 64x64>" and r["payload"]["denoising_strength"] == strength


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_tiny_strength_stays_close_to_the_init_image(i2i_server, model):
    # Measured on the latents the VAE decodes (caught at its first layer): the tiny random VAE
    # decodes any latents to similar-looking noise, so pixels would not tell near from far.
    init = picture()
    loaded = i2i_server.engine.cache.get(i2i_server.app.state.registry.resolve_model(model))
    with torch.inference_mode():
        z = i2i_server.engine._encode(loaded, init) / loaded.pipe.vae.config.scaling_factor
    caught = []
    hook = loaded.pipe.vae.post_quant_conv.register_forward_pre_hook(lambda mod, args: caught.append(args[0].clone()))
    try:
        distance = {}
        for strength in (0.01, 1.0):
            caught.clear()
            run_i2i(i2i_server, **dict(I2I, model=model, init_image=b64png(init), steps=20, denoising_strength=strength))
            distance[strength] = float((caught[0].float() - z).norm() / z.norm())
    finally:
        hook.remove()
    # 0.01 runs one step from the smallest sigma (0.03, about half the tiny VAE's latent scale);
    # 1.0 starts from pure noise (sigma 14.6).
    assert distance[0.01] < 1.0 and distance[1.0] > 100 * distance[0.01], distance


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl", *INPAINT_MODELS])
@pytest.mark.parametrize("full_res", [False, True])
def test_inpainting_keeps_every_pixel_outside_the_mask(i2i_server, model, full_res):
    init, mask = picture(), square_mask()
    with UNetCalls(i2i_server, model) as calls:
        r = run_i2i(i2i_server, **dict(I2I, model=model, init_image=b64png(init), mask=b64png(mask), mask_blur=2,
                                       denoising_strength=0.9, inpaint_full_res=full_res,
                                       inpaint_full_res_padding=4))
    out = pixels(r["image"])
    outside = np.asarray(ii.blur_mask(mask, 2)) == 0
    assert (out[outside] == np.asarray(init)[outside]).all()
    inside = np.asarray(mask) == 255
    assert np.abs(out[inside] - np.asarray(init)[inside]).mean() > 5  # and the inside was repainted
    # Inpainting checkpoints see 9 channels (latents + mask + masked-image latents), others 4.
    assert set(calls.channels) == {9 if model in INPAINT_MODELS else 4}
    if full_res:
        assert "Inpaint area: Only masked" in r["infotext"] and "Masked area padding: 4" in r["infotext"]


def test_inverted_mask_and_fills(i2i_server):
    init, mask = picture(), square_mask()
    for fill in (0, 2, 3):
        r = run_i2i(i2i_server, **dict(I2I, model="tiny-sd15", init_image=b64png(init), mask=b64png(mask), mask_blur=0,
                                       inpainting_fill=fill, inpainting_mask_invert=1))
        out = pixels(r["image"])
        inside = np.asarray(mask) == 255  # inverted: the square is kept
        assert (out[inside] == np.asarray(init)[inside]).all()
        assert f"Masked content: {ii.FILL_MODES[fill]}" in r["infotext"] and "Mask mode: Inpaint not masked" in r["infotext"]


@pytest.mark.parametrize("kind", ["txt2img", "img2img"])
def test_batch_image_k_equals_the_single_job_with_seed_plus_k(i2i_server, kind):
    extra = dict(init_image=b64png(picture()), denoising_strength=0.8) if kind == "img2img" else dict(width=64, height=64)
    payload = dict(I2I, model="tiny-sd15", sampler_name="Euler a", seed=100, **extra)
    submit = (lambda **p: i2i_server.client.post("/img2img", json=p)) if kind == "img2img" else \
        (lambda **p: i2i_server.client.post("/txt2img", json=p))
    batch = i2i_server.wait(submit(**payload, batch_size=3).json()["job_id"])
    assert batch["state"] == "done" and [im["seed"] for im in batch["images"]] == [100, 101, 102]
    assert batch["image"] == batch["images"][0]["image"]
    for k in range(3):
        single = i2i_server.wait(submit(**dict(payload, seed=100 + k)).json()["job_id"])
        assert single["seed"] == 100 + k and "images" not in single or single["images"] is None
        diff = np.abs(pixels(batch["images"][k]["image"]) - pixels(single["image"]))
        # A batched convolution may sum in another order on CPU: allow 2 of 255 levels.
        assert diff.max() <= 2, (k, diff.max())
        assert f"Seed: {100 + k}," in batch["images"][k]["infotext"]
        assert batch["images"][k]["output_path"].endswith(f"{batch['job_id']}-{k}.png")


def test_n_iter_orders_batches_after_one_another(i2i_server):
    r = i2i_server.run(**dict(I2I, model="tiny-sd15", width=64, height=64, seed=40, batch_size=2, n_iter=2))
    assert [im["seed"] for im in r["images"]] == [40, 41, 42, 43]
    third = i2i_server.run(**dict(I2I, model="tiny-sd15", width=64, height=64, seed=42))
    assert np.abs(pixels(r["images"][2]["image"]) - pixels(third["image"])).max() <= 2
    assert "Batch size: 2" in r["images"][3]["infotext"] and "Batch pos: 1" in r["images"][3]["infotext"]


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("src, target", [((80, 48), (64, 64)), ((48, 80), (64, 48))])
def test_every_resize_mode_gives_the_requested_size(i2i_server, mode, src, target):
    r = run_i2i(i2i_server, **dict(I2I, model="tiny-sd15", init_image=b64png(picture(*src)), resize_mode=mode,
                                   width=target[0], height=target[1], steps=2))
    assert (r["width"], r["height"]) == target == decode(r["image"]).size


def test_size_defaults_to_the_init_image_rounded_to_8(i2i_server):
    r = run_i2i(i2i_server, **dict(I2I, model="tiny-sd15", init_image=b64png(picture(70, 45), "JPEG"), steps=2))
    assert (r["width"], r["height"]) == (72, 48)
    data_url = "data:image/webp;base64," + b64png(picture(40, 24), "WEBP")
    r = run_i2i(i2i_server, **dict(I2I, model="tiny-sd15", init_image=data_url, steps=2))
    assert (r["width"], r["height"]) == (40, 24)


def test_phases_include_encoding(i2i_server):
    from diffusionapi.jobs.resolve import resolve_job

    phases = []
    job = resolve_job("img2img", dict(I2I, model="tiny-sd15", init_image=b64png(picture()), steps=2),
                      i2i_server.app.state.registry, i2i_server.app.state.settings)
    i2i_server.engine.generate(job.plan, lambda phase, p: phases.append(phase), lambda: False)
    assert phases.index("encoding") < phases.index("generation")


def test_upscale_matches_the_hires_paths_upscaler(i2i_server):
    from diffusionapi.engine.upscalers import upscale_image

    src = picture(40, 24)
    r = i2i_server.client.post("/upscale", json={"image": b64png(src), "upscaler": "ESRGAN_2x", "scale": 1.5})
    assert r.status_code == 200, r.text
    done = i2i_server.wait(r.json()["job_id"])
    assert done["state"] == "done" and (done["width"], done["height"]) == (60, 36)
    entry = i2i_server.app.state.registry.resolve_upscaler("ESRGAN_2x")
    expected = upscale_image(i2i_server.engine.upscalers.get(entry.path), src, (60, 36))
    assert np.array_equal(pixels(done["image"]), np.asarray(expected).astype(int))
    assert "Postprocess upscaler: ESRGAN_2x, Postprocess upscale by: 1.5" in done["infotext"]
    for method, resample in ii.PIXEL_RESIZERS.items():
        done = i2i_server.wait(i2i_server.client.post("/upscale", json={
            "image": b64png(src), "upscaler": method.lower(), "width": 50, "height": 30}).json()["job_id"])
        assert np.array_equal(pixels(done["image"]), np.asarray(src.resize((50, 30), resample)).astype(int))
        assert done["payload"]["upscaler"] == method and done["payload"]["image"] == "<PNG 40x24>"


def _queue_ids(server) -> set:
    return {j["job_id"] for j in server.client.get("/queue").json()["jobs"]}


def _png_claiming(w: int, h: int) -> str:
    import struct
    import zlib

    data = bytearray(base64.b64decode(b64png(Image.new("RGB", (1, 1)))))
    at = data.index(b"IHDR")
    data[at + 4:at + 12] = struct.pack(">II", w, h)
    data[at + 17:at + 21] = struct.pack(">I", zlib.crc32(bytes(data[at:at + 17])) & 0xFFFFFFFF)
    return base64.b64encode(bytes(data)).decode()


def _truncated_png() -> str:
    raw = base64.b64decode(b64png(picture()))
    return base64.b64encode(raw[: len(raw) // 2]).decode()


BAD = [
    ("/img2img", {"init_image": base64.b64encode(b"just some text, not an image").decode()}, 422, "init_image",
     "not a PNG, JPEG or WebP"),
    ("/img2img", {"init_image": "%%% not base64 %%%"}, 422, "init_image", "not valid base64"),
    ("/img2img", {"init_image": _truncated_png()}, 422, "init_image", "truncated or corrupt"),
    ("/img2img", {"init_image": _png_claiming(60_000, 60_000)}, 413, "init_image", "decompression bomb"),
    ("/img2img", {"init_image": _png_claiming(3000, 2000)}, 413, "init_image", "limit is 4000000"),
    ("/img2img", {"mask": "MASK_OTHER_SIZE"}, 422, "mask", "same size"),
    ("/img2img", {"denoising_strength": 0}, 422, "denoising_strength", "greater than 0"),
    ("/img2img", {"denoising_strength": 1.5}, 422, "denoising_strength", "less than or equal to 1"),
    ("/img2img", {"resize_mode": 4}, 422, "resize_mode", "less than or equal to 3"),
    ("/img2img", {"batch_size": 9}, 422, "batch_size", "<= 8"),
    ("/txt2img", {"n_iter": 17}, 422, "n_iter", "<= 16"),
    ("/txt2img", {"batch_size": 8, "width": 1024, "height": 1024}, 422, "width", "x batch_size"),
    ("/upscale", {"upscaler": "Latent"}, 422, "upscaler", "hires fix only"),
    ("/upscale", {"upscaler": "no-such-upscaler"}, 422, "upscaler", "Lanczos"),
    ("/upscale", {"upscaler": "Lanczos", "scale": 100}, 422, "scale", "less than or equal to 16"),
    ("/upscale", {"upscaler": "Lanczos", "scale": 10, "image": b64png(picture(300, 300))}, 422, "scale",
     "exceeds 4000000"),
    ("/upscale", {"upscaler": "Lanczos", "width": 64}, 422, "width and height go together", ""),
    ("/upscale", {"upscaler": "Lanczos", "image": _truncated_png()}, 422, "image", "truncated or corrupt"),
]


@pytest.mark.parametrize("path, change, status, field, why", BAD, ids=[f"{p}:{f}:{w}" for p, _, _, f, w in BAD])
def test_bad_input_is_a_4xx_naming_the_field_and_nothing_is_queued(i2i_server, path, change, status, field, why):
    base = {"/img2img": dict(I2I, model="tiny-sd15", init_image=b64png(picture())),
            "/txt2img": dict(I2I, model="tiny-sd15"),
            "/upscale": {"image": b64png(picture(32, 32)), "upscaler": "Lanczos"}}[path]
    body = {**base, **change}
    if body.get("mask") == "MASK_OTHER_SIZE":
        body["mask"] = b64png(square_mask(32, 64, (0, 0, 8, 8)))
    before = _queue_ids(i2i_server)
    r = i2i_server.client.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["status"] == "error" and field in r.json()["error"] and why in r.json()["error"], r.json()
    assert _queue_ids(i2i_server) == before


def test_image_bodies_have_their_own_size_limit(i2i_server):
    big = "A" * (i2i_server.settings.max_body_bytes + 10)
    assert i2i_server.client.post("/txt2img", json={"prompt": big}).status_code == 413
    r = i2i_server.client.post("/img2img", json=dict(I2I, init_image=b64png(picture()), negative_prompt="x",
                                                    padding_field=big))
    assert r.status_code == 200 and r.json()["ignored_fields"] == ["padding_field"]
    assert i2i_server.wait(r.json()["job_id"])["state"] == "done"


def test_txt2img_on_an_inpainting_model_gets_the_blank_conditioning(i2i_server):
    with UNetCalls(i2i_server, "tiny-sdxl-inpaint") as calls:
        r = i2i_server.run(**dict(I2I, model="tiny-sdxl-inpaint", width=64, height=64, steps=2))
    assert r["state"] == "done" and set(calls.channels) == {9}
