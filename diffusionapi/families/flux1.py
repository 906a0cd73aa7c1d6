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
    single_files=("Flux.1 single files (all-in-one or transformer-only) are recognised but not loaded yet: "
                  "install the model as a diffusers folder"),
)
