"""SDXL base: CLIP-L + OpenCLIP bigG, micro-conditioning on sizes, 1024 px. v-prediction /
zero-terminal-SNR fine-tunes (NoobAI-style) are this family with ``prediction`` and ``ztsnr`` set."""
from __future__ import annotations

from .spec import FamilySpec, FolderConfigs


def matches_checkpoint(keys: set[str]) -> bool:
    return any(k.startswith("conditioner.embedders.1.") for k in keys)


def is_xl_folder(cfg: FolderConfigs) -> bool:
    return cfg.unet.get("addition_embed_type") == "text_time" or "XL" in cfg.index.get("_class_name", "")


def matches_folder(cfg: FolderConfigs) -> bool:
    te = cfg.index.get("text_encoder")
    return is_xl_folder(cfg) and not cfg.index.get("requires_aesthetics_score") and bool(te) and te[0] is not None


SPEC = FamilySpec(
    id="sdxl", label="SDXL", pipeline="StableDiffusionXLPipeline", conditioning="sdxl",
    matches_checkpoint=matches_checkpoint, matches_folder=matches_folder,
    steps=30, cfg_scale=7.0, size=1024, embedding_family="sdxl", lora_family="sdxl",
    packaged_config="sdxl", preview="sdxl",
)
