"""Flux.1 Kontext dev (instruction editing): Flux.1's transformer, run with the reference
images' latents as extra tokens (their own position ids). The weights look like Flux.1's, so
only the pipeline class tells the two apart: a diffusers folder whose ``model_index.json``
names ``FluxKontextPipeline`` (tried before ``flux1`` in the family table).

Runs through engine/flow.py on the engine's own samplers (``FluxKontextDenoiser``)."""
from __future__ import annotations

from .spec import FamilySpec, FolderConfigs

PIPELINE = "FluxKontextPipeline"


def matches_checkpoint(keys: set[str]) -> bool:
    # A Kontext transformer file has Flux.1's keys: nothing in it says "Kontext", so single
    # files are taken for flux1 (and refused there until single files load).
    return False


def matches_folder(cfg: FolderConfigs) -> bool:
    return cfg.index.get("_class_name") == PIPELINE


SPEC = FamilySpec(
    id="flux1-kontext", label="Flux.1 Kontext", pipeline=PIPELINE, conditioning="flux",
    matches_checkpoint=matches_checkpoint, matches_folder=matches_folder, sampler="Euler",
    steps=28, cfg_scale=1.0, size=1024, latent_channels=16, prediction="flow", lora_family="flux1",
    preview="flux1", gpu_dtype="bfloat16", distilled_guidance=True,
    single_files="Flux.1 Kontext is recognised from a diffusers folder only (FluxKontextPipeline)",
    # Several references are given to the transformer side by side (engine/flow.py): BFL trained
    # on one, ComfyUI and InvokeAI chain more the same way. Without one it is a text-to-image
    # model (FluxKontextPipeline with no image).
    edits=True, text_to_image=True,
)
