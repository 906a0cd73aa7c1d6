"""Test utility: tiny inpainting checkpoints (a UNet with 9 input channels), SD 1.5 and SDXL.

They are the demo builders' pipelines with the UNet rebuilt for 4 latent + 1 mask + 4
masked-image channels, saved as the inpainting pipeline classes real checkpoints use.
"""
from __future__ import annotations

from pathlib import Path


def tiny_inpaint_pipeline(family: str, seed: int = 0):
    import torch
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline, UNet2DConditionModel

    from diffusionapi.demo import BUILDERS

    pipe = BUILDERS[family](seed)
    torch.manual_seed(seed + 100)
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "in_channels": 9}).eval()
    parts = dict(pipe.components, unet=unet)
    if family == "sd15":
        return StableDiffusionInpaintPipeline(**parts)
    parts.pop("image_encoder", None)
    parts.pop("feature_extractor", None)
    return StableDiffusionXLInpaintPipeline(**parts)


def save_tiny_inpaint_model(family: str, target: Path, seed: int = 0) -> Path:
    pipe = tiny_inpaint_pipeline(family, seed)
    pipe.save_pretrained(Path(target), safe_serialization=True)
    return Path(target)
