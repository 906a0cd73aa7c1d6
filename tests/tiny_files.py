"""Tiny random-weight LoRA and upscaler files, written in code for tests and benchmarks."""
from __future__ import annotations

from pathlib import Path


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
