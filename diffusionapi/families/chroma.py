"""Chroma (lodestones; Flux.1-schnell derived: 16-channel latents packed 2x2, Flux VAE, T5-XXL
alone, no guidance embedding, so real CFG with a negative prompt).

Single files (lodestones' ``chroma-unlocked-v50.safetensors``, Chroma1-HD, fp8 and GGUF copies:
the transformer alone in BFL / ComfyUI key layout) run with Flux.1's T5-XXL and ae component
files (components.py; engine/convert_flow.py builds the transformer from its tensors' sizes).

Runs through engine/flow.py + engine/flow_families.py on the engine's own samplers. Its LoRAs
have Flux.1's key names: Flux.1 LoRA files are offered to it (the layers Chroma lacks, the
per-block modulation, make such a file fail to load with a message)."""
from __future__ import annotations

from .flux1 import SPEC as FLUX1
from .spec import FamilySpec, FolderConfigs


def matches_checkpoint(keys: set[str]) -> bool:
    # Its guidance approximator, in lodestones' / ComfyUI's files and in diffusers'.
    return any(k.startswith(("distilled_guidance_layer.", "model.diffusion_model.distilled_guidance_layer."))
               for k in keys)


def matches_folder(cfg: FolderConfigs) -> bool:
    return (cfg.index.get("_class_name") == "ChromaPipeline"
            or cfg.transformer.get("_class_name") == "ChromaTransformer2DModel")


SPEC = FamilySpec(
    id="chroma", label="Chroma", pipeline="ChromaPipeline", conditioning="chroma",
    matches_checkpoint=matches_checkpoint, matches_folder=matches_folder, sampler="Euler",
    # ChromaPipeline's defaults (made for Chroma1-HD): 35 steps, CFG 5.
    steps=35, cfg_scale=5.0, size=1024, latent_channels=16, prediction="flow", lora_family="flux1",
    preview="flux1", gpu_dtype="bfloat16",
    # Single files carry no scheduler or VAE config: the diffusers releases of Chroma ship
    # Flux.1-dev's scheduler config (resolution-dependent shift), and its VAE is Flux.1's ae.
    scheduler=FLUX1.scheduler, vae_scaling_factor=FLUX1.vae_scaling_factor,
    vae_shift_factor=FLUX1.vae_shift_factor,
)
