"""Model families, table-driven: one module per family declares how its files are recognised
and how it runs (pipeline class, text-encoder layout, defaults, latents, previews, prediction).

Adding a family is adding a module here and its line in ``FAMILIES``. Detection reads only
what is stored in the files -- safetensors header keys, ``.ckpt`` tensor names (loaded the safe
way) and diffusers config files -- never the names of files or folders.

This package sits below the engine and the registry (tests/test_layers.py): the registry
detects families while scanning, on API nodes that never import torch, so nothing here
imports torch, diffusers or transformers.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..fileinfo import CheckpointError, ckpt_keys, read_model_header
from . import chroma, flux1, flux1_fill, flux1_kontext, flux2, qwen_image, qwen_image_edit, sd2, sd3, sd15, sdxl, sdxl_refiner, z_image
from .spec import Detected, FamilySpec, FolderConfigs

__all__ = ["BY_ID", "FAMILIES", "LABELS", "Detected", "FamilySpec", "FolderConfigs", "UnknownFamily",
           "detect_checkpoint_keys", "detect_folder", "detect_single_file", "folder_pipeline", "spec"]


# Most specific first: the first family whose rule matches wins (the editing families before
# the ones whose transformer they share: qwen-image-edit before qwen-image, flux1-kontext before
# flux1; flux2 before flux1, whose pipeline class names start alike; flux1-fill before flux1, whose
# tensor names it shares).
FAMILIES: tuple[FamilySpec, ...] = (qwen_image_edit.SPEC, flux1_kontext.SPEC, qwen_image.SPEC, z_image.SPEC,
                                    chroma.SPEC, flux2.SPEC, flux1_fill.SPEC, flux1.SPEC, sd3.SPEC, sdxl.SPEC, sdxl_refiner.SPEC,
                                    sd2.SPEC, sd15.SPEC)
BY_ID: dict[str, FamilySpec] = {f.id: f for f in FAMILIES}
LABELS: dict[str, str] = {f.id: f.label for f in FAMILIES}


class UnknownFamily(CheckpointError):
    """A file or folder that no family recognises."""


def spec(family: str) -> FamilySpec:
    """The spec of a family id (a ``vocabulary.Family`` or its string)."""
    return BY_ID[str(family)]


# ---------------------------------------------------------------------------- single files

# NoobAI-style SDXL files carry these empty marker tensors at the top level of the state dict;
# ComfyUI, Forge and A1111's dev branch read them (diffusers does not).
V_PRED_MARKER, ZTSNR_MARKER = "v_pred", "ztsnr"


def checkpoint_keys(path: Path) -> set[str]:
    """A single file's tensor names: the safetensors header, or a ``.ckpt`` loaded weights-only."""
    if path.suffix.lower() in (".safetensors", ".gguf"):
        return {k for k in read_model_header(path) if k != "__metadata__"}
    return set(ckpt_keys(path))


def checkpoint_shapes(path: Path) -> dict[str, list[int]] | None:
    """A single file's tensor shapes from its header (None for a ``.ckpt``: its shapes are not
    read, so a family that needs them does not match it)."""
    if path.suffix.lower() not in (".safetensors", ".gguf"):
        return None
    return {k: list(v.get("shape") or ()) for k, v in read_model_header(path).items()
            if k != "__metadata__" and isinstance(v, dict)}


def detect_checkpoint_keys(keys: set[str], path: Path | None = None,
                           shapes: dict[str, list[int]] | None = None) -> Detected:
    for fam in FAMILIES:
        if fam.matches_checkpoint(keys) and (fam.matches_shapes is None
                                             or (shapes is not None and fam.matches_shapes(shapes))):
            prediction, ztsnr = fam.prediction, False
            if V_PRED_MARKER in keys:
                prediction, ztsnr = "v_prediction", ZTSNR_MARKER in keys
            elif fam.checkpoint_prediction is not None and path is not None:
                found = fam.checkpoint_prediction(keys, path)
                if found is not None:
                    prediction, ztsnr = found
            return Detected(fam.id, prediction, ztsnr)
    raise UnknownFamily(f"{path.name if path else 'the file'} is not a checkpoint of a known family "
                        f"({', '.join(f.id for f in FAMILIES)}): no UNet or transformer keys recognised")


def detect_single_file(path: Path) -> Detected:
    """The family of an original-layout single file; a ``<stem>.config/`` folder next to it
    (a diffusers config for it) decides prediction and zero-SNR when the file has no markers."""
    path = Path(path)
    keys = checkpoint_keys(path)
    found = detect_checkpoint_keys(keys, path, checkpoint_shapes(path))
    if V_PRED_MARKER not in keys:
        sidecar = path.with_name(path.stem + ".config")
        sched = _read_json(sidecar / "scheduler" / "scheduler_config.json")
        if sched:
            found = Detected(found.family, *_scheduler_prediction(sched, found.prediction))
    return found


# ---------------------------------------------------------------------------- diffusers folders

def _read_json(p: Path) -> dict:
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def folder_configs(folder: Path) -> FolderConfigs:
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())  # required: a broken one is a problem
    return FolderConfigs(index, _read_json(folder / "unet" / "config.json"),
                         _read_json(folder / "transformer" / "config.json"),
                         _read_json(folder / "scheduler" / "scheduler_config.json"),
                         _read_json(folder / "text_encoder" / "config.json"))


def _scheduler_prediction(sched: dict, default: str) -> tuple[str, bool]:
    return str(sched.get("prediction_type") or default), bool(sched.get("rescale_betas_zero_snr", False))


def detect_folder(folder: Path) -> Detected:
    cfg = folder_configs(folder)
    for fam in FAMILIES:
        if fam.matches_folder(cfg):
            if fam.prediction == "flow":
                return Detected(fam.id, "flow", False)
            return Detected(fam.id, *_scheduler_prediction(cfg.scheduler, fam.prediction))
    raise UnknownFamily(f"{Path(folder).name}: model_index.json names {cfg.index.get('_class_name')!r}, "
                        f"not a pipeline of a known family ({', '.join(f.id for f in FAMILIES)})")


def folder_pipeline(folder: Path) -> str | None:
    """The pipeline class a diffusers folder's model_index.json names (None: not readable here,
    e.g. on an API node of a cluster whose models live on the workers)."""
    name = _read_json(Path(folder) / "model_index.json").get("_class_name")
    return str(name) if name else None


def pipeline_class_name(cfg: FolderConfigs) -> str:
    return str(cfg.index.get("_class_name", ""))
