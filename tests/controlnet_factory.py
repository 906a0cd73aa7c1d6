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
