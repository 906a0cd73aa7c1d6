"""Tiny random-weight pipelines, built offline in code, for tests and for trying the API.

They make noise images: they exist so the whole service can run with no downloaded
weights. Real checkpoints go in the models directory (see README).

    python -m diffusionapi.demo [--models-dir DIR]   # installs the demo model
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .vocabulary import DEMO_MODEL_LABEL, DEMO_MODEL_NAME  # noqa: F401 - the demo's name lives with the labels

# SD 1.5's shipped scheduler config: the "pndm" schedule and the model's sigmas come from it.
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
                      num_train_timesteps=1000)
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, timestep_spacing="leading", num_train_timesteps=1000,
                      interpolation_type="linear", prediction_type="epsilon")


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's reversible byte -> printable-unicode table (GPT-2 style).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_tokenizer():
    """A byte-level CLIP tokenizer with no merges: 514 tokens, no files needed."""
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77,
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>", unk_token="<|endoftext|>")


VOCAB = 514


def _text_encoder(hidden: int, layers: int, *, projection: int | None = None, seed: int = 0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1,
                         hidden_size=hidden, intermediate_size=hidden * 2, num_attention_heads=4,
                         num_hidden_layers=layers, vocab_size=VOCAB, max_position_embeddings=77,
                         layer_norm_eps=1e-5, hidden_act="quick_gelu", projection_dim=projection or hidden)
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)).eval()
    # A fresh final LayerNorm (weight 1, bias 0) makes every token's hidden state average to
    # exactly zero, which no trained CLIP does (A1111's emphasis divides by that mean): give it
    # seeded, trained-looking parameters.
    norm = model.final_layer_norm if hasattr(model, "final_layer_norm") else model.text_model.final_layer_norm
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(hidden, generator=g))
        norm.bias.copy_(0.25 + 0.5 * torch.randn(hidden, generator=g))
    return model


def _vae(seed: int = 0, width: int = 8):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # Four down blocks, so latents are 1/8 of the image as in real models.
    return AutoencoderKL(block_out_channels=(width,) * 4, in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         latent_channels=4, norm_num_groups=min(width, 8), layers_per_block=1,
                         sample_size=64).eval()


def _unet(seed: int = 0, *, cross: int = 32, channels=(16, 32), layers: int = 1, groups: int = 8, **extra):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1)
    up = ("CrossAttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(block_out_channels=channels, layers_per_block=layers, sample_size=32,
                                in_channels=4, out_channels=4, down_block_types=down, up_block_types=up,
                                cross_attention_dim=cross, norm_num_groups=groups, attention_head_dim=4,
                                **extra).eval()


def tiny_sd15_pipeline(seed: int = 0):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    _quiet()
    return StableDiffusionPipeline(
        vae=_vae(seed), text_encoder=_text_encoder(32, 2, seed=seed), tokenizer=tiny_tokenizer(),
        unet=_unet(seed, cross=32), scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def tiny_sd2_pipeline(seed: int = 0, prediction: str = "epsilon"):
    """SD 2.x's form: linear attention projections in the UNet (what tells it from SD 1.x),
    epsilon (2.x-base) or v-prediction (768-v) by the scheduler config."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    _quiet()
    return StableDiffusionPipeline(
        vae=_vae(seed), text_encoder=_text_encoder(32, 2, seed=seed), tokenizer=tiny_tokenizer(),
        unet=_unet(seed, cross=32, use_linear_projection=True),
        scheduler=DDIMScheduler(**SD2_SCHEDULER, prediction_type=prediction),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# SD 2.x's shipped scheduler config (stabilityai/stable-diffusion-2-1), less its prediction_type.
SD2_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                     set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)


# SDXL: distinct hidden sizes for the two text encoders, and 10 layers in the second one,
# so that single-file key inspection tells CLIP-L and CLIP-G (and base vs refiner) apart.
SDXL_TE1, SDXL_TE2, SDXL_TIME_DIM = 32, 40, 8


def tiny_sdxl_pipeline(seed: int = 0):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    _quiet()
    unet = _unet(seed, cross=SDXL_TE1 + SDXL_TE2, addition_embed_type="text_time",
                 addition_time_embed_dim=SDXL_TIME_DIM,
                 projection_class_embeddings_input_dim=6 * SDXL_TIME_DIM + SDXL_TE2,
                 transformer_layers_per_block=(1, 2))
    return StableDiffusionXLPipeline(
        vae=_vae(seed), text_encoder=_text_encoder(SDXL_TE1, 2, seed=seed),
        text_encoder_2=_text_encoder(SDXL_TE2, 10, projection=SDXL_TE2, seed=seed + 1),
        tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(), unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER))


def tiny_sdxl_refiner_pipeline(seed: int = 0, base=None):
    """A refiner sharing the base's VAE and text_encoder_2 when given, as real refiners do."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    _quiet()
    unet = _unet(seed + 7, cross=SDXL_TE2, addition_embed_type="text_time",
                 addition_time_embed_dim=SDXL_TIME_DIM,
                 projection_class_embeddings_input_dim=5 * SDXL_TIME_DIM + SDXL_TE2)
    return StableDiffusionXLImg2ImgPipeline(
        vae=base.vae if base else _vae(seed),
        text_encoder=None,
        text_encoder_2=base.text_encoder_2 if base else _text_encoder(SDXL_TE2, 10, projection=SDXL_TE2, seed=seed + 1),
        tokenizer=None, tokenizer_2=tiny_tokenizer(), unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)


def tiny_t5_tokenizer(max_length: int = 512):
    """A T5-style SentencePiece (Unigram) tokenizer built in memory: <pad>=0, </s>=1, <unk>=2,
    then one piece per printable ASCII character, with and without the word-start mark."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + c, -1.0) for c in chars] + [(c, -1.5) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, additional_special_tokens=[], model_max_length=max_length)


T5_VOCAB = 4 + 2 * 94


def _t5(d_model: int = 32, layers: int = 2, seed: int = 0):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=T5_VOCAB, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=layers, num_heads=4,
                   relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                   is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
                   decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def _flow_vae(seed: int = 0, width: int = 8, latent_channels: int = 16, shift_factor: float | None = 0.1159,
              scaling_factor: float = 0.3611):
    """A VAE shaped like Flux's / SD3's: 16 latent channels, 8x compression, no quant convs."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(width,) * 4, in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         latent_channels=latent_channels, norm_num_groups=min(width, 8), layers_per_block=1,
                         sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=shift_factor, scaling_factor=scaling_factor).eval()


# Flux.1-dev's scheduler config: dynamic (resolution-dependent) shift.
FLUX_DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                          max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
FLUX_SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
FLUX_TE, FLUX_T5 = 32, 32


def tiny_flux_pipeline(seed: int = 0, guidance: bool = True):
    """Flux.1 in miniature: dev (guidance-distilled, ``guidance=True``) or schnell. 16 latent
    channels packed 2x2 into 64 transformer channels, CLIP-L pooled + T5 sequence, as the real one."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    _quiet()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=FLUX_T5,
                                         pooled_projection_dim=FLUX_TE, axes_dims_rope=(4, 4, 8),
                                         guidance_embeds=guidance).eval()
    sched = FLUX_DEV_SCHEDULER if guidance else FLUX_SCHNELL_SCHEDULER
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**sched), vae=_flow_vae(seed),
                        text_encoder=_text_encoder(FLUX_TE, 2, seed=seed), tokenizer=tiny_tokenizer(),
                        text_encoder_2=_t5(FLUX_T5, seed=seed + 1), tokenizer_2=tiny_t5_tokenizer(),
                        transformer=transformer)


def tiny_flux_kontext_pipeline(seed: int = 0):
    """Flux.1 Kontext dev in miniature: tiny Flux.1 dev's parts (the same transformer class,
    guidance-distilled) in a FluxKontextPipeline."""
    from diffusers import FluxKontextPipeline

    flux = tiny_flux_pipeline(seed, guidance=True)
    return FluxKontextPipeline(**{k: getattr(flux, k) for k in ("scheduler", "vae", "text_encoder", "tokenizer",
                                                                  "text_encoder_2", "tokenizer_2", "transformer")})


def tiny_flux_fill_pipeline(seed: int = 0):
    """Flux.1 Fill dev in miniature: tiny Flux.1 dev's parts with a transformer taking 384 input
    channels (64 noisy latent + 64 masked-image latent + 256 mask channels) and giving the 64
    latent channels, in a FluxFillPipeline."""
    import torch
    from diffusers import FluxFillPipeline, FluxTransformer2DModel

    flux = tiny_flux_pipeline(seed, guidance=True)
    torch.manual_seed(seed + 7)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=384, out_channels=64, num_layers=1,
                                         num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=FLUX_T5, pooled_projection_dim=FLUX_TE,
                                         axes_dims_rope=(4, 4, 8), guidance_embeds=True).eval()
    return FluxFillPipeline(transformer=transformer, **{k: getattr(flux, k) for k in (
        "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")})


def tiny_qwen_vl_processor(tokenizer=None, max_pixels: int = 56 * 56):
    """Qwen2VLProcessor for the tiny encoder: Qwen2-VL's image processor (14-pixel patches merged
    2x2; ``max_pixels`` keeps a reference image to a few vision tokens) and the tiny tokenizer."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = tokenizer or tiny_qwen_tokenizer()
    images = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=max_pixels)
    return Qwen2VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor())


def tiny_qwen_vl_encoder(seed: int = 0, tokenizer=None, hidden: int = 16):
    """Qwen2.5-VL in miniature (language model + vision tower) with the tiny tokenizer's ids for
    its special tokens: the text encoder of Qwen-Image and Qwen-Image-Edit."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tokenizer or tiny_qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": hidden, "intermediate_size": hidden, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0},
        vision_config={"depth": 2, "hidden_size": hidden, "intermediate_size": hidden, "num_heads": 2,
                       "out_hidden_size": hidden},
        hidden_size=hidden, vocab_size=len(tokenizer), image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"])
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_image_vae(seed: int = 0, z_dim: int = 16):
    """Qwen-Image's causal 3D VAE in miniature: 8x spatial compression, ``z_dim`` latent channels."""
    import torch
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                  temperal_downsample=[False, True, True], latents_mean=[0.0] * z_dim,
                                  latents_std=[1.0] * z_dim).eval()


def tiny_qwen_image_edit_pipeline(seed: int = 0, plus: bool = False):
    """Qwen-Image-Edit (``plus``: Edit Plus, several reference images) in miniature: the tiny
    Qwen2.5-VL encoder reads the prompt and the reference images, the MMDiT transformer sees the
    references' latents as extra tokens."""
    import torch
    from diffusers import (FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline,
                           QwenImageTransformer2DModel)

    _quiet()
    tokenizer = tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()
    # The pipeline encodes a reference at about 1024x1024: ~4k nearly alike tokens. At random
    # init (RMS-normed q/k) attention is near uniform over them and the output small, so neither
    # prompt nor reference would show in 8-bit pixels; sharper q/k norms and a larger output
    # projection make them show (still random weights).
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
                p.mul_(8.0)
            elif name.startswith("proj_out."):
                p.mul_(4.0)
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    return cls(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER), vae=tiny_qwen_image_vae(seed),
               text_encoder=tiny_qwen_vl_encoder(seed, tokenizer), tokenizer=tokenizer,
               processor=tiny_qwen_vl_processor(tokenizer), transformer=transformer)


SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)


def tiny_sd3_pipeline(seed: int = 0):
    """SD 3.x in miniature: MMDiT transformer (patch 2) on 16-channel latents, CLIP-L and CLIP-G
    (penultimate hidden states + pooled) and T5, static shift 3."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    _quiet()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64,
                                        pos_embed_max_size=32).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=_flow_vae(seed, shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=_text_encoder(32, 2, projection=32, seed=seed), tokenizer=tiny_tokenizer(),
        text_encoder_2=_text_encoder(32, 3, projection=32, seed=seed + 1), tokenizer_2=tiny_tokenizer(),
        text_encoder_3=_t5(64, seed=seed + 2), tokenizer_3=tiny_t5_tokenizer())


# Qwen's special tokens (Qwen2 / Qwen2.5-VL / Qwen3 chat format), after the 256 byte symbols.
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>")
QWEN_VOCAB = 256 + len(QWEN_SPECIALS)
# Qwen3's chat template reduced to what the pipelines render: user turns and the assistant prompt.
QWEN_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_qwen_tokenizer(max_length: int = 1024):
    """A Qwen-style byte-level BPE tokenizer built in memory: the 256 byte symbols (GPT-2's
    byte -> unicode table, as Qwen's), no merges, then Qwen's special tokens; Qwen3's chat
    format for ``apply_chat_template``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    fast = Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token=None, bos_token=None, model_max_length=max_length)
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast


def qwen_token_id(name: str) -> int:
    return 256 + QWEN_SPECIALS.index(name)


def tiny_qwen25vl_text_encoder(hidden: int = 32, layers: int = 2, seed: int = 0):
    """Qwen2.5-VL (Qwen-Image's text encoder) in miniature, on ``tiny_qwen_tokenizer``'s vocabulary."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    heads = 2
    cfg = Qwen2_5_VLConfig(
        text_config={"hidden_size": hidden, "intermediate_size": hidden * 2, "num_hidden_layers": layers,
                     "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": QWEN_VOCAB,
                     "rope_scaling": {"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0, "max_position_embeddings": 2048},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": hidden},
        hidden_size=hidden, vocab_size=QWEN_VOCAB, image_token_id=qwen_token_id("<|image_pad|>"),
        video_token_id=qwen_token_id("<|video_pad|>"), vision_start_token_id=qwen_token_id("<|vision_start|>"),
        vision_end_token_id=qwen_token_id("<|vision_end|>"))
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def tiny_qwen3_text_encoder(hidden: int = 32, layers: int = 2, seed: int = 0, causal_lm: bool = False):
    """Qwen3 in miniature: the bare model (Z-Image's text encoder) or, ``causal_lm``, with its LM
    head (Flux.2 klein's, saved as Qwen3ForCausalLM)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    torch.manual_seed(seed)
    cfg = Qwen3Config(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=hidden // 2, vocab_size=QWEN_VOCAB,
                      max_position_embeddings=2048, pad_token_id=qwen_token_id("<|endoftext|>"))
    return (Qwen3ForCausalLM(cfg) if causal_lm else Qwen3Model(cfg)).eval()


def _qwen_image_vae(seed: int = 0, z_dim: int = 16):
    """Qwen-Image's causal video VAE in miniature: 8x spatial compression, 16 channels,
    per-channel latents_mean / latents_std normalisation (seeded, not 0/1, so that it matters)."""
    import torch
    from diffusers import AutoencoderKLQwenImage

    g = torch.Generator().manual_seed(seed + 77)
    mean = (0.5 * torch.randn(z_dim, generator=g)).tolist()
    std = (1.0 + 0.5 * torch.rand(z_dim, generator=g)).tolist()
    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=16, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                  temperal_downsample=[False, True, True], latents_mean=mean,
                                  latents_std=std).eval()


# Qwen-Image's published scheduler config (Qwen/Qwen-Image): dynamic shift with exponential
# time shifting, mu from the image's token count.
QWEN_IMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                            max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
                            time_shift_type="exponential", invert_sigmas=False, shift_terminal=0.02,
                            stochastic_sampling=False, use_beta_sigmas=False, use_exponential_sigmas=False,
                            use_karras_sigmas=False)
QWEN_IMAGE_TE = 32


def tiny_qwen_image_pipeline(seed: int = 0):
    """Qwen-Image in miniature: MMDiT on 16-channel latents packed 2x2, Qwen2.5-VL last hidden
    states (the chat template's system prefix dropped) as the text sequence."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    _quiet()
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2,
                                              joint_attention_dim=QWEN_IMAGE_TE, axes_dims_rope=(4, 6, 6)).eval()
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
                             vae=_qwen_image_vae(seed), text_encoder=tiny_qwen25vl_text_encoder(QWEN_IMAGE_TE, seed=seed),
                             tokenizer=tiny_qwen_tokenizer(), transformer=transformer)


# Z-Image-Turbo's published scheduler config (Tongyi-MAI/Z-Image-Turbo): static shift 3.
Z_IMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
Z_IMAGE_TE = 32


def tiny_z_image_pipeline(seed: int = 0):
    """Z-Image in miniature: single-stream DiT on 16-channel Flux-VAE latents (patch 2), Qwen3's
    second-to-last hidden states of the chat-formatted prompt as the caption."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    _quiet()
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5,
                                           qk_norm=True, cap_feat_dim=Z_IMAGE_TE, rope_theta=256.0, t_scale=1000.0,
                                           axes_dims=[8, 4, 4], axes_lens=[1024, 64, 64]).eval()
    with torch.no_grad():  # made with torch.empty: give them values
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER), vae=_flow_vae(seed),
                          text_encoder=tiny_qwen3_text_encoder(Z_IMAGE_TE, seed=seed), tokenizer=tiny_qwen_tokenizer(),
                          transformer=transformer)


CHROMA_T5 = 32


def tiny_chroma_pipeline(seed: int = 0):
    """Chroma in miniature: Flux.1's layout (16 latent channels packed 2x2, Flux VAE) without CLIP
    or guidance embedding: T5 alone (masked), modulations from its distilled approximator."""
    import torch
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    _quiet()
    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=CHROMA_T5,
                                           axes_dims_rope=(4, 4, 8), approximator_num_channels=8,
                                           approximator_hidden_dim=32, approximator_layers=1).eval()
    return ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), vae=_flow_vae(seed),
                          text_encoder=_t5(CHROMA_T5, seed=seed + 1), tokenizer=tiny_t5_tokenizer(),
                          transformer=transformer)


# Flux.2 klein's scheduler config (black-forest-labs/FLUX.2-klein-4B); the pipeline computes mu
# itself from the token count and the step count (compute_empirical_mu).
FLUX2_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                       max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
# klein takes the stacked hidden states of Qwen3 layers 9, 18 and 27: the tiny encoder has 27.
FLUX2_TE, FLUX2_TE_LAYERS = 16, 27


def _flux2_vae(seed: int = 0, latent_channels: int = 32):
    """Flux.2's VAE in miniature: 32 latent channels, 8x compression, and the batch-norm
    statistics over 2x2 patches (128 channels) that normalise its latents (seeded, so they matter)."""
    import torch
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8,) * 4,
                             layers_per_block=1, latent_channels=latent_channels, norm_num_groups=8, sample_size=64,
                             use_quant_conv=False, use_post_quant_conv=False).eval()
    g = torch.Generator().manual_seed(seed + 91)
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.2 * torch.randn(vae.bn.running_mean.shape, generator=g))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=g))
    return vae


def _flux2_transformer(text_width: int, guidance: bool):
    """Flux.2's transformer in miniature on 32-channel latents patchified 2x2 (128 channels per
    token), reading three stacked text-encoder layers of ``text_width``; ``guidance``: [dev]'s
    guidance embedding (klein has none)."""
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * text_width,
                                   timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
                                   guidance_embeds=guidance).eval()


def tiny_flux2_klein_pipeline(seed: int = 0):
    """Flux.2 [klein] in miniature: Flux.2's transformer on 32-channel latents patchified 2x2 (128
    channels per token), Qwen3 hidden states of three layers stacked as the text sequence."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    _quiet()
    torch.manual_seed(seed)
    transformer = _flux2_transformer(FLUX2_TE, guidance=False)
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER), vae=_flux2_vae(seed),
                              text_encoder=tiny_qwen3_text_encoder(FLUX2_TE, FLUX2_TE_LAYERS, seed=seed, causal_lm=True),
                              tokenizer=tiny_qwen_tokenizer(), transformer=transformer, is_distilled=True)


# Flux.2 [dev] stacks Mistral Small 3's hidden states of layers 10, 20 and 30 (Flux2Pipeline's
# default): the tiny encoder has 30. Its processor's chat format takes a list of content parts.
FLUX2_DEV_TE, FLUX2_DEV_TE_LAYERS = 16, 30
MISTRAL_CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{% for part in m['content'] %}{{ part['text'] }}"
                         "{% endfor %}</s>{% endfor %}")


def tiny_mistral3_text_encoder(hidden: int = FLUX2_DEV_TE, layers: int = FLUX2_DEV_TE_LAYERS, seed: int = 0):
    """Mistral Small 3 (Flux.2 [dev]'s text encoder, a Mistral3ForConditionalGeneration with its
    Pixtral vision tower) in miniature, on ``tiny_qwen_tokenizer``'s vocabulary."""
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Mistral3Config(
        text_config={"model_type": "mistral", "hidden_size": hidden, "intermediate_size": hidden * 2,
                     "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 2,
                     "head_dim": hidden // 2, "vocab_size": QWEN_VOCAB, "max_position_embeddings": 2048,
                     "pad_token_id": qwen_token_id("<|endoftext|>")},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "head_dim": 8, "image_size": 32, "patch_size": 8},
        image_token_index=qwen_token_id("<|image_pad|>"))
    return Mistral3ForConditionalGeneration(cfg).eval()


def tiny_flux2_dev_pipeline(seed: int = 0):
    """Flux.2 [dev] in miniature: Flux.2's transformer with its guidance embedding (guidance-
    distilled, as the published model), Mistral 3 hidden states of three layers stacked."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    _quiet()
    torch.manual_seed(seed)
    transformer = _flux2_transformer(FLUX2_DEV_TE, guidance=True)
    tokenizer = tiny_qwen_tokenizer()
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER), vae=_flux2_vae(seed),
                         text_encoder=tiny_mistral3_text_encoder(seed=seed), tokenizer=tokenizer,
                         transformer=transformer)


BUILDERS = {"sd15": tiny_sd15_pipeline, "sd2": tiny_sd2_pipeline, "sdxl": tiny_sdxl_pipeline,
            "sdxl-refiner": tiny_sdxl_refiner_pipeline, "flux1": tiny_flux_pipeline,
            "sd3": tiny_sd3_pipeline, "flux1-kontext": tiny_flux_kontext_pipeline,
            "flux1-fill": tiny_flux_fill_pipeline,
            "qwen-image-edit": tiny_qwen_image_edit_pipeline, "qwen-image": tiny_qwen_image_pipeline,
            "z-image": tiny_z_image_pipeline, "chroma": tiny_chroma_pipeline,
            "flux2": tiny_flux2_klein_pipeline}


def save_tiny_model(family: str, target: Path, seed: int = 0) -> Path:
    """Build a tiny pipeline of ``family`` and save it as a diffusers folder at ``target``."""
    pipe = BUILDERS[family](seed)
    target = Path(target)
    pipe.save_pretrained(target, safe_serialization=True)
    return target


def install_demo(models_dir: Path) -> Path:
    """The demo model as a diffusers folder; its label is built in (see registry.BUILTIN_LABELS)."""
    target = Path(models_dir) / DEMO_MODEL_NAME
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    save_tiny_model("sd15", tmp)
    tmp.rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    from .config import get_settings

    s = get_settings()
    ap = argparse.ArgumentParser(description="Install the tiny demo model (random weights: noise images).")
    ap.add_argument("--models-dir", type=Path, default=s.models_dir)
    args = ap.parse_args(argv)
    path = install_demo(args.models_dir)
    print(f"demo model {DEMO_MODEL_NAME!r} at {path} (random weights: it makes noise images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
