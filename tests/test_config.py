"""Settings: one object, read from DIFFUSIONAPI_* variables, with the documented defaults."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from diffusionapi.config import Settings


def test_defaults_are_the_documented_ones(monkeypatch):
    for k in list(__import__("os").environ):
        if k.startswith("DIFFUSIONAPI_"):
            monkeypatch.delenv(k)
    s = Settings()
    assert s.models_dir == Path("stable_diffusion/models") and s.loras_dir == Path("stable_diffusion/loras")
    assert s.upscalers_dir == Path("stable_diffusion/upscalers") and s.outputs_dir == Path("outputs")
    assert s.queue_dir == Path("queue") and s.model_labels == Path("stable_diffusion/model_labels.json")
    assert s.device == "auto" and s.api_key is None and s.cors_origins == []
    reference = (Path(__file__).resolve().parents[1] / "docs" / "settings.md").read_text()
    for name in Settings.model_fields:  # every setting is in the reference (tests/test_settings_doc.py: exactly)
        assert f"`DIFFUSIONAPI_{name.upper()}`" in reference, name


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("DIFFUSIONAPI_MAX_STEPS", "12")
    monkeypatch.setenv("DIFFUSIONAPI_CORS_ORIGINS", '["https://a.example"]')
    monkeypatch.setenv("DIFFUSIONAPI_CPU_OFFLOAD", "true")
    s = Settings()
    assert s.max_steps == 12 and s.cors_origins == ["https://a.example"] and s.cpu_offload is True
    monkeypatch.setenv("DIFFUSIONAPI_MAX_STEPS", "0")
    with pytest.raises(ValidationError):
        Settings()
