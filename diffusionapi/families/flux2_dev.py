"""Flux.2 [dev] (black-forest-labs; Flux.2's transformer with a guidance embedding, the 32-channel
latents of Flux.2's VAE, Mistral Small 3 as text encoder: three layers' hidden states stacked).

The same engine path as Flux.2 [klein] (engine/flow_families.py: Flux2Denoiser, the "flux2"
conditioning through the pipeline's encode_prompt, reference images as extra tokens for edits);
it differs in what a request leaves out: Flux2Pipeline's defaults, 50 steps with the embedded
guidance 4 (``distilled_cfg_scale``, Forge's name) and no negative pass (CFG 1)."""
from __future__ import annotations

from .spec import FamilySpec, FolderConfigs

PIPELINE = "Flux2Pipeline"


def matches_checkpoint(keys: set[str]) -> bool:
    # Flux.2's shared modulations with a guidance embedding (klein has none): BFL's names
    # (guidance_in.*) and diffusers' (time_guidance_embed.guidance_embedder.*).
    return (any("double_stream_modulation_img" in k for k in keys)
            and any("guidance_in." in k or "guidance_embedder." in k for k in keys))


def matches_folder(cfg: FolderConfigs) -> bool:
    return cfg.index.get("_class_name") == PIPELINE


SPEC = FamilySpec(
    id="flux2-dev", label="Flux.2 [dev]", pipeline=PIPELINE, conditioning="flux2",
    matches_checkpoint=matches_checkpoint, matches_folder=matches_folder, sampler="Euler",
    steps=50, cfg_scale=1.0, size=1024, latent_channels=32, prediction="flow", lora_family="flux2",
    preview="flux2", gpu_dtype="bfloat16", empirical_shift=True, edits=True, native_img2img=True,
    distilled_guidance=True, distilled_cfg_scale=4.0,
    single_files=("Flux.2 [dev] single files (transformer-only) are recognised but not loaded yet: "
                  "install the model as a diffusers folder"),
)
