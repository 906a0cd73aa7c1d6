"""A1111's prompt weights on T5 (engine/flow.encode_t5_weighted), as Forge's T5 engine applies
them: each bracketed run tokenized on its own, its hidden states multiplied by its weight, the
sequence rescaled to its unweighted mean; a prompt with no weight other than 1 is left to the
pipeline's own encoding (exactly diffusers'). Tiny random T5 and tokenizer, built in code."""
from __future__ import annotations

import torch

from diffusionapi.demo import tiny_chroma_pipeline, tiny_flux_pipeline
from diffusionapi.engine.flow import encode_t5_weighted

LENGTH = 32


def test_plain_text_and_weight_1_are_left_to_the_pipeline():
    pipe = tiny_flux_pipeline(0)
    for text in ("a red cube", "a red (cube:1.0)", "a red BREAK cube", ""):
        assert encode_t5_weighted(pipe.tokenizer_2, pipe.text_encoder_2, text, LENGTH, "cpu") is None


def test_a_weight_scales_its_tokens_and_the_mean_is_kept():
    pipe = tiny_flux_pipeline(0)
    tok, enc = pipe.tokenizer_2, pipe.text_encoder_2
    z, mask = encode_t5_weighted(tok, enc, "a red (cube:1.5)", LENGTH, "cpu")
    head = tok("a red", add_special_tokens=False).input_ids
    cube = tok("cube", add_special_tokens=False).input_ids
    n = len(head) + len(cube) + 1  # and EOS
    assert z.shape[:2] == (1, LENGTH) and mask[0].tolist() == [1] * n + [0] * (LENGTH - n)
    # The same tokens unweighted, through the encoder as the pipeline runs it (no attention mask).
    ids = head + cube + [tok.eos_token_id] + [tok.pad_token_id] * (LENGTH - n)
    with torch.no_grad():
        raw = enc(torch.tensor([ids]))[0]
    w = torch.ones(LENGTH)
    w[len(head):len(head) + len(cube)] = 1.5
    expected = raw * w[None, :, None]
    expected = expected * (raw.mean() / expected.mean())
    assert torch.allclose(z, expected, atol=1e-6)
    ratio = (z / raw)[0, :, 0]  # per token: the weight times one common mean correction
    assert torch.allclose(ratio[len(head)] / ratio[0], torch.tensor(1.5), atol=1e-4)


def test_a_long_prompt_is_cut_before_its_eos_as_the_pipelines_cut_it():
    pipe = tiny_flux_pipeline(0)
    z, mask = encode_t5_weighted(pipe.tokenizer_2, pipe.text_encoder_2, "(red:1.2) " + "cube " * 60, LENGTH, "cpu")
    assert z.shape[1] == LENGTH and int(mask.sum()) == LENGTH


def test_chroma_reads_the_weights_with_its_masked_encoder():
    from types import SimpleNamespace

    from diffusionapi.engine.flow_families import encode_sequence

    pipe = tiny_chroma_pipeline(0)
    loaded = SimpleNamespace(pipe=pipe, spec=SimpleNamespace(conditioning="chroma"))
    plain = encode_sequence(loaded, "a red cube", "blurry")
    same = encode_sequence(loaded, "a red (cube:1.0)", "blurry")
    weighted = encode_sequence(loaded, "a red (cube:1.5)", "(blurry:1.3)")
    assert torch.equal(plain.embeds, same.embeds) and torch.equal(plain.mask, same.mask)
    assert weighted.embeds.shape == plain.embeds.shape and not torch.equal(weighted.embeds, plain.embeds)
    assert torch.equal(weighted.mask, plain.mask)  # the text, EOS and one pad are seen, as the pipeline has it
    assert not torch.equal(weighted.neg_embeds, plain.neg_embeds) and torch.equal(weighted.neg_mask, plain.neg_mask)
