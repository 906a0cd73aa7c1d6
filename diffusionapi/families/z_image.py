"""Z-Image and Z-Image-Turbo (Tongyi-MAI; single-stream DiT, flow matching, Flux.1's 16-channel
VAE, Qwen3-4B text encoder).

Runs through engine/flow.py + engine/flow_families.py on the engine's own samplers (static
shift from its scheduler config). The defaults are Turbo's (the published model people run):
9 steps, no CFG; the base model wants CFG (about 4) and more steps."""
from __future__ import annotations

from .spec import FamilySpec, FolderConfigs


def matches_checkpoint(keys: set[str]) -> bool:
    # Tongyi's / ComfyUI's files and diffusers' share these names.
    return any(k.startswith(("noise_refiner.", "model.diffusion_model.noise_refiner.")) for k in keys) \
        and any(k.startswith(("context_refiner.", "model.diffusion_model.context_refiner.")) for k in keys)


def matches_folder(cfg: FolderConfigs) -> bool:
    # The text-to-image pipeline only (Omni's transformer takes image features besides).
    return cfg.index.get("_class_name") == "ZImagePipeline"


SPEC = FamilySpec(
    id="z-image", label="Z-Image", pipeline="ZImagePipeline", conditioning="z-image",
    matches_checkpoint=matches_checkpoint, matches_folder=matches_folder, sampler="Euler",
    steps=9, cfg_scale=1.0, size=1024, latent_channels=16, prediction="flow", lora_family="z-image",
    preview="flux1", gpu_dtype="bfloat16",
    single_files=("Z-Image single files (transformer-only) are recognised but not loaded yet: "
                  "install the model as a diffusers folder"),
)
