"""A1111's prompt language end to end: real server, tiny SD 1.5 and SDXL models, pixels compared."""
from __future__ import annotations

import base64
import hashlib
import io
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionapi.demo import tiny_sd15_pipeline
from diffusionapi.images import read_infotext

from .conftest import LiveServer, make_settings
from .test_embeddings import write_embedding
from .tiny_files import write_tiny_lora

SMALL = dict(width=64, height=64, steps=3, sampler_name="Euler", scheduler_type="default", seed=7, fileType="png")
FAMILIES = ["tiny-sd15", "tiny-sdxl"]


@pytest.fixture(scope="module")
def server(model_store, tmp_path_factory):
    work = tmp_path_factory.mktemp("prompts-work")
    loras, embeddings = work / "loras", work / "embeddings"
    write_tiny_lora(tiny_sd15_pipeline(0), loras / "detail.safetensors", "kohya", seed=1)
    write_tiny_lora(tiny_sd15_pipeline(0), loras / "other.safetensors", "kohya", seed=2)
    write_embedding(embeddings / "sdword.pt", "a1111-pt", vectors=2, width=32, seed=1)
    write_embedding(embeddings / "style" / "xlword.safetensors", "sdxl", vectors=3, width=32, width_g=40, seed=2)
    write_embedding(embeddings / "oneword.bin", "diffusers-bin", width=32, seed=3)
    with LiveServer(make_settings(model_store, work, loras_dir=loras, embeddings_dir=embeddings)) as s:
        yield s


def done(server, **payload) -> dict:
    r = server.run(**{**SMALL, **payload})
    assert r["state"] == "done", r
    return r


def px(resp) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(resp["image"]))))


def gen(server, prompt, model="tiny-sd15", **kw) -> np.ndarray:
    return px(done(server, prompt=prompt, model=model, **kw))


def infotext(resp) -> str:
    return read_infotext(base64.b64decode(resp["image"]))


def pipe_of(server, model):
    """The resident pipeline of ``model`` (the worker is idle between these tests' jobs)."""
    return server.engine.cache.get(server.app.state.registry.resolve_model(model)).pipe


@contextmanager
def unet_inputs(server, model):
    """Every encoder_hidden_states the UNet sees, per model evaluation."""
    seen = []

    def grab(_module, args, kwargs):
        seen.append(kwargs["encoder_hidden_states"].detach().clone())
    handle = pipe_of(server, model).unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize("model", FAMILIES)
def test_attention_weights(server, model):
    cat = gen(server, "a cat", model)
    assert np.array_equal(gen(server, "a (cat:1.0)", model), cat)
    assert np.array_equal(gen(server, "a (cat)", model), gen(server, "a (cat:1.1)", model))
    down = gen(server, "a [cat]", model)
    assert np.array_equal(down, gen(server, "a (cat:0.9090909090909091)", model))  # 1/1.1 exactly
    # 0.90909 is 1/1.1 to 5 places: the weights differ by 1e-5, the pixels at most by rounding.
    assert np.abs(down.astype(int) - gen(server, "a (cat:0.90909)", model).astype(int)).max() <= 1
    assert not np.array_equal(down, cat)
    assert not np.array_equal(gen(server, "a (cat:1.5)", model), cat)
    # A malformed weight is text, as in A1111: the job runs.
    assert not np.array_equal(gen(server, "a (cat:abc)", model), cat)


@pytest.mark.parametrize("model", FAMILIES)
def test_long_prompt_tail_and_break(server, model):
    words = " ".join(f"w{i}" for i in range(70))  # about 200 tokens
    assert not np.array_equal(gen(server, words, model), gen(server, words[:-3] + "end", model))
    with unet_inputs(server, model) as seen:
        gen(server, "a cat a dog", model)
        gen(server, "a cat BREAK a dog", model)
    assert seen[0].shape[1] == 77 and seen[-1].shape[1] == 154


@pytest.mark.parametrize("model", FAMILIES)
def test_prompt_editing_switches_per_step(server, model):
    with unet_inputs(server, model) as seen:
        gen(server, "red", model, steps=6)
        gen(server, "blue", model, steps=6)
        gen(server, "[red:blue:0.5]", model, steps=6)
        gen(server, "[red|blue]", model, steps=4)
    red, blue, edit, alt = seen[0][1], seen[6][1], seen[12:18], seen[18:22]
    # Half of 6 steps is step 3; A1111 counts evaluations from 0 and keeps "from" while the count <= 3.
    assert [torch.equal(e[1], red) for e in edit] == [True] * 4 + [False] * 2
    assert all(torch.equal(e[1], blue) for e in edit[4:])
    assert [torch.equal(e[1], red) for e in alt] == [True, True, False, True]


def test_prompt_editing_in_hires_and_refiner(server):
    hires = {"enabled": True, "steps": 4, "upscaler": "Latent", "denoising_strength": 0.5}
    with unet_inputs(server, "tiny-sd15") as seen:
        gen(server, "red", hires=hires, steps=4)
        gen(server, "blue", hires=hires, steps=4)
        gen(server, "[red:blue:1.5]", hires=hires, steps=4)  # first pass: red; hires: red, then blue
    red1, red2, blue2, run = seen[0][1], seen[4][1], seen[12][1], seen[16:24]
    assert all(torch.equal(e[1], red1) for e in run[:4])
    assert [torch.equal(e[1], red2) for e in run[4:]] == [True, True, True, False]
    assert torch.equal(run[7][1], blue2)
    r = done(server, prompt="[red:blue:0.5]", model="tiny-sdxl", refiner_checkpoint="tiny-sdxl-refiner",
             refiner_switch_at=0.5, steps=4)
    assert r["state"] == "done"


def test_and_combines_parts(server):
    a = gen(server, "a cat AND a dog")
    assert not np.array_equal(a, gen(server, "a cat")) and not np.array_equal(a, gen(server, "a dog"))
    # A part with weight 0 adds nothing: the single prompt's image (the batch is larger: allow rounding).
    zero = gen(server, "a cat AND a dog :0")
    assert np.abs(zero.astype(int) - gen(server, "a cat").astype(int)).max() <= 1
    with unet_inputs(server, "tiny-sd15") as seen:
        gen(server, "a cat :0.5 AND a dog")
    assert seen[0].shape[0] == 3  # negative + two parts in one batch
    assert not np.array_equal(gen(server, "x AND y", "tiny-sdxl"), gen(server, "x", "tiny-sdxl"))


def test_lora_tag_is_the_loras_field(server):
    tagged = done(server, prompt="portrait <lora:detail:0.7>", model="tiny-sd15")
    field = done(server, prompt="portrait ", model="tiny-sd15", loras=[{"name": "detail", "scale": 0.7}])
    assert np.array_equal(px(tagged), px(field))
    assert not np.array_equal(px(tagged), gen(server, "portrait "))
    # The tag stays in the stored prompt and the infotext; the LoRA is hashed as usual.
    assert tagged["payload"]["prompt"] == "portrait <lora:detail:0.7>"
    info = infotext(tagged)
    h = hashlib.sha256((server.settings.loras_dir / "detail.safetensors").read_bytes()).hexdigest()[:12]
    assert info.startswith("portrait <lora:detail:0.7>\n") and f"detail: {h}" in info
    both = gen(server, "portrait <lora:detail:0.7>", loras=[{"name": "other", "scale": 0.5}])
    assert not np.array_equal(both, px(tagged))


@pytest.mark.parametrize("payload, needle", [
    (dict(prompt="a <lora:nosuch:1>"), "nosuch"),
    (dict(prompt="a <lora:detail:1>", loras=["detail"]), "detail"),
    (dict(prompt="a <lora:detail:1> <lora:detail:0.5>"), "detail"),
    (dict(prompt="a <lora:detail:x>"), "not a number"),
])
def test_bad_lora_tags_are_422(server, payload, needle):
    r = server.client.post("/txt2img", json={**SMALL, **payload})
    assert r.status_code == 422, r.text
    assert "prompt" in r.json()["error"] and needle in r.json()["error"]


def test_prompt_over_the_limit_is_422(server):
    r = server.client.post("/txt2img", json={**SMALL, "prompt": "x" * (server.settings.max_prompt_chars + 1)})
    assert r.status_code == 422 and "prompt" in r.json()["error"]


@pytest.mark.parametrize("model", FAMILIES)
def test_clip_skip_uses_the_chosen_layer(server, model):
    one = done(server, prompt="a cat", model=model)
    two = done(server, prompt="a cat", model=model, clip_skip=2)
    assert "Clip skip" not in infotext(one) and "Clip skip: 2" in infotext(two)
    assert two["payload"]["clip_skip"] == 2
    pipe = pipe_of(server, model)
    with unet_inputs(server, model) as seen:
        gen(server, "a cat", model, clip_skip=2)
    tok = pipe.tokenizer
    ids = tok("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.inference_mode():
        te = pipe.text_encoder
        hs = te(ids, output_hidden_states=True).hidden_states
        if model == "tiny-sd15":
            norm = te.final_layer_norm if hasattr(te, "final_layer_norm") else te.text_model.final_layer_norm
            expected = norm(hs[-2])
            assert not np.array_equal(px(one), px(two))
        else:  # SDXL is conditioned on the penultimate layer: clip skip 2 is its normal output
            expected = hs[-2]
            assert np.array_equal(px(one), px(two))
    assert torch.equal(seen[0][1:2, :, :expected.shape[-1]], expected)
    r = server.client.post("/txt2img", json={**SMALL, "prompt": "a", "clip_skip": 13})
    assert r.status_code == 422 and "clip_skip" in r.json()["error"]


def test_embeddings_listing(server):
    r = server.client.get("/embeddings")
    assert r.status_code == 200
    items = {e["name"]: e for e in r.json()["embeddings"]}
    assert items["sdword"] == {"name": "sdword", "family": "sd15", "vectors": 2}
    assert items["xlword"] == {"name": "xlword", "family": "sdxl", "vectors": 3}
    assert items["oneword"]["vectors"] == 1


@pytest.mark.parametrize("model, word", [("tiny-sd15", "sdword"), ("tiny-sd15", "oneword"), ("tiny-sdxl", "xlword")])
def test_embedding_word_changes_the_image(server, model, word):
    r = done(server, prompt=f"a photo of a {word}", model=model)
    # The word without its embedding (a longer word tokenizes differently) gives another image.
    assert not np.array_equal(px(r), gen(server, f"a photo of a {word}x", model))
    path = next(server.settings.embeddings_dir.rglob(f"{word}.*"))
    h = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert f"TI hashes: \"{word}: {h}\"" in infotext(r)


def test_embedding_in_the_negative_prompt(server):
    r = done(server, prompt="a photo", negative_prompt="sdword", model="tiny-sd15")
    assert not np.array_equal(px(r), gen(server, "a photo", negative_prompt="sdwordx"))
    assert "TI hashes" in infotext(r)


def test_embedding_vectors_reach_the_text_encoder(server):
    vec = torch.load(str(server.settings.embeddings_dir / "sdword.pt"))["string_to_param"]["*"]
    pipe = pipe_of(server, "tiny-sd15")
    seen = []
    te = pipe.text_encoder
    inner = te.encoder if hasattr(te, "encoder") else te.text_model.encoder
    pos = (te.embeddings if hasattr(te, "embeddings") else te.text_model.embeddings).position_embedding.weight

    def grab(_module, args, kwargs):
        seen.append((kwargs.get("inputs_embeds", args[0] if args else None)).detach().clone())
    h = inner.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        gen(server, "a sdword b, seen once")  # a new text: not served from the cache
    finally:
        h.remove()
    x = [s for s in seen if s.shape[1] == 77][0][0] - pos[:77]
    # [start, "a", <2 vectors>, "b", end...]
    assert torch.allclose(x[2:4], vec, atol=1e-5)


def test_wrong_family_embedding_is_skipped_with_a_warning(server):
    r = done(server, prompt="a xlword", model="tiny-sd15")
    assert "TI hashes" not in infotext(r)
    assert any("xlword" in w and "SDXL" in w for w in r.get("warnings", [])), r.get("warnings")
    assert np.array_equal(px(r), gen(server, "a xlword", "tiny-sd15"))


def test_conditioning_cache_serves_same_prompt_jobs(server):
    cache = server.engine.prompt_encoder.cache
    gen(server, "a lighthouse, (dusk:1.2)", seed=1)
    misses = cache.misses
    a = gen(server, "a lighthouse, (dusk:1.2)", seed=2)
    gen(server, "a lighthouse, (dusk:1.2)", seed=3)
    assert cache.misses == misses and cache.hits > 0
    assert not np.array_equal(a, gen(server, "a lighthouse, (dusk:1.2)", seed=3))
