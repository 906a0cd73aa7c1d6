"""The cluster catalog: what each worker has, published to Redis; API nodes see the union.

A worker publishes its models (name, label, family, format, hash where it has one), LoRAs,
upscalers and embeddings at start and on each refresh. An API node answers the list
endpoints and validates requests against the union of the catalogs of the *live* workers, so
a job for a model no live worker has is a 422 naming the model — it is never queued to wait
for nobody.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import redis

from ....registry import (LATENT_UPSCALE_MODES, LoraEntry, ModelEntry, Registry, UnknownName, UpscalerEntry,
                        display_path)
from ....errors import BackendUnavailable
from ....vocabulary import EmbeddingEntry

log = logging.getLogger(__name__)


def _model_sha256(registry: Registry, m) -> str | None:
    # Computed here, where the files are (an API node has none); cached on disk per file version.
    try:
        from ....engine.hashes import hashes_in, model_sha256

        return model_sha256(Path(m.path), hashes_in(Path(registry.settings.queue_dir)))
    except Exception:  # noqa: BLE001 - a hash is informative; an unreadable file shows up when used
        return None


def catalog_of(registry: Registry, models) -> dict:
    models_out = []
    for m in models:
        sha = _model_sha256(registry, m)
        models_out.append({"name": m.name, "label": m.label, "family": m.family, "format": m.format,
                           "prediction": m.prediction, "ztsnr": m.ztsnr,
                           "path": display_path(m.path), "hash": sha[:10] if sha else None, "sha256": sha,
                           **_parts_of(registry, m)})
    out = {
        "models": models_out,
        "loras": [{"name": e.name, "family": e.family, "path": display_path(e.path)} for e in registry.loras()],
        "upscalers": [{"name": u.name, "path": display_path(u.path)}
                      for u in registry.upscalers() if not u.is_latent],
    }
    components = getattr(registry, "components", None)
    if components is not None:  # text encoders / VAEs for Flux.1 / SD 3.x files (components.py)
        out["modules"] = [{"name": c.name, "kind": c.kind, "families": list(c.families), "width": c.width,
                           "projection": c.projection, "storage": c.storage, "path": display_path(c.path)}
                          for c in components.files()]
        out["t5_tokenizer"] = [{"name": "t5-tokenizer", "path": display_path(t)}
                               for t in [components.t5_tokenizer()] if t is not None]
    embeddings = getattr(registry, "embeddings", None)
    if callable(embeddings):
        try:
            out["embeddings"] = [_plain(e) for e in embeddings()]
        except Exception:  # noqa: BLE001
            out["embeddings"] = []
    return out


def _parts_of(registry: Registry, m) -> dict:
    """For Flux.1 / SD 3.x single files: the component files they need (API nodes choose them at
    submit without the file)."""
    from ....families import spec as family_spec

    if m.format != "single-file" or family_spec(m.family).prediction != "flow":
        return {}
    try:
        return {"parts": registry.model_parts(m).to_json()}
    except (OSError, ValueError):
        return {}


class CatalogComponents:
    """ComponentIndex's interface over the union of the workers' catalogs."""

    def __init__(self, catalog: "CatalogRegistry"):
        self.catalog = catalog

    def files(self, problems: dict[str, str] | None = None):
        from ....components import ComponentFile

        return [ComponentFile(c["name"], Path(c["path"]), c["kind"], tuple(c["families"]), c["width"],
                              c.get("projection", 0), c.get("storage", ""))
                for c in self.catalog.union().get("modules", [])]

    def t5_tokenizer(self) -> Path | None:
        found = self.catalog.union().get("t5_tokenizer", [])
        return Path(found[0]["path"]) if found else None


def _plain(entry) -> dict:
    from dataclasses import asdict, is_dataclass

    d = asdict(entry) if is_dataclass(entry) else dict(entry)
    return {k: (display_path(v) if isinstance(v, Path) else v) for k, v in d.items()}


def merge(catalogs: list[dict]) -> dict:
    """The union, first worker's entry winning per name (names are the identity across hosts)."""
    out: dict[str, dict[str, dict]] = {"models": {}, "loras": {}, "upscalers": {}, "embeddings": {}, "modules": {},
                                       "t5_tokenizer": {}}
    for cat in catalogs:
        for kind, seen in out.items():
            for e in cat.get(kind, []):
                seen.setdefault(e["name"], e)
    return {kind: sorted(v.values(), key=lambda e: e["name"].casefold()) for kind, v in out.items()}


class CatalogRegistry(Registry):
    """The Registry interface over the union of live workers' catalogs (API nodes of a cluster).

    Name resolution (labels, hub-cache short names, close-match suggestions) is the Registry's
    own; only the scans are replaced by the catalog. Paths are the workers' display paths."""

    def __init__(self, settings, state, *, refresh_sec: float = 1.0):
        super().__init__(settings)
        self.state = state
        self.refresh_sec = refresh_sec
        self._union: dict | None = None
        self._at = 0.0
        self._lock = threading.Lock()
        self.components = CatalogComponents(self)

    def model_parts(self, model: ModelEntry):
        from ....components import ModelParts

        entry = next((m for m in self.union()["models"] if m["name"] == model.name), {})
        if "parts" not in entry:
            raise ValueError(f"{model.name}: no worker described the component files it needs")
        return ModelParts.from_json(entry["parts"])

    def union(self) -> dict:
        with self._lock:
            # An empty view is never kept: the first worker to come up is usable at once.
            if not (self._union and self._union["models"]) or time.monotonic() - self._at >= self.refresh_sec:
                try:
                    live = [w["name"] for w in self.state.workers()
                            if w["heartbeat_age"] <= 3 * self.settings.worker_heartbeat_sec]
                    self._union = merge(self.state.catalogs(live))
                except redis.RedisError as e:  # Redis restarting: the last view (or none) until it is back
                    log.warning("cluster catalog unavailable: %s", e)
                    self._union = self._union or merge([])
                self._at = time.monotonic()
            return self._union

    def models(self, problems: dict[str, str] | None = None) -> list[ModelEntry]:
        return [ModelEntry(m["name"], m.get("label") or m["name"], Path(m.get("path") or m["name"]), m["family"],
                           m["format"], m.get("prediction", "epsilon"), bool(m.get("ztsnr", False)))
                for m in self.union()["models"]]

    def sha256_of(self, entry) -> str | None:
        """The model's sha256 as the worker that has it computed it (None if none did)."""
        return next((m.get("sha256") for m in self.union()["models"] if m["name"] == entry.name), None)

    def resolve_model(self, requested: str, **kw) -> ModelEntry:
        if not self.union()["models"]:
            # No live worker at all (all starting or restarting, or their heartbeats not yet seen
            # on a Redis that just failed over): nothing can be told about the name; retry later.
            raise BackendUnavailable("no live worker in the cluster (starting, restarting, or Redis failing "
                                     "over); retry later", retry_after=5)
        try:
            return super().resolve_model(requested, **kw)
        except UnknownName as e:
            msg = str(e)
            if msg.startswith("unknown model"):
                msg = "no live worker has model" + msg[len("unknown model"):]
            raise UnknownName(msg) from None

    def loras(self) -> list[LoraEntry]:
        return [LoraEntry(e["name"], Path(e.get("path") or e["name"]), e.get("family"))
                for e in self.union()["loras"]]

    def upscalers(self, problems: dict[str, str] | None = None) -> list[UpscalerEntry]:
        return [UpscalerEntry(n, None) for n in LATENT_UPSCALE_MODES] + [UpscalerEntry(u["name"], Path(u.get("path") or u["name"])) for u in self.union()["upscalers"]]

    def embeddings(self) -> list[EmbeddingEntry]:
        return [EmbeddingEntry(e["name"], Path(e.get("path") or e["name"]), e.get("family"), e.get("vectors", 1),
                               e.get("error")) for e in self.union()["embeddings"]]
