"""docs/settings.md is generated from Settings (scripts/gen_settings_doc.py) and never drifts from it."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from diffusionapi.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_settings_doc", ROOT / "scripts" / "gen_settings_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_setting_has_a_meaning():
    gen = _generator()
    missing = [f for f, info in Settings.model_fields.items() if not gen.description(f, info)]
    assert missing == [], f"describe these in config.py (Field(description=...)) or in gen_settings_doc.DESCRIPTIONS: {missing}"
    stale = sorted(set(gen.DESCRIPTIONS) - set(Settings.model_fields))
    assert stale == [], f"gen_settings_doc.DESCRIPTIONS describes settings that no longer exist: {stale}"


def test_docs_settings_md_is_what_the_generator_writes():
    gen = _generator()
    assert (ROOT / "docs" / "settings.md").read_text() == gen.render(), \
        "docs/settings.md is out of date: run .venv/bin/python scripts/gen_settings_doc.py"


def test_every_setting_is_in_the_reference_with_its_default():
    text = (ROOT / "docs" / "settings.md").read_text()
    for field in Settings.model_fields:
        assert f"| `DIFFUSIONAPI_{field.upper()}` |" in text
