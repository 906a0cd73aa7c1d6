"""Flux.1 Fill dev (inpainting): Flux.1's transformer with 384 input channels per packed token
-- the noisy latents (64), the latents of the image with the masked part blanked (64) and the
mask, each 8x8 pixel block of a token's 2x2 latents as 256 channels -- as diffusers'
FluxFillPipeline feeds it.

A family of its own rather than a flag on flux1: the job service decides from the family (on
API nodes that never load the weights) that a Fill model needs an image and a mask, and what its
default distilled guidance is; and the engine picks its denoiser from the spec. Its files are
Flux.1's in every other way: the same text encoders and VAE (components.py shares them), the same
single-file loader, Flux.1 LoRAs.

Recognised from the files: a diffusers folder whose ``model_index.json`` names
``FluxFillPipeline`` or whose transformer takes 384 input channels; a BFL-layout single file whose
``img_in.weight`` has 384 input features (tried before flux1 in the family table).

Runs through engine/flow.py on the engine's own samplers (``FluxFillDenoiser``)."""
from __future__ import annotations

from .flux1 import SPEC as FLUX1
from .flux1 import matches_checkpoint as flux1_keys
from .spec import FamilySpec, FolderConfigs

PIPELINE = "FluxFillPipeline"
# 16 latent channels x 2x2 (64) + masked-image latents (64) + the 8x8 mask of each of the 2x2 latents (256).
IN_CHANNELS = 384
# The input projection's weight, [inner, in_channels], in BFL's and diffusers' layouts.
INPUT_WEIGHTS = ("img_in.weight", "model.diffusion_model.img_in.weight", "x_embedder.weight")


def matches_checkpoint(keys: set[str]) -> bool:
    return flux1_keys(keys) and any(k in keys for k in INPUT_WEIGHTS)


def matches_shapes(shapes: dict[str, list[int]]) -> bool:
    """The input projection's shape decides (Fill and Flux.1 share every tensor name)."""
    return any(len(shapes.get(k) or ()) == 2 and int(shapes[k][1]) == IN_CHANNELS for k in INPUT_WEIGHTS)


def matches_folder(cfg: FolderConfigs) -> bool:
    return (cfg.index.get("_class_name") == PIPELINE
            or (cfg.transformer.get("_class_name") == "FluxTransformer2DModel"
                and int(cfg.transformer.get("in_channels") or 0) == IN_CHANNELS))


SPEC = FamilySpec(
    id="flux1-fill", label="Flux.1 Fill", pipeline=PIPELINE, conditioning="flux",
    matches_checkpoint=matches_checkpoint, matches_folder=matches_folder, sampler="Euler",
    steps=28, cfg_scale=1.0, size=1024, latent_channels=16, prediction="flow", lora_family="flux1",
    preview="flux1", gpu_dtype="bfloat16", distilled_guidance=True,
    # BFL's recommended guidance for Fill dev (FluxFillPipeline's default too).
    distilled_cfg_scale=30.0,
    scheduler=FLUX1.scheduler, scheduler_undistilled=FLUX1.scheduler_undistilled,
    vae_scaling_factor=FLUX1.vae_scaling_factor, vae_shift_factor=FLUX1.vae_shift_factor,
    text_to_image=False, inpainting_only=True, matches_shapes=matches_shapes,
)
