"""Test utility: tiny random ControlNets built from the tiny UNets, saved in the layouts people download.

``ControlNetModel.from_unet`` copies the UNet's encoder and zero-initialises the output
convolutions (as training starts); a zero ControlNet changes nothing, so the zero convolutions get
seeded random weights here. ``save_ldm`` writes lllyasviel's original layout (``control_model.``
prefix, ``input_blocks`` / ``zero_convs`` / ``input_hint_block``), the reverse of diffusers' converter.
"""
from __future__ import annotations

import types
from pathlib import Path

import torch

from tests.checkpoint_factory import unet_to_original


def tiny_controlnet(unet_dir: Path, seed: int = 0, scale: float = 0.3):
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(unet_dir))
    cn = ControlNetModel.from_unet(unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return cn.eval()


def controlnet_to_ldm(sd: dict, config) -> dict:
    out = {}
    rest = {}
    n_emb = len(config.conditioning_embedding_out_channels)
    last_hint = 2 * (2 * (n_emb - 1)) + 2  # conv_in, the blocks (each after a SiLU), conv_out
    for k, v in sd.items():
        if k.startswith("controlnet_cond_embedding.conv_in."):
            out["input_hint_block.0." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("controlnet_cond_embedding.conv_out."):
            out[f"input_hint_block.{last_hint}." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("controlnet_cond_embedding.blocks."):
            i, kind = k.split(".")[2], k.split(".")[3]
            out[f"input_hint_block.{2 * (int(i) + 1)}.{kind}"] = v
        elif k.startswith("controlnet_down_blocks."):
            i, kind = k.split(".")[1], k.split(".")[2]
            out[f"zero_convs.{i}.0.{kind}"] = v
        elif k.startswith("controlnet_mid_block."):
            out["middle_block_out.0." + k.rsplit(".", 1)[1]] = v
        else:
            rest[k] = v
    shim = types.SimpleNamespace(layers_per_block=config.layers_per_block, up_block_types=())
    for k, v in unet_to_original(rest, shim).items():
        out[k[len("model.diffusion_model."):]] = v
    return out


def save_ldm(cn, target: Path, *, prefix: str = "control_model.", fmt: str = "safetensors") -> Path:
    sd = {prefix + k: v.detach().contiguous() for k, v in controlnet_to_ldm(cn.state_dict(), cn.config).items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(target))
    else:
        torch.save(sd, str(target))
    return target


def save_diffusers_single_file(cn, target: Path) -> Path:
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in cn.state_dict().items()}, str(target))
    return target


def tiny_clip_vision(target: Path, projection_dim: int = 16, seed: int = 0) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=projection_dim)
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(str(target))
    return target


def tiny_ip_adapter(unet_dir: Path, target: Path, image_dim: int = 16, seed: int = 0, scale: float = 0.5) -> Path:
    """A plain IP-Adapter (4 image tokens) for the UNet in ``unet_dir``, in h94's .safetensors layout:
    ``image_proj.proj/norm`` and ``ip_adapter.<n>.to_k_ip/to_v_ip`` for the n-th attention processor
    (cross-attention ones are the odd n, as diffusers numbers them)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(str(unet_dir))
    cfg = unet.config
    cross = cfg.cross_attention_dim
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(shape, generator=g) * scale

    sd = {"image_proj.proj.weight": rnd(cross * 4, image_dim), "image_proj.proj.bias": rnd(cross * 4),
          "image_proj.norm.weight": 1 + rnd(cross), "image_proj.norm.bias": rnd(cross)}
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = cfg.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(cfg.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = cfg.block_out_channels[int(name[len("down_blocks.")])]
        sd[f"ip_adapter.{key}.to_k_ip.weight"] = rnd(hidden, cross)
        sd[f"ip_adapter.{key}.to_v_ip.weight"] = rnd(hidden, cross)
        key += 2
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(target))
    return target
