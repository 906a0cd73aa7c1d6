"""Installed models as A1111 lists them: titles "<file> [<hash10>]", hashes, and name lookup.

A1111 names a checkpoint by its title, its file name or its model name, and clients store
whichever they saw (Open WebUI and SillyTavern the title, Dify the model name). A diffusers or
hub-cache folder has no single file to hash, so its hash is a sha256 over the sorted list of its
weight files' own sha256 digests: stable while the weights are unchanged.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ...engine.hashes import FileHashes
from .protocol import checkpoint_key

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


class Catalog:
    def __init__(self, registry, settings):
        self.registry = registry
        self.settings = settings
        # Its own cache file: the worker's FileHashes writes the engine's.
        self.hashes = FileHashes(Path(settings.queue_dir) / ".sdapi-hashes.json")

    def sha256(self, entry) -> str:
        path = Path(entry.path)
        if path.is_file():
            return self.hashes.sha256(path)
        lines = []
        for f in sorted(path.rglob("*")):
            if f.suffix.lower() in WEIGHT_SUFFIXES and f.is_file():
                lines.append(f"{f.relative_to(path).as_posix()}\t{self.hashes.sha256(f)}\n")
        return hashlib.sha256("".join(lines).encode()).hexdigest()

    def file_name(self, entry) -> str:
        """What A1111 shows before the hash: the path under the models dir for files."""
        path = Path(entry.path)
        if path.is_file():
            try:
                return path.relative_to(Path(self.settings.models_dir)).as_posix()
            except ValueError:
                return path.name
        return entry.name

    def title(self, entry, sha: str | None = None) -> str:
        return f"{self.file_name(entry)} [{(sha or self.sha256(entry))[:10]}]"

    def sd_models(self) -> list[dict]:
        out = []
        for m in self.registry.models():
            sha = self.sha256(m)
            out.append({"title": self.title(m, sha), "model_name": m.name, "hash": sha[:10], "sha256": sha,
                        "filename": str(Path(m.path).resolve()), "config": None,
                        # added: what the files say the model is (diffusionapi/families)
                        "family": m.family, "prediction": m.prediction, "ztsnr": m.ztsnr})
        return out

    def resolve(self, value: str):
        """A checkpoint as any A1111 client names it -> the installed ModelEntry (LookupError if none)."""
        models = self.registry.models()
        wanted = value.strip()
        key = checkpoint_key(wanted)
        for m in models:
            file_stem = checkpoint_key(self.file_name(m))
            if key in (m.name, file_stem) or wanted == m.name:
                return m
        hashed = [m for m in models if len(key) >= 8 and all(c in "0123456789abcdef" for c in key.lower())
                  and self.sha256(m).startswith(key.lower())]
        if len(hashed) == 1:
            return hashed[0]
        try:
            return self.registry.resolve_model(key, models=models)
        except LookupError as e:
            titles = ", ".join(self.title(m) for m in models) or "(none installed)"
            raise LookupError(f"checkpoint {value!r} is not installed; valid choices: {titles}") from e
