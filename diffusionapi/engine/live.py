"""Per-job step reporting and previews, driven from the sampler's progress callbacks.

The engine wraps each stage's progress callback with :meth:`LiveJob.stage`; after each model
evaluation it learns the stage's fraction done, turns it into a sampler step, tells the
observer, and, when a preview is due, hands the denoiser's latest x0 to the preview sink.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from . import previews as pv


class StepObserver(Protocol):
    """What a job's runner learns while sampling (the worker publishes it)."""

    def step(self, phase: str, step: int, total: int) -> None: ...

    def preview(self, jpeg: bytes, step: int, total: int) -> None: ...


@dataclass(frozen=True)
class PreviewPlan:
    method: str = "approx"   # "approx" | "taesd"
    every: int = 1           # sampler steps between previews


class TaesdCache:
    """TAESD decoders loaded once per file and device."""

    def __init__(self, device):
        self.device = device
        self._loaded: dict[Path, object] = {}
        self._lock = threading.Lock()

    def get(self, path: Path):
        with self._lock:
            if path not in self._loaded:
                dtype = torch.float16 if torch.device(self.device).type == "cuda" else torch.float32
                self._loaded[path] = pv.load_taesd(path, self.device, dtype)
            return self._loaded[path]


def x0_from_eps(x_vp: torch.Tensor, out: torch.Tensor, sigma: float, vpred: bool) -> torch.Tensor:
    """The denoised estimate from a diffusers-style step (VP-scaled x, eps or v output, VE sigma)."""
    scale = (1 + sigma * sigma) ** 0.5
    if vpred:
        return (x_vp - out * sigma) / scale
    return x_vp * scale - out * sigma


class LiveJob:
    def __init__(self, observer: StepObserver | None, preview: PreviewPlan | None, *, family: str,
                 model_name: str | None, vae_approx_dir: Path | None, image_size: tuple[int, int],
                 taesd: TaesdCache | None = None):
        self.observer = observer
        self.sink: pv.PreviewSink | None = None
        if observer is not None and preview is not None and preview.every > 0:
            if preview.method == "taesd":
                path = pv.find_taesd(vae_approx_dir, family)
                if path is None or taesd is None:
                    raise FileNotFoundError(f"no TAESD decoder for {family} in {vae_approx_dir}")
                decoder = taesd.get(path)

                def to_rgb(z):
                    return pv.taesd_rgb(decoder, z)
            else:
                factors = pv.latent_rgb_for(family, model_name, vae_approx_dir)

                def to_rgb(z):
                    return pv.approx_rgb(z, factors)
            size = pv.preview_size(*image_size)
            self.sink = pv.PreviewSink(preview.method, preview.every, to_rgb, size,
                                       lambda p: observer.preview(p.jpeg, p.step, p.total))

    def stage(self, phase: str, steps: int, update: Callable[[float], None],
              x0: Callable[[], torch.Tensor | None]) -> Callable[[float], None]:
        """Wrap a stage's progress callback; ``x0()`` gives the denoiser's latest estimate."""
        if self.observer is None:
            return update
        last = 0

        def cb(fraction: float) -> None:
            nonlocal last
            update(fraction)
            step = min(steps, int(fraction * steps + 1e-6))
            if step <= last:
                return
            last = step
            self.observer.step(phase, step, steps)
            if self.sink is not None and self.sink.wants(step, steps):
                z = x0()
                if z is not None:
                    self.sink.offer(z, step, steps, phase)
        return cb

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
