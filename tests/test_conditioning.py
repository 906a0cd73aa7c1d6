"""Conditioning from prompts on the tiny SD 1.5 and SDXL text encoders (their own outputs are the reference)."""
from __future__ import annotations

import pytest
import torch

from diffusionapi.demo import tiny_sd15_pipeline, tiny_sdxl_pipeline
from diffusionapi.engine.conditioning import (CHUNK, ConditioningCache, Embedding, PromptEncoder, apply_emphasis,
                                              encode_text, encoder_slots, evaluations_per_step, tokenize_text,
                                              usable_embeddings)


@pytest.fixture(scope="module")
def pipes():
    return {"sd15": tiny_sd15_pipeline(0), "sdxl": tiny_sdxl_pipeline(0)}


def slots_of(pipes, family):
    return encoder_slots(pipes[family], family == "sdxl")


def enc(pipes, family, text, clip_skip=1, embeddings=()):
    with torch.inference_mode():
        return encode_text(slots_of(pipes, family), text, clip_skip, list(embeddings))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_plain_prompt_is_the_pipelines_own_encoding(pipes, family):
    pipe = pipes[family]
    with torch.inference_mode():
        if family == "sd15":
            cond, _ = pipe.encode_prompt("a photo of a cat", "cpu", 1, True, negative_prompt="x")
            pooled = None
        else:
            cond, _, pooled, _ = pipe.encode_prompt("a photo of a cat", device="cpu",
                                                    do_classifier_free_guidance=True, negative_prompt="x")
    e = enc(pipes, family, "a photo of a cat")
    assert torch.equal(e.hidden, cond)
    if pooled is not None:
        assert torch.equal(e.pooled, pooled)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_weights(pipes, family):
    plain = enc(pipes, family, "a cat").hidden
    assert torch.equal(enc(pipes, family, "a (cat:1.0)").hidden, plain)
    assert torch.equal(enc(pipes, family, "a (cat)").hidden, enc(pipes, family, "a (cat:1.1)").hidden)
    strong = enc(pipes, family, "a (cat:1.5)").hidden
    assert not torch.equal(strong, plain)
    # The weighted token is scaled by 1.5 and the chunk restored to its old mean (per encoder).
    width_l = slots_of(pipes, family)[0].width
    z = plain[0, :, :width_l]
    expected = z.clone()
    expected[2] *= 1.5  # [start, "a", "c", "a", "t", ...]: the tiny tokenizer is byte level
    expected[3] *= 1.5
    expected[4] *= 1.5
    expected *= z.mean() / expected.mean()
    assert torch.allclose(strong[0, :, :width_l], expected, atol=1e-6)


def test_emphasis_guard_on_zero_mean():
    z = torch.tensor([[1.0, -1.0], [2.0, -2.0]])  # mean exactly 0: the ratio would be 0/0
    out = apply_emphasis(z, torch.tensor([1.0, 2.0]))
    assert torch.equal(out, torch.tensor([[1.0, -1.0], [4.0, -4.0]]))
    assert torch.isfinite(out).all()


def test_chunks_break_and_comma_backoff(pipes):
    slot = slots_of(pipes, "sd15")[0]
    tok = slot.tokenizer
    assert len(tokenize_text("a" * 75, slot, [])) == 1
    chunks = tokenize_text("a" * 76, slot, [])
    assert len(chunks) == 2 and all(len(c.tokens) == CHUNK + 2 for c in chunks)
    assert chunks[0].tokens[0] == tok.bos_token_id and chunks[0].tokens[-1] == tok.eos_token_id
    # BREAK closes the chunk: "b" starts the second one.
    a, b = tokenize_text("a BREAK b", slot, [])
    assert a.tokens[1] == tok.convert_tokens_to_ids("a</w>") and a.tokens[2] == tok.eos_token_id
    assert b.tokens[1] == tok.convert_tokens_to_ids("b</w>")
    # 70 tokens, a comma, then 10 more: the chunk boundary moves to after the comma.
    text = "x" * 69 + "y, " + "z" * 10
    first, second = tokenize_text(text, slot, [])
    comma = tok.convert_tokens_to_ids(",</w>")
    assert first.tokens[71] == comma and set(first.tokens[72:]) == {tok.eos_token_id}
    assert second.tokens[1:11] == [tok.convert_tokens_to_ids("z")] * 9 + [tok.convert_tokens_to_ids("z</w>")]
    # A comma further back than 20 tokens does not move anything.
    far = tokenize_text("x, " + "y" * 80, slot, [])
    assert far[0].tokens[3:76] == [tok.convert_tokens_to_ids("y")] * 73


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_long_prompt_tail_counts(pipes, family):
    words = " ".join(f"w{i}" for i in range(70))  # ~200 byte tokens: three chunks
    long = enc(pipes, family, words).hidden
    other = enc(pipes, family, words[:-3] + "end").hidden
    assert long.shape[1] == 3 * 77
    assert torch.equal(long[:, :154], other[:, :154]) and not torch.equal(long[:, 154:], other[:, 154:])


def test_clip_skip_sd15_is_the_penultimate_layer_normed(pipes):
    slot = slots_of(pipes, "sd15")[0]
    ids = torch.tensor([tokenize_text("a cat", slot, [])[0].tokens])
    with torch.inference_mode():
        hs = slot.encoder(ids, output_hidden_states=True).hidden_states
        norm = slot.encoder.final_layer_norm if hasattr(slot.encoder, "final_layer_norm") \
            else slot.encoder.text_model.final_layer_norm
        assert torch.equal(enc(pipes, "sd15", "a cat", clip_skip=2).hidden, norm(hs[-2]))
        assert torch.equal(enc(pipes, "sd15", "a cat", clip_skip=12).hidden, norm(hs[1]))  # clamped


def test_clip_skip_sdxl(pipes):
    one, two, three = (enc(pipes, "sdxl", "a cat", clip_skip=k).hidden for k in (1, 2, 3))
    assert torch.equal(one, two)  # SDXL is conditioned on the penultimate layer already
    slots = slots_of(pipes, "sdxl")
    with torch.inference_mode():
        parts = []
        for s in slots:
            ids = torch.tensor([tokenize_text("a cat", s, [])[0].tokens])
            depth = s.encoder.config.num_hidden_layers  # tiny CLIP-L has 2 layers: 3 is clamped to 2
            parts.append(s.encoder(ids, output_hidden_states=True).hidden_states[-min(3, depth)])
    assert torch.equal(three, torch.cat(parts, dim=-1))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_embedding_vectors_replace_the_word(pipes, family):
    slots = slots_of(pipes, family)
    g = torch.Generator().manual_seed(3)
    vectors = {s.key: torch.randn(3, s.width, generator=g) for s in slots}
    emb = Embedding("mytoken", vectors, "0123456789ab")
    got = enc(pipes, family, "a mytoken b", embeddings=[emb])
    assert got.used_embeddings == {"mytoken": "0123456789ab"}
    assert not torch.equal(got.hidden, enc(pipes, family, "a mytoken b").hidden)
    # Reference: the encoder run on input embeddings with the vectors placed after "a".
    parts = []
    with torch.inference_mode():
        for s in slots:
            chunk = tokenize_text("a mytoken b", s, [emb])[0]
            assert chunk.fixes[0][0] == 2 and torch.equal(chunk.fixes[0][1], vectors[s.key])
            ids = torch.tensor([chunk.tokens])
            seen = {}

            def grab(_m, _i, out, seen=seen):
                seen["x"] = out.clone()
            h = s.encoder.get_input_embeddings().register_forward_hook(grab)
            s.encoder(ids)
            h.remove()
            assert not torch.equal(seen["x"][0, 2:5], vectors[s.key])  # placeholders before injection
            x = seen["x"].clone()
            x[0, 2:5] = vectors[s.key]

            def swap(_m, _i, _out, x=x):
                return x
            h = s.encoder.get_input_embeddings().register_forward_hook(swap)
            out = s.encoder(ids, output_hidden_states=True)
            h.remove()
            parts.append(out.last_hidden_state if family == "sd15" else out.hidden_states[-2])
    assert torch.equal(got.hidden, torch.cat(parts, dim=-1))


def test_usable_embeddings_skip_wrong_family(pipes, tmp_path):
    from diffusionapi.engine.embeddings import EmbeddingTensors

    from .test_embeddings import listing, write_embedding

    write_embedding(tmp_path / "sdword.pt", "a1111-pt", width=32)
    write_embedding(tmp_path / "xlword.safetensors", "sdxl", width=32, width_g=40)
    write_embedding(tmp_path / "wideword.pt", "a1111-pt", width=768)
    entries, tensors = listing(tmp_path), EmbeddingTensors()
    slots = slots_of(pipes, "sd15")
    found, warnings = usable_embeddings(entries, tensors.load, slots, "sd15",
                                        ["sdword xlword wideword", ""], lambda p: "f" * 64)
    assert [e.name for e in found] == ["sdword"] and found[0].shorthash == "f" * 12
    assert any("'xlword' is for SDXL" in w for w in warnings)
    assert any("'wideword' does not fit" in w for w in warnings)
    found, warnings = usable_embeddings(entries, tensors.load, slots_of(pipes, "sdxl"), "sdxl",
                                        ["xlword", "unrelated"], lambda p: "0" * 64)
    assert [e.name for e in found] == ["xlword"] and warnings == []


def test_schedules_and_parts(pipes):
    pe = PromptEncoder(16)
    with torch.inference_mode():
        sc = pe.build(pipes["sdxl"], xl=True, prompt="[red:blue:0.5] ball AND sky :0.4", negative="",
                      clip_skip=1, total_steps=10, zero_empty_negative=True)
        sc.time_ids = torch.ones(1, 6)
        sc.neg_time_ids = torch.zeros(1, 6)
        red, blue, sky = (enc(pipes, "sdxl", t) for t in ("red ball", "blue ball", "sky"))
        embeds, added = sc.batch(0)
        assert sc.weights == [1.0, 0.4]
        assert torch.equal(embeds[0], torch.zeros_like(embeds[0]))  # SDXL's empty negative
        assert torch.equal(embeds[1:2], red.hidden) and torch.equal(embeds[2:3], sky.hidden)
        assert torch.equal(sc.batch(5)[0][1:2], red.hidden)   # A1111: step <= 5 keeps the first
        assert torch.equal(sc.batch(6)[0][1:2], blue.hidden)
        assert torch.equal(added["text_embeds"][1:2], red.pooled)
        assert torch.equal(added["time_ids"], torch.tensor([[0.0] * 6, [1.0] * 6, [1.0] * 6]))
        # Parts of different lengths are padded with empty chunks.
        sc2 = pe.build(pipes["sd15"], xl=False, prompt="a BREAK b", negative="n", clip_skip=1, total_steps=4)
        e2, _ = sc2.batch(0)
        assert e2.shape[1] == 154 and torch.equal(e2[0:1, 77:], sc2.empty)


def test_cache_reuses_encodings_and_respects_capacity(pipes):
    pe = PromptEncoder(2)
    with torch.inference_mode():
        for _ in range(3):
            pe.build(pipes["sd15"], xl=False, prompt="cat", negative="", clip_skip=1, total_steps=4)
    assert pe.cache.misses == 2 and pe.cache.hits == 7  # "cat" and "" (negative, padding) encoded once
    pe.build(pipes["sd15"], xl=False, prompt="cat", negative="", clip_skip=2, total_steps=4)
    assert pe.cache.misses == 4
    off = PromptEncoder(0)
    off.build(pipes["sd15"], xl=False, prompt="cat", negative="", clip_skip=1, total_steps=4)
    assert off.cache.hits == 0 and isinstance(off.cache, ConditioningCache)


def test_second_order_samplers_count_two_evaluations():
    assert evaluations_per_step("heun") == 2 and evaluations_per_step("euler") == 1
