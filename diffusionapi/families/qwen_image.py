"""Qwen-Image (Alibaba Qwen; MMDiT, flow matching, 16-channel latents of its own video-style VAE
packed 2x2, Qwen2.5-VL-7B text encoder; true CFG with a negative prompt).

Runs through engine/flow.py + engine/flow_families.py on the engine's own samplers (dynamic
shift from its scheduler config)."""
from __future__ import annotations

from .spec import FamilySpec, FolderConfigs


def matches_checkpoint(keys: set[str]) -> bool:
    # ComfyUI / Qwen's files and diffusers' share the names: img_mod / txt_mod per block of
    # ``transformer_blocks`` (BFL's Flux files have img_mod / txt_mod too, under ``double_blocks``).
    blocks = [k for k in keys if "transformer_blocks." in k]
    return any(".img_mod." in k for k in blocks) and any(".txt_mod." in k for k in blocks)


def matches_folder(cfg: FolderConfigs) -> bool:
    return (cfg.index.get("_class_name") == "QwenImagePipeline"
            or (cfg.transformer.get("_class_name") == "QwenImageTransformer2DModel"
                and not cfg.index.get("_class_name", "").startswith("QwenImageEdit")))


SPEC = FamilySpec(
    id="qwen-image", label="Qwen-Image", pipeline="QwenImagePipeline", conditioning="qwen-image",
    matches_checkpoint=matches_checkpoint, matches_folder=matches_folder, sampler="Euler",
    # The model card's settings: 50 steps, true_cfg_scale 4, 1328 x 1328 for 1:1.
    steps=50, cfg_scale=4.0, size=1328, latent_channels=16, prediction="flow", lora_family="qwen-image",
    preview="qwen-image", gpu_dtype="bfloat16",
    single_files=("Qwen-Image single files (transformer-only) are recognised but not loaded yet: "
                  "install the model as a diffusers folder"),
)
