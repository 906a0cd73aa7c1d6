"""Stable Diffusion 3 / 3.5 (MMDiT, flow matching, 16-channel latents, CLIP-L + CLIP-G + T5).

Runs through engine/flow.py on the engine's own samplers (static shift from its scheduler config)."""
from __future__ import annotations

from .spec import FamilySpec, FolderConfigs


def matches_checkpoint(keys: set[str]) -> bool:
    original = any(k.startswith(("model.diffusion_model.joint_blocks.", "joint_blocks.")) for k in keys)
    diffusers = (any(k.startswith("transformer_blocks.") and ".attn.add_k_proj." in k for k in keys)
                 and "pos_embed.pos_embed" in keys)
    return original or diffusers


def matches_folder(cfg: FolderConfigs) -> bool:
    return ("StableDiffusion3" in cfg.index.get("_class_name", "")
            or cfg.transformer.get("_class_name") == "SD3Transformer2DModel")


SPEC = FamilySpec(
    id="sd3", label="SD 3.x", pipeline="StableDiffusion3Pipeline", conditioning="sd3",
    matches_checkpoint=matches_checkpoint, matches_folder=matches_folder, sampler="Euler",
    steps=28, cfg_scale=4.5, size=1024, latent_channels=16, prediction="flow", lora_family="sd3",
    preview="sd3", gpu_dtype="bfloat16",
    scheduler=dict(num_train_timesteps=1000, shift=3.0),  # SD 3 / 3.5's published config
    vae_scaling_factor=1.5305, vae_shift_factor=0.0609,
)
