"""Compatibility with the seed's ``from diffusionapi.generate import get_model_labels``."""
from __future__ import annotations

from .config import get_settings
from .registry import UnknownName, Registry


def get_model_labels() -> dict[str, str]:
    """{model name: label} for every installed model."""
    return {m.name: m.label for m in Registry(get_settings()).models()}


def get_model_name_from_label(label: str) -> str | None:
    """The model name a label (or name) resolves to, or None."""
    try:
        return Registry(get_settings()).resolve_model(label).name
    except UnknownName:
        return None
