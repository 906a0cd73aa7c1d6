"""Textual-inversion embedding files: finding, inspecting and loading them.

Layouts understood (as A1111 reads them):

- A1111 ``.pt``: ``{"string_to_param": {"*": tensor[n, width]}, "name": ..., "step": ...}``
- kohya / A1111 ``.safetensors`` for SD 1.5: ``{"emb_params": tensor[n, width]}``
- diffusers ``learned_embeds.bin`` / ``.safetensors``: ``{"<token>": tensor[width]}`` (one vector)
- SDXL: ``{"clip_l": tensor[n, 768], "clip_g": tensor[n, 1280]}`` (one set per text encoder)

``.pt``/``.bin`` files are opened with ``torch.load(weights_only=True)``: a pickle that needs more
than tensors, strings and numbers is refused (and listed with its reason). The family is read from
the layout (``clip_l``/``clip_g``: SDXL; one tensor: SD 1.5); whether the width fits is checked
against the model's text encoder when a job uses it.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
SD15, SDXL = "sd15", "sdxl"


class EmbeddingError(ValueError):
    pass


@dataclass(frozen=True)
class EmbeddingFile:
    name: str            # the file stem: the word that calls it in a prompt
    path: Path
    family: str | None   # "sd15" | "sdxl" | None (unreadable)
    vectors: int         # tokens it stands for
    error: str | None = None


def _tensor_dict(data, path: Path) -> dict:
    """The embedding's tensors: {"": t} for one encoder, {"clip_l": .., "clip_g": ..} for SDXL."""
    import torch

    if not isinstance(data, dict):
        raise EmbeddingError(f"{path.name}: not an embedding (a {type(data).__name__})")
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{path.name}: an embedding file must hold exactly one term")
        return {"": next(iter(params.values()))}
    if "clip_l" in data and "clip_g" in data:
        return {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1 and len(tensors) == len(data):
        return {"": next(iter(tensors.values()))}
    raise EmbeddingError(f"{path.name}: neither an A1111, a diffusers nor an SDXL embedding")


def _as_matrix(t):
    t = t.detach().float()
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[0] == 0:
        raise EmbeddingError(f"an embedding tensor must be [vectors, width], not {list(t.shape)}")
    return t


def read_embedding(path: Path) -> dict:
    """Load a file: {"": [n, width]} or {"clip_l": [n, wl], "clip_g": [n, wg]} as float32 CPU tensors."""
    import torch

    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path), device="cpu")
        else:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except EmbeddingError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt or unsafe files are reported, never fatal
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EmbeddingError(f"{path.name} could not be read: {reason[:200]}") from e
    tensors = {k: _as_matrix(v) for k, v in _tensor_dict(data, path).items()}
    if set(tensors) == {"clip_l", "clip_g"} and tensors["clip_l"].shape[0] != tensors["clip_g"].shape[0]:
        raise EmbeddingError(f"{path.name}: clip_l and clip_g hold different numbers of vectors")
    return tensors


def family_of(tensors: dict) -> str:
    return SDXL if "clip_g" in tensors else SD15


def vector_count(tensors: dict) -> int:
    return int(next(iter(tensors.values())).shape[0])


class EmbeddingLibrary:
    """The embeddings directory: a listing and loaded tensors, each file read once per version
    (path, size, mtime). Thread-safe: the API lists while the worker loads."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[tuple, dict | None, str | None]] = {}

    def _files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        root = self.directory.resolve()
        found = []
        for p in sorted(self.directory.rglob("*")):
            if p.suffix.lower() not in EMBEDDING_SUFFIXES or not p.is_file():
                continue
            try:  # a symlink leading outside the directory is not ours to read
                p.resolve().relative_to(root)
            except ValueError:
                continue
            if p.stat().st_size == 0:
                continue
            found.append(p)
        return found

    def _get(self, path: Path) -> tuple[dict | None, str | None]:
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._cache.get(path)
            if hit and hit[0] == stamp:
                return hit[1], hit[2]
        try:
            tensors, error = read_embedding(path), None
        except EmbeddingError as e:
            tensors, error = None, str(e)
            log.warning("embedding skipped: %s", e)
        with self._lock:
            self._cache[path] = (stamp, tensors, error)
        return tensors, error

    def listing(self) -> list[EmbeddingFile]:
        """Every embedding file; a name used twice (in subfolders) is kept once, the first in path order."""
        out: dict[str, EmbeddingFile] = {}
        for path in self._files():
            name = path.stem
            if name in out:
                continue
            tensors, error = self._get(path)
            out[name] = EmbeddingFile(name, path, family_of(tensors) if tensors else None,
                                      vector_count(tensors) if tensors else 0, error)
        return list(out.values())

    def load(self, entry: EmbeddingFile) -> dict | None:
        return self._get(entry.path)[0]
