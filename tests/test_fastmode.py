"""Fast mode on CPU with tiny models: fused QKV is exact and switchable, the VAE's fp16 policy
redoes an overflowing decode in a wider type and remembers it, warm-up shapes parse."""
from __future__ import annotations

import pytest
import torch

from diffusionapi.engine import fastmode


def _unet_inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, unet.config.in_channels, 8, 8, generator=g)
    ctx = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([500.0] * batch), ctx


def test_fused_qkv_gives_the_unfused_output_and_switches_back():
    from diffusionapi.demo import tiny_sd15_pipeline

    unet = tiny_sd15_pipeline(0).unet
    x, t, ctx = _unet_inputs(unet)
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=ctx).sample
        assert fastmode.fuse_qkv(unet) and fastmode.is_fused(unet)
        names = {type(p).__name__ for p in unet.attn_processors.values()}
        assert names == {"FusedAttnProcessor2_0"}
        fused = unet(x, t, encoder_hidden_states=ctx).sample
        fastmode.set_fused(unet, False)
        assert not fastmode.is_fused(unet)
        assert "FusedAttnProcessor2_0" not in {type(p).__name__ for p in unet.attn_processors.values()}
        unfused = unet(x, t, encoder_hidden_states=ctx).sample
        fastmode.set_fused(unet, True)
        again = unet(x, t, encoder_hidden_states=ctx).sample
    assert torch.equal(unfused, before)
    # One matmul instead of three: the same sums in another blocking, fp32 rounding apart.
    torch.testing.assert_close(fused, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, fused, rtol=0, atol=0)
    assert fastmode.fuse_qkv(unet)  # idempotent


def test_apply_on_cpu_fuses_only():
    from diffusionapi.demo import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline(0)
    mode = fastmode.FastMode(channels_last=True, fused_qkv=True, compile_unet=True)
    assert fastmode.apply(pipe, torch.device("cpu"), mode) == ["fused_qkv"]
    assert not isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert fastmode.apply(tiny_sd15_pipeline(0), torch.device("cpu"), fastmode.FastMode()) == []


class _Loaded:
    """What vae_run reads and writes on a loaded model: its name and the remembered overflow."""

    class entry:
        name = "tiny"


def _overflowing_vae():
    """A tiny fp16 VAE whose decoder overflows fp16's range (65504) but not fp32's."""
    from diffusionapi.demo import _vae

    vae = _vae(0)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(3e4)  # after the last norm: nothing scales it back
    return vae.to(torch.float16)


def test_vae_fp16_overflow_is_redone_wide_and_remembered():
    vae = _overflowing_vae()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []

    def decode(v):
        calls.append(v.dtype)
        return v.decode(z.to(v.dtype), return_dict=False)[0]

    with torch.no_grad():
        assert not torch.isfinite(decode(vae)).all()  # the premise: fp16 overflows
        calls.clear()
        loaded = _Loaded()
        out = fastmode.vae_run(loaded, vae, decode, fastmode.FastMode())
        assert calls == [torch.float16, torch.float32]
        assert torch.isfinite(out).all() and loaded.vae_upcast
        assert vae.dtype == torch.float16  # back as it was
        calls.clear()
        fastmode.vae_run(loaded, vae, decode, fastmode.FastMode(vae_upcast_dtype="bfloat16"))
        assert calls == [torch.bfloat16]  # straight to the wide type for this model from now on


def test_vae_fp16_first_when_it_stays_finite_and_force_upcast_without_fp16_first():
    from diffusionapi.demo import _vae

    vae = _vae(0).to(torch.float16)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []

    def decode(v):
        calls.append(v.dtype)
        return v.decode(z.to(v.dtype), return_dict=False)[0]

    with torch.no_grad():
        loaded = _Loaded()
        fastmode.vae_run(loaded, vae, decode, fastmode.FastMode())
        assert calls == [torch.float16] and not getattr(loaded, "vae_upcast", False)
        calls.clear()
        assert vae.config.force_upcast  # diffusers' default for AutoencoderKL
        fastmode.vae_run(loaded, vae, decode, fastmode.FastMode(vae_fp16=False))
        assert calls == [torch.float32]
        calls.clear()
        fastmode.vae_run(loaded, vae.to(torch.float32), decode, fastmode.FastMode())
        assert calls == [torch.float32]  # an fp32 VAE (CPU) runs as it is


def test_parse_warmup_shapes():
    S = fastmode.WarmupShape
    assert fastmode.parse_warmup_shapes("") == []
    assert fastmode.parse_warmup_shapes("sd15:512x512, 768x512x4 ,my-xl:1024x1024") == [
        S("sd15", 512, 512, 1), S(None, 768, 512, 4), S("my-xl", 1024, 1024, 1)]
    for bad in ("512", "sd15:512x", "512x512x0", "4x4", "a:b:512x512x"):
        with pytest.raises(ValueError, match="warmup_shapes"):
            fastmode.parse_warmup_shapes(bad)
