"""Qwen-Image-Edit and Qwen-Image-Edit Plus (2509: several reference images): instruction
editing with a Qwen2.5-VL text encoder that reads the prompt *and* the reference images, and an
MMDiT transformer that sees the references' latents as extra tokens. Recognised from a
diffusers folder whose model_index.json names one of the two pipelines.

It runs through its diffusers pipeline with the pipeline's own scheduler (flow-matching Euler
on the "Simple" schedule, the pipeline's dynamic shift); the engine's other samplers do not
run it yet, so any other sampler/schedule is a 422 naming both. It needs a reference image:
txt2img on it is a 422 (Qwen-Image is the text-to-image model)."""
from __future__ import annotations

from .spec import FamilySpec, FolderConfigs

EDIT, EDIT_PLUS = "QwenImageEditPipeline", "QwenImageEditPlusPipeline"


def matches_checkpoint(keys: set[str]) -> bool:
    return False  # single files: not recognised yet (a diffusers folder is)


def matches_folder(cfg: FolderConfigs) -> bool:
    return cfg.index.get("_class_name") in (EDIT, EDIT_PLUS)


SPEC = FamilySpec(
    id="qwen-image-edit", label="Qwen-Image-Edit", pipeline=EDIT, conditioning="qwen-vl",
    matches_checkpoint=matches_checkpoint, matches_folder=matches_folder, sampler="Euler",
    steps=50, cfg_scale=4.0, size=1024, latent_channels=16, prediction="flow", preview="none",
    gpu_dtype="bfloat16", single_files="Qwen-Image-Edit is loaded from a diffusers folder only",
    edits=True, text_to_image=False, pipeline_variants=(EDIT_PLUS,), pipeline_sampling=("Euler", "simple"),
)


def takes_several_references(pipeline_class: str) -> bool:
    """Edit takes one reference image; Edit Plus several (its encoder is told "Picture 1: ...")."""
    return pipeline_class == EDIT_PLUS
