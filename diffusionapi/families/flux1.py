"""Flux.1 dev / schnell and fine-tunes (flow matching, 16-channel latents packed 2x2, CLIP-L +
T5-XXL; dev is guidance-distilled).

Runs through engine/flow.py on the engine's own samplers."""
from __future__ import annotations

from .spec import FamilySpec, FolderConfigs


def matches_checkpoint(keys: set[str]) -> bool:
    # BFL's layout (alone or under model.diffusion_model. in all-in-one files) or diffusers'.
    original = any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys)
    diffusers = any(k.startswith("single_transformer_blocks.") for k in keys)
    return original or diffusers


def matches_folder(cfg: FolderConfigs) -> bool:
    name = cfg.index.get("_class_name", "")
    return ((name.startswith("Flux") and not name.startswith("Flux2"))  # Flux.2: families/flux2.py
            or cfg.transformer.get("_class_name") == "FluxTransformer2DModel")


SPEC = FamilySpec(
    id="flux1", label="Flux.1", pipeline="FluxPipeline", conditioning="flux",
    matches_checkpoint=matches_checkpoint, matches_folder=matches_folder, sampler="Euler",
    steps=20, cfg_scale=1.0, size=1024, latent_channels=16, prediction="flow", lora_family="flux1",
    preview="flux1", gpu_dtype="bfloat16", distilled_guidance=True,
    # Flux.1-dev's published scheduler config (resolution-dependent shift); schnell's fixed shift 1.
    scheduler=dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                   max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
    scheduler_undistilled=dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False),
    vae_scaling_factor=0.3611, vae_shift_factor=0.1159,
)
