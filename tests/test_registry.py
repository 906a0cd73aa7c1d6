"""Registry: discovery, labels, resolution, safety."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from diffusionapi.registry import UnknownName, Registry, derive_label

from .conftest import HUB_NAME, make_settings


def test_discovery_and_families(model_store, tmp_path):
    reg = Registry(make_settings(model_store, tmp_path))
    fam = {m.name: (m.family, m.format) for m in reg.models()}
    assert fam == {"tiny-sd15": ("sd15", "diffusers"), "tiny-sdxl": ("sdxl", "diffusers"),
                   "tiny-sdxl-refiner": ("sdxl-refiner", "diffusers"), HUB_NAME: ("sd15", "hub-cache")}


def test_family_never_from_the_name(model_store, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(model_store / "models" / "tiny-sd15", models / "my-sdxl-model")
    shutil.copytree(model_store / "models" / "tiny-sdxl", models / "sd15-not-really")
    reg = Registry(make_settings(model_store, tmp_path, models_dir=models))
    fam = {m.name: m.family for m in reg.models()}
    assert fam == {"my-sdxl-model": "sd15", "sd15-not-really": "sdxl"}


def test_hub_cache_without_refs_takes_the_newest_snapshot(model_store, tmp_path):
    models = tmp_path / "models"
    snap = models / "models--org--repo" / "snapshots"
    shutil.copytree(model_store / "models" / "tiny-sd15", snap / "old")
    shutil.copytree(model_store / "models" / "tiny-sd15", snap / "new")
    os.utime(snap / "old", (1, 1))
    (models / "models--org--empty" / "snapshots").mkdir(parents=True)
    reg = Registry(make_settings(model_store, tmp_path, models_dir=models))
    assert [(m.name, m.path.name) for m in reg.models()] == [("models--org--repo", "new")]
    assert reg.resolve_model("repo").name == "models--org--repo"


def test_labels_and_resolution(model_store, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"tiny-sd15": "Pastel Mix", "tiny-sdxl": "PlantMilk (HempII)"}))
    reg = Registry(make_settings(model_store, tmp_path, model_labels=labels))
    assert reg.resolve_model("pastel_mix").name == "tiny-sd15"
    assert reg.resolve_model("PLANTMILK (hempii)").name == "tiny-sdxl"
    assert reg.resolve_model("tiny-hub-sd15").name == HUB_NAME
    with pytest.raises(UnknownName, match="did you mean"):
        reg.resolve_model("Pastel Mixx")
    labels.write_text("{broken")
    assert Registry(make_settings(model_store, tmp_path, model_labels=labels)).labels() == {}


def test_shipped_labels_file_has_the_seeds_seven():
    from pathlib import Path

    data = json.loads((Path(__file__).resolve().parents[1] / "stable_diffusion" / "model_labels.json").read_text())
    assert data["John6666__amanatsu-illustrious-v11-sdxl"] == "Amanatsu" and len(data) == 7
    assert derive_label("models--Meina--MeinaMix_V11") == "MeinaMix V11"


def test_seed_compat_functions(model_store, tmp_path, monkeypatch):
    from diffusionapi import config, generate

    monkeypatch.setenv("DIFFUSIONAPI_MODELS_DIR", str(model_store / "models"))
    monkeypatch.setenv("DIFFUSIONAPI_MODEL_LABELS", str(model_store / "labels.json"))
    config.get_settings.cache_clear()
    try:
        labels = generate.get_model_labels()
        assert labels["tiny-sd15"] == "Tiny SD"
        assert generate.get_model_name_from_label("tiny sd") == "tiny-sd15"
        assert generate.get_model_name_from_label("nothing") is None
    finally:
        config.get_settings.cache_clear()


def test_nested_folders_and_single_files(model_store, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(model_store / "models" / "tiny-sd15", models / "anime" / "nested-sd15")
    (models / "anime" / "loop").symlink_to(models / "anime")
    reg = Registry(make_settings(model_store, tmp_path, models_dir=models))
    # The folder is one model; the weight files inside it are not single-file checkpoints.
    assert [(m.name, m.format) for m in reg.models()] == [("nested-sd15", "diffusers")]


def test_demo_installer(tmp_path, capsys):
    from diffusionapi import demo

    assert demo.main(["--models-dir", str(tmp_path / "m")]) == 0
    assert "noise images" in capsys.readouterr().out
    reg = Registry(make_settings(tmp_path, tmp_path, models_dir=tmp_path / "m"))
    assert [(m.name, m.label, m.family) for m in reg.models()] == [
        ("demo-tiny-sd15", "Demo (tiny random weights, noise images)", "sd15")]


def test_fp16_variant_only_folder_loads(tmp_path):
    import torch

    from diffusionapi.demo import tiny_sd15_pipeline
    from diffusionapi.engine.pipelines import load_pipeline
    from diffusionapi.vocabulary import ModelEntry

    folder = tmp_path / "fp16-only"
    tiny_sd15_pipeline(0).save_pretrained(folder, variant="fp16")
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    loaded = load_pipeline(ModelEntry("fp16-only", "x", folder, "sd15", "diffusers"), torch.device("cpu"), torch.float32)
    assert loaded.pipe.unet is not None
