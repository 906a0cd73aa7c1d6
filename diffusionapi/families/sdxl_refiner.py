"""The SDXL refiner: OpenCLIP bigG alone, aesthetic-score conditioning; finishes an SDXL base's latents."""
from __future__ import annotations

from .spec import FamilySpec, FolderConfigs
from .sdxl import is_xl_folder


def matches_checkpoint(keys: set[str]) -> bool:
    return any(k.startswith("conditioner.embedders.0.model.") for k in keys)


def matches_folder(cfg: FolderConfigs) -> bool:
    return is_xl_folder(cfg)  # the SDXL base rule is tried first


SPEC = FamilySpec(
    id="sdxl-refiner", label="SDXL refiner", pipeline="StableDiffusionXLImg2ImgPipeline",
    conditioning="sdxl-refiner", matches_checkpoint=matches_checkpoint, matches_folder=matches_folder,
    steps=30, cfg_scale=7.0, size=1024, base_model=False, embedding_family="sdxl", lora_family="sdxl",
    packaged_config="sdxl-refiner", preview="sdxl",
)
