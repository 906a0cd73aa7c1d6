"""Per-app state of the `/sdapi` adapter: options, model catalog, auth, and the calls into the
native API (each A1111 request becomes exactly the native request a native client would send)."""
from __future__ import annotations

import inspect
import io
import json
import logging
import time
from pathlib import Path

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.routing import Route

from ...security.paths import shown_path
from .auth import SdapiAuth
from .catalog import Catalog
from .options import STATIC_OPTIONS, OptionsStore
from .protocol import BUILTIN_UPSCALERS

log = logging.getLogger("diffusionapi.sdapi")


def _get(obj, name, default=None):
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


class SdapiState:
    def __init__(self, app, settings, registry):
        self.app = app
        self.settings = settings
        self.registry = registry
        self.catalog = Catalog(registry, settings)
        self.options = OptionsStore(Path(settings.queue_dir) / ".sdapi-options.json")
        self.auth = SdapiAuth(getattr(settings, "api_auth", None), settings.api_key)
        self._started: dict[str, float] = {}
        self._interrupted: str | None = None

    @property
    def jobs(self):
        return self.app.state.jobs

    # ------------------------------------------------------------------ native endpoints
    def _native(self, path: str, method: str = "POST"):
        for route in _walk(self.app.routes):
            if isinstance(route, Route) and route.path == path and method in (route.methods or ()):
                return route.endpoint
        return None

    def native_model(self, kind: str) -> type[BaseModel] | None:
        endpoint = self._native(f"/{kind}")
        if endpoint is None:
            return None
        for ann in _hints(endpoint).values():
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                return ann
        return None

    async def call_native(self, kind: str, body: dict, request):
        """POST /<kind> in process: (job_id, None) or (None, an error response)."""
        from .routes import _error

        endpoint = self._native(f"/{kind}")
        model = self.native_model(kind)
        if endpoint is None or model is None:
            return None, self._missing(kind)
        try:
            parsed = model.model_validate(body)
        except ValidationError as e:
            return None, _error(422, "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
                                               for err in e.errors()))
        kwargs = {}
        hints = _hints(endpoint)
        for name in inspect.signature(endpoint).parameters:
            if hints.get(name) is model:
                kwargs[name] = parsed
            elif hints.get(name) is Request or name == "request":
                kwargs[name] = request
        if inspect.iscoroutinefunction(endpoint):
            resp = await endpoint(**kwargs)
        else:
            resp = await run_in_threadpool(endpoint, **kwargs)
        if isinstance(resp, JSONResponse):
            if resp.status_code >= 400:
                data = json.loads(resp.body)
                return None, _error(resp.status_code, data.get("error") or str(data))
            resp = json.loads(resp.body)
        return _get(resp, "job_id"), None

    @staticmethod
    def _missing(kind: str):
        from .routes import _error

        return _error(501, f"this server has no native /{kind} endpoint yet", kind="NotImplemented")

    async def submit(self, kind: str, body: dict, request):
        return await self.call_native(kind, body, request)

    async def upscale(self, req, data: bytes, request):
        """extra-single-image: (job_id, None, None), (None, error, None) or (None, None, png bytes)."""
        from PIL import Image

        img = Image.open(io.BytesIO(data))
        if req.resize_mode == 1:
            size = (req.upscaling_resize_w, req.upscaling_resize_h)
        else:
            size = (max(1, round(img.width * req.upscaling_resize)), max(1, round(img.height * req.upscaling_resize)))
        if req.upscaler_2 not in ("None", "") and req.extras_upscaler_2_visibility > 0:
            log.warning("sdapi extra-single-image: upscaler_2 is not supported; ignored")
        if req.gfpgan_visibility or req.codeformer_visibility:
            log.warning("sdapi extra-single-image: face restoration is not supported; ignored")
        # A1111's "None" upscaler still resizes to the target, with Lanczos.
        upscaler = "Lanczos" if req.upscaler_1 in ("None", "") else req.upscaler_1
        if self.native_model("upscale") is None:
            if upscaler not in BUILTIN_UPSCALERS:
                return None, self._missing("upscale"), None
            # No native /upscale on this server yet: the plain resizes are done here.
            resample = Image.NEAREST if upscaler == "Nearest" else Image.LANCZOS
            out = io.BytesIO()
            img.convert("RGBA" if img.mode in ("RGBA", "LA", "P") else "RGB").resize(size, resample).save(out, "PNG")
            return None, None, out.getvalue()
        import base64

        body = {"image": base64.b64encode(data).decode(), "upscaler": upscaler, "fileType": "png"}
        if req.resize_mode == 1:
            body.update(width=size[0], height=size[1])
        else:
            body["scale"] = req.upscaling_resize
        job_id, error = await self.call_native("upscale", body, request)
        return job_id, error, None

    # ------------------------------------------------------------------ models and options
    def chosen_model(self) -> str | None:
        """The model POST /options chose, while it is still installed (else the service default)."""
        name = self.options.model
        return name if name and any(m.name == name for m in self.registry.models()) else None

    def default_model(self):
        models = self.registry.models()
        if self.options.model:
            for m in models:
                if m.name == self.options.model:
                    return m
        try:
            return self.registry.resolve_model(self.settings.default_model, models=models)
        except LookupError:
            bases = [m for m in models if m.family != "sdxl-refiner"]
            return bases[0] if bases else None

    def get_options(self) -> dict:
        current = self.default_model()
        sha = self.catalog.sha256(current) if current else None
        return {"sd_model_checkpoint": self.catalog.title(current, sha) if current else None,
                "sd_checkpoint_hash": sha, "CLIP_stop_at_last_layers": self.options.clip_skip or 1,
                **STATIC_OPTIONS}

    def set_options(self, data: dict) -> None:
        changes = {}
        checkpoint = data.get("sd_model_checkpoint")
        if checkpoint:
            changes["model"] = self.catalog.resolve(str(checkpoint)).name
        clip = data.get("CLIP_stop_at_last_layers")
        if clip not in (None, ""):
            try:
                value = max(1, int(float(clip)))
            except (TypeError, ValueError, OverflowError):
                value = None
            if value is not None and value <= 12:  # A1111's range; anything else would fail every job
                changes["clip_skip"] = value
            # else: A1111 would store it; an unusable value changes nothing here
        ignored = sorted(set(data) - {"sd_model_checkpoint", "CLIP_stop_at_last_layers"})
        if ignored:
            log.debug("sdapi options: ignoring %s", ", ".join(ignored))
        if changes:
            self.options.update(**changes)

    def loras(self) -> list[dict]:
        out = []
        for e in self.registry.loras():
            out.append({"name": e.name, "alias": e.name, "path": shown_path(e.path, self.settings.loras_dir, "loras"),
                        "metadata": _safetensors_metadata(Path(e.path))})
        return out

    def embeddings(self) -> dict:
        """The native GET /embeddings (when the server has one) in A1111's shape: "loaded" are
        those for the current model's family, "skipped" the others."""
        endpoint = self._native("/embeddings", "GET")
        if endpoint is None:
            return {"loaded": {}, "skipped": {}}
        listing = _call_with_request(endpoint, self.app)
        if isinstance(listing, JSONResponse):
            listing = json.loads(listing.body)
        current = self.default_model()
        out: dict = {"loaded": {}, "skipped": {}}
        for e in _get(listing, "embeddings", None) or []:
            family = _get(e, "family")
            item = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                    "shape": EMBEDDING_WIDTH.get(family, 768), "vectors": int(_get(e, "vectors", 1) or 1)}
            fits = current is None or family in (None, current.family)
            out["loaded" if fits else "skipped"][_get(e, "name")] = item
        return out

    # ------------------------------------------------------------------ progress
    def progress(self, skip_current_image: bool) -> dict:
        jobs = self.jobs
        current = jobs.current_job()
        pending = [e for e in jobs.listing() if _get(e, "state") in ("queued", "processing")]
        state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                 "job_count": len(pending), "job_timestamp": "0", "job_no": 0,
                 "sampling_step": 0, "sampling_steps": 0}
        st = jobs.status(current) if current else None
        if st is None or _get(st, "state") != "processing":
            self._started.clear()
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                    "textinfo": None}
        now = time.time()
        started = self._started.setdefault(current, now)
        for old in [j for j in self._started if j != current]:
            self._started.pop(old, None)
        fraction = min(max(float(_get(st, "progress", 0.0) or 0.0) / 100.0, 0.0), 1.0)
        elapsed = now - started
        eta = elapsed / fraction - elapsed if fraction > 0.01 else 0.0
        state.update(job=current, interrupted=self._interrupted == current,
                     job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(started)),
                     sampling_step=int(_get(st, "step", 0) or 0), sampling_steps=int(_get(st, "total", 0) or 0))
        preview = None if skip_current_image else _get(st, "preview")
        return {"progress": round(fraction, 4), "eta_relative": round(eta, 3), "state": state,
                "current_image": preview, "textinfo": _get(st, "current_phase")}

    def interrupt(self) -> None:
        current = self.jobs.current_job()
        if current:
            self._interrupted = current
            self.jobs.cancel(current)


# A1111's EmbeddingItem.shape: the width of one vector (SDXL: CLIP-L + CLIP-G).
EMBEDDING_WIDTH = {"sd15": 768, "sdxl": 2048, "sdxl-refiner": 1280}


def _call_with_request(endpoint, app):
    """Call a plain native GET endpoint in process, giving it a minimal Request for app.state."""
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b"", "app": app}
    hints = _hints(endpoint)
    kwargs = {name: Request(scope) for name in inspect.signature(endpoint).parameters
              if hints.get(name) is Request or name == "request"}
    if inspect.iscoroutinefunction(endpoint):  # we run in a worker thread (run_in_threadpool)
        import functools

        import anyio.from_thread

        return anyio.from_thread.run(functools.partial(endpoint, **kwargs))
    return endpoint(**kwargs)


def _walk(routes):
    """Every route, also inside included routers (FastAPI >= 0.16x keeps them nested)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _walk(inner.routes)
        else:
            yield route


def _hints(fn) -> dict:
    import typing

    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: no body model found
        return {}


def _safetensors_metadata(path: Path) -> dict:
    from ...fileinfo import read_safetensors_header

    try:
        meta = read_safetensors_header(path).get("__metadata__") or {}
    except (OSError, ValueError):
        return {}
    out = {}
    for k, v in meta.items():
        try:  # kohya stores JSON documents as strings; A1111 parses them
            out[k] = json.loads(v) if isinstance(v, str) and v[:1] in "{[" else v
        except ValueError:
            out[k] = v
    return out
