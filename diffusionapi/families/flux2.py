"""Flux.2 (black-forest-labs; flow matching, 32-channel latents patchified 2x2 into 128-channel
tokens and normalised by the VAE's batch-norm statistics; three text-encoder layers' hidden
states stacked as the text sequence): [klein] (Flux2KleinPipeline, a Qwen3 text encoder, no
guidance embedding) and [dev] (Flux2Pipeline, Mistral Small 3, a guidance embedding that takes
``distilled_cfg_scale``, Forge's name, default 4 as the pipeline's). One family, as the
issue's ids have it: the folder's model_index.json says which pipeline loads.

Runs through engine/flow.py + engine/flow_families.py on the engine's own samplers; the shift
follows diffusers' Flux.2 rule (mu from the token count and the step count). CFG 1 by default
(one pass: the distilled klein and the guidance-distilled dev); klein Base wants about 50 steps
at CFG 4.

It also edits (POST /edit, the pipelines' ``image``): the reference images ride along as extra
tokens (engine/flow_families.py). Native img2img stays img2img; /sdapi/v1/img2img and OpenAI's
/v1/images/edits run the edit, as on Kontext."""
from __future__ import annotations

from .spec import FamilySpec, FolderConfigs

KLEIN, DEV = "Flux2KleinPipeline", "Flux2Pipeline"


def matches_checkpoint(keys: set[str]) -> bool:
    # Its shared modulations, in BFL's / ComfyUI's files and in diffusers' (before Flux.1: both
    # have double blocks). [dev]'s files have guidance_in.* besides.
    return any("double_stream_modulation_img" in k for k in keys)


def matches_folder(cfg: FolderConfigs) -> bool:
    return cfg.index.get("_class_name") in (KLEIN, DEV)


SPEC = FamilySpec(
    id="flux2", label="Flux.2", pipeline=KLEIN, pipeline_variants=(DEV,), conditioning="flux2",
    matches_checkpoint=matches_checkpoint, matches_folder=matches_folder, sampler="Euler",
    steps=4, cfg_scale=1.0, size=1024, latent_channels=32, prediction="flow", lora_family="flux2",
    preview="flux2", gpu_dtype="bfloat16", empirical_shift=True, edits=True, native_img2img=True,
    distilled_guidance=True, distilled_cfg_scale=4.0,  # [dev]'s embedded guidance; klein has none
    single_files=("Flux.2 single files (transformer-only) are recognised but not loaded yet: "
                  "install the model as a diffusers folder"),
)
