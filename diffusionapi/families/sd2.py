"""Stable Diffusion 2.x: one OpenCLIP ViT-H text encoder (diffusers keeps its penultimate layer
as the last one), linear attention projections; 512 px epsilon (2.x-base) and 768 px
v-prediction (768-v) models share the architecture and differ in ``prediction``."""
from __future__ import annotations

import re
from pathlib import Path

from .spec import FamilySpec, FolderConfigs

OPENCLIP = "cond_stage_model.model."


def matches_checkpoint(keys: set[str]) -> bool:
    # SD 1.x conditions on cond_stage_model.transformer (HF CLIP); SD 2.x on OpenCLIP's layout.
    return any(k.startswith("model.diffusion_model.") for k in keys) and any(k.startswith(OPENCLIP) for k in keys)


def matches_folder(cfg: FolderConfigs) -> bool:
    # SD 2's UNet projects attention with linear layers; SD 1.x's with 1x1 convolutions.
    return (bool(cfg.unet) and cfg.unet.get("addition_embed_type") is None
            and bool(cfg.unet.get("use_linear_projection")) and "XL" not in cfg.index.get("_class_name", ""))


_LAST_NORM = re.compile(r"model\.diffusion_model\.output_blocks\.(\d+)\.1\.transformer_blocks\.0\.norm1\.bias$")


def checkpoint_prediction(keys: set[str], path: Path) -> tuple[str, bool] | None:
    """SD 2 single files do not say whether they are v-prediction. ComfyUI's rule: the first
    LayerNorm bias of the last output block's transformer has a standard deviation above 0.09
    in 768-v models (trained weights) and stays near 0 in epsilon ones. Inpainting models
    (9 input channels) are epsilon."""
    found = sorted(((int(m[1]), k) for k in keys if (m := _LAST_NORM.match(k))), reverse=True)
    if not found or path.suffix.lower() != ".safetensors":
        return None
    from safetensors import safe_open  # numpy only: the registry runs where torch is not loaded

    with safe_open(str(path), framework="numpy") as f:
        conv_in = f.get_slice("model.diffusion_model.input_blocks.0.0.weight").get_shape() \
            if "model.diffusion_model.input_blocks.0.0.weight" in keys else None
        if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
            return "epsilon", False
        bias = f.get_tensor(found[0][1]).astype("float64")
    return ("v_prediction" if float(bias.std()) > 0.09 else "epsilon"), False


SPEC = FamilySpec(
    id="sd2", label="SD 2.x", pipeline="StableDiffusionPipeline", conditioning="clip",
    matches_checkpoint=matches_checkpoint, matches_folder=matches_folder,
    steps=30, cfg_scale=7.0, size=768, embedding_family=None, lora_family="sd2",
    packaged_config=None, preview="sd15", checkpoint_prediction=checkpoint_prediction,
    notes=("single files need a diffusers config folder <name>.config/ next to them",),
)
