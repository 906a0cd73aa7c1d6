"""External image upscalers (ESRGAN, Real-ESRGAN, Compact, SwinIR, ...) through spandrel."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch
from PIL import Image

from ..fileinfo import UpscalerError, load_upscaler_descriptor

log = logging.getLogger(__name__)

__all__ = ["UpscalerCache", "UpscalerError", "upscale_image"]


class UpscalerCache:
    """Loaded upscaler models, one at a time (they are small next to a pipeline)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._key = None
        self._model = None
        self._lock = threading.Lock()

    def is_loaded(self, path: Path) -> bool:
        st = path.stat()
        return self._key == (str(path), st.st_mtime, st.st_size)

    def get(self, path: Path):
        st = path.stat()
        key = (str(path), st.st_mtime, st.st_size)
        with self._lock:
            if self._key != key:
                desc = load_upscaler_descriptor(path)
                self._model = desc.to(self.device).eval()
                self._key = key
            return self._model


def upscale_image(desc, image: Image.Image, target: tuple[int, int], tile: int = 256, overlap: int = 16) -> Image.Image:
    """Run the model over tiles (bounded memory), then resize to exactly ``target`` (w, h)."""
    x = torch.from_numpy(__import__("numpy").asarray(image.convert("RGB"), dtype="float32") / 255.0)
    x = x.permute(2, 0, 1).unsqueeze(0)
    scale = desc.scale
    _, _, h, w = x.shape
    out = torch.zeros(1, 3, h * scale, w * scale)
    weight = torch.zeros_like(out)
    dev, dt = next(desc.model.parameters()).device, next(desc.model.parameters()).dtype
    step = max(tile - overlap, 1)
    with torch.inference_mode():
        for y0 in range(0, max(h - overlap, 1), step):
            for x0 in range(0, max(w - overlap, 1), step):
                y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
                ys, xs = max(y1 - tile, 0), max(x1 - tile, 0)
                patch = x[:, :, ys:y1, xs:x1].to(dev, dt)
                res = desc(patch).float().cpu().clamp(0, 1)
                out[:, :, ys * scale:y1 * scale, xs * scale:x1 * scale] += res
                weight[:, :, ys * scale:y1 * scale, xs * scale:x1 * scale] += 1
    out = (out / weight.clamp(min=1)).squeeze(0).permute(1, 2, 0).mul(255).round().byte().numpy()
    img = Image.fromarray(out)
    if img.size != tuple(target):
        img = img.resize(tuple(target), Image.LANCZOS)
    return img
