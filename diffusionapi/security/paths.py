"""Paths as the API shows them: relative to their configured directory, under that directory's
role ("models/sub/x.safetensors"), never the server's absolute layout (user names, mount points,
what else lives on the box)."""
from __future__ import annotations

from pathlib import Path


def shown_path(path, root, label: str) -> str:
    try:
        rel = Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except (ValueError, OSError):
        rel = Path(path).name  # outside its directory (a symlink's target): the name only
    return label if rel in ("", ".") else f"{label}/{rel}"
