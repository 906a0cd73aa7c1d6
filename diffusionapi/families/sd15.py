"""Stable Diffusion 1.x: one CLIP ViT-L text encoder, 4-channel latents, 512 px."""
from __future__ import annotations

from .spec import FamilySpec, FolderConfigs

UNET_PREFIX = "model.diffusion_model."


def matches_checkpoint(keys: set[str]) -> bool:
    # The CompVis layout: a UNet, conditioned by cond_stage_model (CLIP) -- SD 2's OpenCLIP
    # and SDXL's conditioner are matched before this rule.
    return any(k.startswith(UNET_PREFIX) for k in keys)


def matches_folder(cfg: FolderConfigs) -> bool:
    # The UNet pipelines' fallback (the more specific rules are tried first), as before families.
    return (cfg.unet.get("addition_embed_type") is None and "XL" not in cfg.index.get("_class_name", "")
            and "transformer" not in cfg.index and not cfg.transformer)


SPEC = FamilySpec(
    id="sd15", label="SD 1.5", pipeline="StableDiffusionPipeline", conditioning="clip",
    matches_checkpoint=matches_checkpoint, matches_folder=matches_folder,
    steps=30, cfg_scale=7.0, size=512, embedding_family="sd15", lora_family="sd15",
    packaged_config="sd15", preview="sd15",
)
