"""`/sdapi/v1/options`: the few settings that change what later `/sdapi` jobs do, kept on disk.

A1111 holds one loaded checkpoint for everyone and clients switch it with POST /options; here
the choice is the model that `/sdapi` jobs without `override_settings.sd_model_checkpoint` use
(native requests keep naming their own). Clients post the whole GET dict back (Open WebUI), so
keys that are unknown or read-only here are accepted and ignored.
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from ...files import write_atomic
from .protocol import PREVIEW_EVERY_N_STEPS

log = logging.getLogger("diffusionapi.sdapi")

# Read-only values A1111 clients look for (SillyTavern detects Forge by a "forge_preset" key,
# so there is none).
STATIC_OPTIONS = {
    "sd_vae": "Automatic",
    "sd_lora": "None",
    "samples_format": "png",
    "save_images_add_number": True,
    "enable_pnginfo": True,
    "live_previews_enable": True,
    "show_progress_every_n_steps": PREVIEW_EVERY_N_STEPS,
    "eta_noise_seed_delta": 0,
    "sd_checkpoint_cache": 0,
    "hires_fix_refiner_pass": "second pass",
}


class OptionsStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._data: dict = {}
        try:
            loaded = json.loads(self.path.read_text())
            if isinstance(loaded, dict):
                self._data = loaded
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            log.warning("sdapi options %s unreadable (%s); using defaults", self.path, e)

    @property
    def model(self) -> str | None:
        return self._data.get("model")

    @property
    def clip_skip(self) -> int | None:
        return self._data.get("clip_skip")

    @property
    def sd_vae(self) -> str | None:
        return self._data.get("sd_vae")

    @property
    def modules(self) -> list[str]:
        return list(self._data.get("modules") or [])

    def update(self, **values) -> None:
        with self._lock:
            self._data.update({k: v for k, v in values.items()})
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(self._data).encode(), fsync=True)
