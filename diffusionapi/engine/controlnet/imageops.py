"""Image helpers the preprocessors and the annotator networks share (NumPy/OpenCV only)."""
from __future__ import annotations

import numpy as np


class PreprocessorError(ValueError):
    """A module that cannot run here; ``status`` is the HTTP status the API answers."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def hwc3(x: np.ndarray) -> np.ndarray:
    if x.ndim == 2:
        x = x[:, :, None]
    if x.shape[2] == 1:
        return np.concatenate([x] * 3, axis=2)
    if x.shape[2] == 4:
        # transparent pixels count as white (the extension's convention for drawings)
        color, alpha = x[:, :, :3].astype(np.float32), x[:, :, 3:].astype(np.float32) / 255.0
        return (color * alpha + 255.0 * (1 - alpha)).clip(0, 255).astype(np.uint8)
    return x[:, :, :3]


def resize_short_side(img: np.ndarray, resolution: int) -> np.ndarray:
    """Scale so that the shorter side is ``resolution`` (area filter down, cubic up)."""
    import cv2

    h, w = img.shape[:2]
    k = float(resolution) / min(h, w)
    if abs(k - 1.0) < 1e-9:
        return img
    nw, nh = max(1, int(round(w * k))), max(1, int(round(h * k)))
    return cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC)
