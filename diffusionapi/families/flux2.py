"""Flux.2 [klein] (black-forest-labs; flow matching, 32-channel latents patchified 2x2 into
128-channel tokens and normalised by the VAE's batch-norm statistics, Qwen3 text encoder: three
layers' hidden states stacked).

Runs through engine/flow.py + engine/flow_families.py on the engine's own samplers; the shift
follows diffusers' Flux.2 rule (mu from the token count and the step count). Flux.2 [dev]
(Flux2Pipeline, Mistral text encoder) is families/flux2_dev.py. The defaults are the distilled
klein's (4 steps, CFG 1); klein Base wants about 50 steps at CFG 4.

It also edits (POST /edit, Flux2KleinPipeline's ``image``): the reference images ride along as
extra tokens (engine/flow_families.py). Native img2img stays img2img; /sdapi/v1/img2img and
OpenAI's /v1/images/edits run the edit, as on Kontext."""
from __future__ import annotations

from .spec import FamilySpec, FolderConfigs


def matches_checkpoint(keys: set[str]) -> bool:
    # Its shared modulations, in BFL's / ComfyUI's files and in diffusers' (before Flux.1: both
    # have double blocks).
    return any("double_stream_modulation_img" in k for k in keys)


def matches_folder(cfg: FolderConfigs) -> bool:
    return cfg.index.get("_class_name") == "Flux2KleinPipeline"


SPEC = FamilySpec(
    id="flux2", label="Flux.2", pipeline="Flux2KleinPipeline", conditioning="flux2",
    matches_checkpoint=matches_checkpoint, matches_folder=matches_folder, sampler="Euler",
    steps=4, cfg_scale=1.0, size=1024, latent_channels=32, prediction="flow", lora_family="flux2",
    preview="flux2", gpu_dtype="bfloat16", empirical_shift=True, edits=True, native_img2img=True,
    single_files=("Flux.2 single files (transformer-only) are recognised but not loaded yet: "
                  "install the model as a diffusers folder"),
)
