"""Per-app state of the `/sdapi` dialect: options, model catalog, auth, and its calls into the
job service (each A1111 request becomes the typed native request a native client would send;
protocol.py translates, this submits)."""
from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

from ...errors import RequestError, ServiceError
from ...jobs.states import PROCESSING
from ...schemas import UpscaleRequest
from ...security.paths import shown_path
from .auth import SdapiAuth
from .catalog import Catalog
from .options import STATIC_OPTIONS, OptionsStore
from .protocol import BUILTIN_UPSCALERS

log = logging.getLogger("diffusionapi.sdapi")


class SdapiState:
    def __init__(self, jobs, settings, registry):
        self.jobs = jobs  # the job service (jobs/service.py)
        self.settings = settings
        self.registry = registry
        self.catalog = Catalog(registry, settings)
        self.options = OptionsStore(Path(settings.queue_dir) / ".sdapi-options.json")
        self.auth = SdapiAuth(getattr(settings, "api_auth", None), settings.api_key)
        self._started: dict[str, float] = {}
        self._interrupted: str | None = None

    def upscale(self, req, data: bytes, caller=None):
        """extra-single-image: (job_id, None) for a queued upscale, or (None, png bytes) for the
        plain resizes ("None", "Lanczos", "Nearest"), done here at once. Raises RequestError."""
        import base64

        from PIL import Image

        from ...imageinput import ImageInputError, open_image

        limit = self.settings.max_hires_pixels  # the largest image the service makes, and takes in
        try:  # decoded within the pixel limit (a small file can promise gigapixels)
            img = open_image(data, "image", limit)
        except ImageInputError as e:
            raise RequestError(e.field, e.message, e.status) from None
        if req.resize_mode == 1:
            size = (req.upscaling_resize_w, req.upscaling_resize_h)
            field = "upscaling_resize_w"
        else:
            size = (max(1, round(img.width * req.upscaling_resize)), max(1, round(img.height * req.upscaling_resize)))
            field = "upscaling_resize"
        if min(size) < 1 or size[0] * size[1] > limit:
            raise RequestError(field, f"the result would be {size[0]}x{size[1]}; at least 1x1 and at most "
                                      f"{limit} pixels")
        if req.upscaler_2 not in ("None", "") and req.extras_upscaler_2_visibility > 0:
            log.warning("sdapi extra-single-image: upscaler_2 is not supported; ignored")
        if req.gfpgan_visibility or req.codeformer_visibility:
            log.warning("sdapi extra-single-image: face restoration is not supported; ignored")
        # A1111's "None" upscaler still resizes to the target, with Lanczos.
        upscaler = "Lanczos" if req.upscaler_1 in ("None", "") else req.upscaler_1
        if upscaler in BUILTIN_UPSCALERS:
            resample = Image.NEAREST if upscaler == "Nearest" else Image.LANCZOS
            out = io.BytesIO()
            img.convert("RGBA" if img.mode in ("RGBA", "LA", "P") else "RGB").resize(size, resample).save(out, "PNG")
            return None, out.getvalue()
        body = {"image": base64.b64encode(data).decode(), "upscaler": upscaler, "fileType": "png"}
        if req.resize_mode == 1:
            body.update(width=size[0], height=size[1])
        else:
            body["scale"] = req.upscaling_resize
        try:
            native = UpscaleRequest.model_validate(body)
        except ValueError as e:
            raise RequestError("upscaler_1", str(e)) from None
        return self.jobs.submit("upscale", native, caller).job_id, None

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
                **STATIC_OPTIONS, "sd_vae": self.options.sd_vae or "Automatic",
                "forge_additional_modules": self.options.modules}

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
        # The VAE / component files later /sdapi jobs use (checked when a job names them).
        if isinstance(data.get("sd_vae"), str):
            changes["sd_vae"] = data["sd_vae"].strip() or "Automatic"
        modules = data.get("forge_additional_modules")
        if isinstance(modules, list) and all(isinstance(m, str) for m in modules):
            changes["modules"] = modules
        ignored = sorted(set(data) - {"sd_model_checkpoint", "CLIP_stop_at_last_layers", "sd_vae",
                                      "forge_additional_modules"})
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
        """The installed embeddings in A1111's shape: "loaded" are those for the current model's
        family, "skipped" the others."""
        current = self.default_model()
        out: dict = {"loaded": {}, "skipped": {}}
        for e in self.registry.embeddings():
            item = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                    "shape": EMBEDDING_WIDTH.get(e.family, 768), "vectors": int(e.vectors or 1)}
            fits = current is None or e.family in (None, current.family)
            out["loaded" if fits else "skipped"][e.name] = item
        return out

    # ------------------------------------------------------------------ progress
    def progress(self, skip_current_image: bool, caller=None) -> dict:
        """A1111's one current job: the running job when it is the caller's (a user's job_count
        still counts every key's waiting jobs: a count, no ids)."""
        jobs = self.jobs
        current = jobs.current_job(caller)
        pending = jobs.pending_count()
        state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                 "job_count": pending, "job_timestamp": "0", "job_no": 0,
                 "sampling_step": 0, "sampling_steps": 0}
        st = jobs.status(current) if current else None
        if st is None or st.state != PROCESSING:
            self._started.clear()
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                    "textinfo": None}
        now = time.time()
        started = self._started.setdefault(current, now)
        for old in [j for j in self._started if j != current]:
            self._started.pop(old, None)
        fraction = min(max(float(st.progress or 0.0) / 100.0, 0.0), 1.0)
        elapsed = now - started
        eta = elapsed / fraction - elapsed if fraction > 0.01 else 0.0
        state.update(job=current, interrupted=self._interrupted == current,
                     job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(started)),
                     sampling_step=int(getattr(st, "step", 0) or 0), sampling_steps=int(getattr(st, "total", 0) or 0))
        preview = None if skip_current_image else st.preview
        return {"progress": round(fraction, 4), "eta_relative": round(eta, 3), "state": state,
                "current_image": preview, "textinfo": st.current_phase}

    def interrupt(self, caller=None) -> None:
        current = self.jobs.current_job(caller)  # a user interrupts only its own job
        if current:
            self._interrupted = current
            try:
                self.jobs.cancel(current, caller)
            except ServiceError:  # it ended meanwhile
                pass


# A1111's EmbeddingItem.shape: the width of one vector (SDXL: CLIP-L + CLIP-G).
EMBEDDING_WIDTH = {"sd15": 768, "sdxl": 2048, "sdxl-refiner": 1280}


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
