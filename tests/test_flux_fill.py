"""Flux.1 Fill (family flux1-fill) on a tiny random-weight Fill model (384 input channels): a
diffusers folder and a BFL transformer-only file with component files, recognised from their
files; inpainting through HTTP and /sdapi, compared with bare diffusers' FluxFillPipeline; the
422s of the jobs it cannot run."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusionapi.images import read_infotext

from .flow_files import full_vocab_clip, write_flux_files, write_gguf
from .flow_models import b64_png, new_store, px, queued_count, run_posted, serve, step_totals

SIZE = 64
FILL = dict(prompt="a red cube", width=SIZE, height=SIZE, steps=4, model="tiny-fill", fileType="png",
            sampler_name="Euler", denoising_strength=1.0, mask_blur=0)


def init_image() -> np.ndarray:
    """A smooth picture with some texture, so the masked image's latents mean something."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    rng = np.random.default_rng(4)
    img = np.stack([x * 4, y * 4, 255 - (x + y) * 2], -1) + rng.normal(0, 12, (SIZE, SIZE, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def disc_mask() -> np.ndarray:
    """A disc off the 8x8 grid: its edge cuts through latent pixels, so the mask's 8x8 blocks
    (the Fill channels) are not all 0 or all 1."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    inside = (x - 37) ** 2 + (y - 29) ** 2 <= 17 ** 2
    return np.repeat((inside * 255).astype(np.uint8)[..., None], 3, -1)


INIT, MASK = init_image(), disc_mask()
OUTSIDE = MASK[..., 0] == 0


def tiny_fill_for_files(seed: int = 0):
    """The tiny Fill pipeline with a CLIP-L that speaks the shipped CLIP tokenizer, so its single
    file (which carries no tokenizer) and its folder run the same weights on the same tokens."""
    from diffusionapi.demo import tiny_flux_fill_pipeline
    from diffusionapi.engine.convert_flow import clip_tokenizer

    pipe = tiny_flux_fill_pipeline(seed)
    pipe.text_encoder = full_vocab_clip(pipe.text_encoder, seed)
    pipe.tokenizer = clip_tokenizer()
    # A posterior of (nearly) zero variance: FluxFillPipeline samples its masked image's latents,
    # the engine takes the mode (its rule for every init image); with log-variance -30 the two
    # agree to 3e-7. The mode, all the service reads, is the random VAE's own.
    conv = pipe.vae.quant_conv if pipe.vae.quant_conv is not None else pipe.vae.encoder.conv_out
    with torch.no_grad():
        half = conv.weight.shape[0] // 2
        conv.weight[half:] = 0
        conv.bias[half:] = -30
    return pipe


@pytest.fixture(scope="module")
def fill_store(tmp_path_factory):
    root = new_store(tmp_path_factory, "fill-store")
    pipe = tiny_fill_for_files(0)
    pipe.save_pretrained(root / "models" / "tiny-fill")
    # BFL layout + clip_l, t5xxl, ae; a ComfyUI all-in-one file; a city96 Q8_0 GGUF.
    files = write_flux_files(pipe, root, "fill-transformer", all_in_one="fill-all-in-one")
    write_gguf(load_file(str(files["transformer"])), root / "models" / "fill-q8.gguf")
    return root


@pytest.fixture(scope="module")
def fill_server(fill_store, tmp_path_factory):
    yield from serve(fill_store, tmp_path_factory, "fill-work", "tiny-fill")


def inpaint(server, **over):
    return run_posted(server, "/img2img", {**FILL, "init_image": b64_png(INIT), "mask": b64_png(MASK), **over})


def test_folder_and_bfl_file_are_flux1_fill():
    from diffusionapi.families import BY_ID, detect_checkpoint_keys

    assert BY_ID["flux1-fill"].distilled_cfg_scale == 30.0 and BY_ID["flux1"].distilled_cfg_scale == 3.5
    # The same tensor names as Flux.1: only the input projection's shape tells them apart.
    keys = {"double_blocks.0.img_attn.qkv.weight", "img_in.weight"}
    assert detect_checkpoint_keys(keys, shapes={"img_in.weight": [32, 384]}).family == "flux1-fill"
    assert detect_checkpoint_keys(keys, shapes={"img_in.weight": [32, 64]}).family == "flux1"
    assert detect_checkpoint_keys(keys).family == "flux1"  # no shapes read (.ckpt): Flux.1


def test_listed_as_flux1_fill(fill_server):
    models = {m["name"]: m for m in fill_server.client.get("/models").json()["models"]}
    assert (models["tiny-fill"]["family"], models["tiny-fill"]["prediction"]) == ("flux1-fill", "flow")
    for name in ("fill-transformer", "fill-all-in-one", "fill-q8"):
        assert models[name]["family"] == "flux1-fill", name


def test_inpainting_is_deterministic_prompt_sensitive_and_keeps_the_outside(fill_server):
    a, b = inpaint(fill_server, seed=3), inpaint(fill_server, seed=3)
    assert np.array_equal(px(a), px(b))
    inside = px(a)[~OUTSIDE]
    assert inside.std() > 0 and not np.array_equal(inside, INIT[~OUTSIDE])
    # Pixels outside the mask are the init image's, exactly (png, the composite of A1111).
    assert np.array_equal(px(a)[OUTSIDE], INIT[OUTSIDE].astype(np.int16))
    assert not np.array_equal(px(a), px(inpaint(fill_server, seed=3, prompt="a blue sphere")))
    assert not np.array_equal(px(a), px(inpaint(fill_server, seed=4)))
    # Left out, the distilled guidance is BFL's 30 for Fill; given, it is used.
    assert a["payload"]["distilled_cfg_scale"] == 30.0
    assert "Distilled CFG Scale: 30" in read_infotext(base64.b64decode(a["image"]))
    assert not np.array_equal(px(a), px(inpaint(fill_server, seed=3, distilled_cfg_scale=3.5)))


def test_equals_bare_diffusers_flux_fill_pipeline(fill_server, fill_store):
    """Euler + Simple at strength 1 is FluxFillPipeline: the same noise (the seed's CPU generator),
    sigmas and guidance; the pipeline makes its masked image's latents and mask channels itself.
    The first step starts at t = 1 - 1e-4 instead of 1."""
    from diffusers import FluxFillPipeline

    ours = px(inpaint(fill_server, seed=7))
    pipe = FluxFillPipeline.from_pretrained(fill_store / "models" / "tiny-fill")
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(7))
    ref = pipe("a red cube", image=Image.fromarray(INIT), mask_image=Image.fromarray(MASK), height=SIZE, width=SIZE,
               num_inference_steps=4, guidance_scale=30.0, latents=pipe._pack_latents(noise, 1, 16, 8, 8),
               output_type="np").images[0]
    ref = np.rint(ref * 255).astype(np.int16)
    inside = ~OUTSIDE
    assert np.abs(ours[inside] - ref[inside]).max() <= 3 and np.abs(ours[inside] - ref[inside]).mean() < 0.5
    # Without the conditioning (a plain Flux.1 run on these weights is impossible: 384 inputs) the
    # image would not follow it: a different masked image gives a different result.
    other = INIT[::-1].copy()
    r = fill_server.client.post("/img2img", json={**FILL, "seed": 7, "init_image": b64_png(other),
                                                  "mask": b64_png(MASK)})
    assert not np.array_equal(px(fill_server.wait(r.json()["job_id"]))[inside], ours[inside])


def test_strength_below_one_starts_from_the_noised_init(fill_server):
    body = {**FILL, "seed": 5, "denoising_strength": 0.5, "init_image": b64_png(INIT), "mask": b64_png(MASK)}
    assert step_totals(fill_server, "img2img", body) == {3}  # A1111's count, as on flux1: int(4 * 0.5) + 1
    half, full = px(inpaint(fill_server, seed=5, denoising_strength=0.5)), px(inpaint(fill_server, seed=5))
    assert np.array_equal(half[OUTSIDE], INIT[OUTSIDE].astype(np.int16))
    assert not np.array_equal(half[~OUTSIDE], full[~OUTSIDE])
    # Closer to the init image inside the mask than the full-strength result.
    assert np.abs(half[~OUTSIDE] - INIT[~OUTSIDE]).mean() < np.abs(full[~OUTSIDE] - INIT[~OUTSIDE]).mean()


def test_single_files_equal_the_folder(fill_server):
    folder = px(inpaint(fill_server, seed=9))
    for name in ("fill-transformer", "fill-all-in-one"):
        assert np.abs(px(inpaint(fill_server, seed=9, model=name)) - folder).max() <= 1, name
    # Q8_0 weights: close, not equal; the outside is the init image's all the same.
    q8 = px(inpaint(fill_server, seed=9, model="fill-q8"))
    assert np.abs(q8 - folder).mean() < 8 and np.array_equal(q8[OUTSIDE], INIT[OUTSIDE].astype(np.int16))


def test_sdapi_img2img_with_mask_equals_the_native_job(fill_server):
    native = px(inpaint(fill_server, seed=12, distilled_cfg_scale=25))
    body = {"prompt": "a red cube", "width": SIZE, "height": SIZE, "steps": 4, "seed": 12, "sampler_name": "Euler",
            "scheduler": "Simple", "cfg_scale": 1, "distilled_cfg_scale": 25, "denoising_strength": 1.0,
            "init_images": [b64_png(INIT)], "mask": b64_png(MASK), "mask_blur": 0,
            # The native defaults (A1111's are "fill" and "only masked").
            "inpainting_fill": 1, "inpaint_full_res": False,
            "override_settings": {"sd_model_checkpoint": "tiny-fill"}}
    r = fill_server.client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    assert np.array_equal(img.astype(np.int16), native)
    assert "Distilled CFG Scale: 25" in r.json()["info"]
    # A1111's defaults ("only masked", masked content "fill") run too and keep the outside.
    body.pop("inpainting_fill"), body.pop("inpaint_full_res")
    r = fill_server.client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    assert np.array_equal(img[OUTSIDE].astype(np.int16), INIT[OUTSIDE]) and not np.array_equal(img, native)


def test_jobs_fill_cannot_run_are_422s(fill_server):
    before = queued_count(fill_server)
    r = fill_server.client.post("/txt2img", json={"prompt": "x", "width": SIZE, "height": SIZE, "steps": 2,
                                                  "model": "tiny-fill"})
    assert r.status_code == 422 and "model" in r.text and "mask" in r.json()["error"], r.text
    r = fill_server.client.post("/img2img", json={**FILL, "init_image": b64_png(INIT)})
    assert r.status_code == 422 and "mask" in r.text and "inpainting" in r.json()["error"], r.text
    r = fill_server.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": SIZE, "height": SIZE, "steps": 2,
                                                           "override_settings": {"sd_model_checkpoint": "tiny-fill"}})
    assert r.status_code == 422 and "mask" in r.json()["detail"], r.text
    r = fill_server.client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [b64_png(INIT)], "steps": 2,
                                                           "override_settings": {"sd_model_checkpoint": "tiny-fill"}})
    assert r.status_code == 422 and "mask" in r.json()["detail"], r.text
    assert queued_count(fill_server) == before
