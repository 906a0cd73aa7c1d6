"""Per-job step reporting and previews, driven from the sampler's progress callbacks.

The engine wraps each stage's progress callback with :meth:`LiveJob.stage`; after each model
evaluation it learns the stage's fraction done, turns it into a sampler step, tells the
observer, and, when a preview is due, hands the denoiser's latest x0 to the preview sink.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import previews as pv
from .plan import GenerationError, PreviewPlan, StepObserver

if TYPE_CHECKING:
    import torch  # imported by the engine that runs a job; an API node imports this module without it


class TaesdCache:
    """TAESD decoders loaded once per file and device."""

    def __init__(self, device):
        self.device = device
        self._loaded: dict[Path, object] = {}
        self._lock = threading.Lock()

    def get(self, path: Path):
        with self._lock:
            if path not in self._loaded:
                import torch

                dtype = torch.float16 if torch.device(self.device).type == "cuda" else torch.float32
                self._loaded[path] = pv.load_taesd(path, self.device, dtype)
            return self._loaded[path]


class LiveJob:
    def __init__(self, observer: StepObserver | None, preview: PreviewPlan | None, *, family: str,
                 model_name: str | None, vae_approx_dir: Path | None, image_size: tuple[int, int],
                 taesd: TaesdCache | None = None, latent_channels: int = 4,
                 fit_factors: Callable[[], pv.LatentRGB] | None = None):
        self.observer = observer
        self.sink: pv.PreviewSink | None = None
        if observer is not None and preview is not None and preview.every > 0:
            if preview.method == "taesd":
                path = pv.find_taesd(vae_approx_dir, family)
                if path is None or taesd is None:
                    raise GenerationError(check_preview("taesd", family, vae_approx_dir) or "no TAESD decoder")
                try:
                    decoder = taesd.get(path)
                except Exception as e:  # noqa: BLE001 - a corrupt file names itself
                    raise GenerationError(f"the TAESD decoder {path.name} could not be loaded: {e}") from e
                if int(decoder.config.latent_channels) != latent_channels:
                    raise GenerationError(f"the TAESD decoder {path.name} takes {decoder.config.latent_channels} "
                                          f"latent channels; this model's latents have {latent_channels}")

                def to_rgb(z):
                    return pv.taesd_rgb(decoder, z)
            else:
                factors = pv.latent_rgb_for(family, model_name, vae_approx_dir)
                if len(factors.factors) != latent_channels and fit_factors is not None:
                    # No published fit for these latents (16-channel families): fit the model's own VAE.
                    factors = fit_factors()

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
            step = min(steps, int(fraction * steps + 1e-6))
            new = step > last
            if new:  # before ``update``, so the progress it reports carries this step
                last = step
                self.observer.step(phase, step, steps)
            update(fraction)
            if new and self.sink is not None and self.sink.wants(step, steps):
                z = x0()
                if z is not None:  # a batch's preview shows its first image
                    self.sink.offer(z[:1], step, steps, phase)
        return cb

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


def check_preview(method: str, family: str, vae_approx_dir: Path | None) -> str | None:
    """Why ``method`` cannot give previews for a model of ``family`` (None: it can)."""
    if method == "taesd" and pv.find_taesd(vae_approx_dir, family) is None:
        name = pv.FAMILY_TAESD.get(pv.preview_key(family))
        if name is None:  # Flux.2, Qwen-Image: no tiny decoder is wired up for their latents
            return f"no TAESD decoder is supported for this model's family ({family}); use method 'approx'"
        return (f"no TAESD decoder for this model's family ({family}) is installed: put a diffusers "
                f"AutoencoderTiny folder {name}/ or the file {name}_decoder.pth / .safetensors in "
                f"{vae_approx_dir}, or use method 'approx'")
    return None
