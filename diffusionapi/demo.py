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

DEMO_MODEL_NAME = "demo-tiny-sd15"
DEMO_MODEL_LABEL = "Demo (tiny random weights, noise images)"

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


BUILDERS = {"sd15": tiny_sd15_pipeline, "sdxl": tiny_sdxl_pipeline, "sdxl-refiner": tiny_sdxl_refiner_pipeline}


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


# ---------------------------------------------------------------------------- tiny LoRAs

_UNET_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
_TE_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")


def _lora_targets(module, suffixes):
    import torch

    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, torch.nn.Linear) and n.endswith(suffixes)]


def _te_name(name: str) -> str:
    # transformers >= 5.6 drops the "text_model." prefix from CLIPTextModel module names;
    # LoRA files (kohya and diffusers alike) are written with it.
    return name if name.startswith("text_model.") else "text_model." + name


def write_tiny_lora(pipe, path: Path, fmt: str = "kohya", *, seed: int = 0, rank: int = 4,
                    strength: float = 0.5, text_encoder: bool = True, unet: bool = True) -> Path:
    """A random LoRA for ``pipe``'s UNet (and text encoders), as kohya (.alpha) or diffusers/PEFT keys."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    parts = [("unet", pipe.unet, _UNET_TARGETS)] if unet else []
    if text_encoder:
        if getattr(pipe, "text_encoder", None) is not None:
            parts.append(("te1" if getattr(pipe, "text_encoder_2", None) is not None else "te",
                          pipe.text_encoder, _TE_TARGETS))
        if getattr(pipe, "text_encoder_2", None) is not None:
            parts.append(("te2", pipe.text_encoder_2, _TE_TARGETS))
    for part, module, suffixes in parts:
        for name, lin in _lora_targets(module, suffixes):
            down = torch.randn(rank, lin.in_features, generator=g) * strength
            up = torch.randn(lin.out_features, rank, generator=g) * strength
            full = name if part == "unet" else _te_name(name)
            if fmt == "kohya":
                key = f"lora_{part}_{full.replace('.', '_')}"
                sd[f"{key}.lora_down.weight"] = down
                sd[f"{key}.lora_up.weight"] = up
                sd[f"{key}.alpha"] = torch.tensor(float(rank) / 2)
            elif fmt == "diffusers":
                prefix = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}[part]
                sd[f"{prefix}.{full}.lora_A.weight"] = down
                sd[f"{prefix}.{full}.lora_B.weight"] = up
            else:
                raise ValueError(f"unknown LoRA format {fmt!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


# ---------------------------------------------------------------------------- tiny upscalers

def write_tiny_upscaler(path: Path, kind: str = "esrgan-old", *, scale: int = 4, seed: int = 0) -> Path:
    """A random-weight upscaler file spandrel recognises: "esrgan-old" (model.N keys),
    "esrgan-new" (Real-ESRGAN's conv_first/body keys) or "compact" (SRVGGNetCompact)."""
    import re

    import torch
    from safetensors.torch import save_file
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    if kind.startswith("esrgan"):
        # Narrow and one block deep; the RRDB growth channel stays 32 or spandrel will not detect it.
        sd = {k: v * 0.1 for k, v in ESRGAN(num_filters=8, num_blocks=1, scale=scale).state_dict().items()}
        if kind == "esrgan-new":
            ups = sorted({int(m.group(1)) for k in sd if (m := re.match(r"model\.(\d+)\.", k))} - {0, 1})
            *upconvs, hr, last = ups
            new = {}
            for k, v in sd.items():
                m = re.match(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", k)
                if m:
                    new[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = v
                    continue
                idx, kind_ = k.split(".")[1], k.split(".")[-1]
                if k.startswith("model.1.sub."):
                    new[f"conv_body.{kind_}"] = v
                elif idx == "0":
                    new[f"conv_first.{kind_}"] = v
                elif int(idx) in upconvs:
                    new[f"conv_up{upconvs.index(int(idx)) + 1}.{kind_}"] = v
                elif int(idx) == hr:
                    new[f"conv_hr.{kind_}"] = v
                else:
                    new[f"conv_last.{kind_}"] = v
            sd = new
    elif kind == "compact":
        sd = Compact(num_feat=8, num_conv=2, upscale=scale).state_dict()
    else:
        raise ValueError(f"unknown upscaler kind {kind!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, str(path))
    return path
