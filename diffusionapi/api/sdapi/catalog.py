"""Installed models as A1111 lists them: titles "<file> [<hash10>]", hashes, and name lookup.

A1111 names a checkpoint by its title, its file name or its model name, and clients store
whichever they saw (Open WebUI and SillyTavern the title, Dify the model name). Hashes:
engine.hashes.model_sha256 (a cluster's API node takes the ones its workers computed).
"""
from __future__ import annotations

from pathlib import Path

from ...engine.hashes import hashes_in, model_sha256
from ...security.paths import shown_path
from .protocol import checkpoint_key


class Catalog:
    def __init__(self, registry, settings):
        self.registry = registry
        self.settings = settings
        self.hashes = hashes_in(Path(settings.queue_dir))  # the engine's digests: each file hashed once

    def sha256(self, entry) -> str | None:
        """None when unknown (never the hash of nothing)."""
        known = getattr(self.registry, "sha256_of", None)  # a cluster's catalog: the workers' hashes
        if known is not None:
            return known(entry)
        return model_sha256(Path(entry.path), self.hashes)

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
        sha = sha or self.sha256(entry)
        return f"{self.file_name(entry)} [{sha[:10]}]" if sha else self.file_name(entry)

    def sd_models(self) -> list[dict]:
        out = []
        for m in self.registry.models():
            sha = self.sha256(m)
            out.append({"title": self.title(m, sha), "model_name": m.name, "hash": sha[:10] if sha else None,
                        "sha256": sha,
                        "filename": shown_path(m.path, self.settings.models_dir, "models"), "config": None,
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
                  and (self.sha256(m) or "").startswith(key.lower())]
        if len(hashed) == 1:
            return hashed[0]
        try:
            return self.registry.resolve_model(key, models=models)
        except LookupError as e:
            titles = ", ".join(self.title(m) for m in models) or "(none installed)"
            raise LookupError(f"checkpoint {value!r} is not installed; valid choices: {titles}") from e
