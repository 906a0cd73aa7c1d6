"""One job on the GPU: pipeline cache -> sampler -> LoRAs -> base / refiner -> hires -> image."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from ..registry import LATENT_UPSCALE_MODES
from ..resolve import JobSpec, hires_total_steps
from .hashes import FileHashes
from .loras import LoraManager, lora_hashes_infotext
from .pipelines import LoadedModel, PipelineCache, free_memory, pick_device
from .sampling import Denoiser, JobCancelled, NoiseFactory, encode, img2img_tail, make_plan
from .upscalers import UpscalerCache, upscale_image

log = logging.getLogger(__name__)

Report = Callable[[str, float], None]


class GenerationError(RuntimeError):
    """A job failed for a reason the user can act on; the message says which."""


@dataclass
class Generated:
    image: Image.Image
    params: dict  # infotext key/values after the prompt lines
    load_time_sec: float = 0.0  # time spent loading models for this job (0: all were resident)


class Progress:
    """Maps a stage's 0..1 onto its share of the job; never goes backwards, stays < 100."""

    def __init__(self, report: Report):
        self.report = report
        self.value = 0.0

    def stage(self, phase: str, lo: float, hi: float):
        def update(fraction: float) -> None:
            v = min(lo + (hi - lo) * max(0.0, min(1.0, fraction)), 99.0)
            if v >= self.value:
                self.value = v
                self.report(phase, v)
        update(0.0)
        return update

    def phase(self, phase: str) -> None:
        self.report(phase, self.value)


class Engine:
    def __init__(self, settings):
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        # Progress bars on a server's stderr are noise; our progress is the job record.
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
        # transformers' "LOAD REPORT" calls an earlier LoRA's weights "MISSING" each time another
        # adapter loads (they are intact: tests/test_loras.py checks); keep such noise out of logs.
        tlog.set_verbosity_error()
        self.settings = settings
        self.device = pick_device(settings.device)
        self.cache = PipelineCache(self.device, settings.pipeline_cache_size, cpu_offload=settings.cpu_offload,
                                   channels_last=settings.channels_last, compile_unet=settings.compile_unet)
        self.loras = LoraManager(settings.lora_cache_size)
        self.hashes = FileHashes(Path(settings.queue_dir) / ".file-hashes.json")
        self.upscalers = UpscalerCache(self.device)

    # ------------------------------------------------------------------ entry point
    @torch.inference_mode()
    def generate(self, spec: JobSpec, report: Report, cancelled: Callable[[], bool]) -> Generated:
        try:
            return self._generate(spec, report, cancelled)
        except (JobCancelled, GenerationError):
            raise
        except torch.cuda.OutOfMemoryError as e:
            free_memory()
            raise GenerationError("out of GPU memory: try a smaller size, fewer steps or a lower hires scale") from e
        except MemoryError as e:
            free_memory()
            raise GenerationError("out of memory: try a smaller size, fewer steps or a lower hires scale") from e

    def _generate(self, spec: JobSpec, report: Report, cancelled: Callable[[], bool]) -> Generated:
        req = spec.request
        progress = Progress(report)

        def check() -> None:
            if cancelled():
                raise JobCancelled()

        t_load = time.perf_counter()
        hires = spec.hires
        first_hi = 50.0 if hires else 100.0
        first_phase = "initial generation" if hires else "generation"
        if self.cache.is_loaded(spec.model.name) and (spec.refiner is None or self.cache.is_loaded(spec.refiner.name)):
            progress.phase(first_phase)
        needed = (spec.model.name,) + ((spec.refiner.name,) if spec.refiner else ())
        base = self._load(spec.model, progress, keep=needed)
        refiner = None
        if spec.refiner is not None:
            refiner = self._load(spec.refiner, progress, keep=needed, share_from=base)
        load_time = time.perf_counter() - t_load
        self.loras.apply(base, spec.loras)
        check()

        generator = torch.Generator("cpu").manual_seed(spec.seed)
        noise = NoiseFactory(generator, spec.seed)

        plan = make_plan(base, spec.sampler, req.steps)
        shape = (1, base.pipe.unet.config.in_channels, spec.height // 8, spec.width // 8)
        x = noise.initial(shape, self.device) * plan.start_sigma
        cond = encode(base, req.prompt, req.negative_prompt, spec.width, spec.height)
        den = Denoiser(base, cond, req.cfg_scale, check)
        if refiner is None:
            x = plan.run(den, x, noise, progress.stage(first_phase, 0.0, first_hi))
        else:
            k = int(round(req.steps * req.refiner_switch_at))
            p_base, p_ref = plan.split(k)
            share = first_hi * k / req.steps
            x = p_base.run(den, x, noise, progress.stage(first_phase, 0.0, share))
            rcond = encode(refiner, req.prompt, req.negative_prompt, spec.width, spec.height)
            rden = Denoiser(refiner, rcond, req.cfg_scale, check)
            x = p_ref.run(rden, x, noise, progress.stage("refining", share, first_hi))
        latents = x

        params_hires = {}
        if hires:
            progress.phase("upscaling")
            latents = self._upscale(spec, base, latents)
            check()
            total = hires_total_steps(hires.steps, hires.denoising_strength)
            plan2 = img2img_tail(make_plan(base, spec.sampler, total), hires.steps)
            cond2 = encode(base, req.prompt, req.negative_prompt, spec.final_width, spec.final_height)
            den2 = Denoiser(base, cond2, req.cfg_scale, check)
            x = latents + noise.initial(latents.shape, self.device) * plan2.start_sigma
            latents = plan2.run(den2, x, noise, progress.stage("upscaling", first_hi, 100.0))
            params_hires = {"Denoising strength": hires.denoising_strength, "Hires upscale": hires.scale,
                            "Hires steps": hires.steps, "Hires upscaler": spec.upscaler.name}
        check()
        image = self._decode(base, latents, spec.final_width, spec.final_height)
        params = {
            "Steps": req.steps, "Sampler": spec.sampler.infotext_sampler,
            "Schedule type": spec.sampler.infotext_schedule, "CFG scale": req.cfg_scale, "Seed": spec.seed,
            "Size": f"{spec.width}x{spec.height}",
            # A1111's short hash of a checkpoint file (sites link images to models by it).
            "Model hash": self.hashes.sha256(spec.model.path)[:10] if spec.model.format == "single-file" else None,
            "Model": spec.model.name,
            **params_hires,
        }
        if spec.refiner:
            params.update({"Refiner": spec.refiner.name, "Refiner switch at": req.refiner_switch_at})
        hashes = lora_hashes_infotext(spec.loras, self.hashes)
        if hashes:
            params["Lora hashes"] = hashes
        return Generated(image, params, round(load_time, 3))

    # ------------------------------------------------------------------ parts
    def _load(self, entry, progress: Progress, *, keep, share_from=None) -> LoadedModel:
        if not self.cache.is_loaded(entry.name):
            progress.phase("loading model")
        try:
            return self.cache.get(entry, keep=keep, share_from=share_from)
        except (torch.cuda.OutOfMemoryError, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt file must not look like a server fault
            free_memory()
            raise GenerationError(f"model {entry.name!r} could not be loaded from {entry.path.name}: "
                                  f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e

    @contextmanager
    def _vae_for(self, loaded: LoadedModel, width: int, height: int):
        """The VAE, tiled above the size threshold and in fp32 when its config asks for it
        (the SDXL VAE overflows in fp16), back as it was afterwards."""
        vae = loaded.pipe.vae
        if width * height > self.settings.vae_tiling_pixels:
            vae.enable_tiling()
        else:
            vae.disable_tiling()
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        try:
            yield vae
        finally:
            if upcast:
                vae.to(torch.float16)

    def _decode(self, loaded: LoadedModel, latents: torch.Tensor, width: int, height: int) -> Image.Image:
        with self._vae_for(loaded, width, height) as vae:
            z = latents.to(vae.dtype) / vae.config.scaling_factor
            if getattr(vae.config, "shift_factor", None):
                z = z + vae.config.shift_factor
            img = vae.decode(z, return_dict=False)[0]
        if not torch.isfinite(img).all():
            raise GenerationError("the VAE produced NaN values (an fp16 overflow); set an fp16-fix VAE "
                                  "or run this model in fp32")
        arr = ((img[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(arr)

    def _encode(self, loaded: LoadedModel, image: Image.Image) -> torch.Tensor:
        import numpy as np

        with self._vae_for(loaded, *image.size) as vae:
            t = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1)
            t = t.permute(2, 0, 1).unsqueeze(0).to(self.device, vae.dtype)
            z = vae.encode(t, return_dict=False)[0].mode()
            if getattr(vae.config, "shift_factor", None):
                z = z - vae.config.shift_factor
            return (z * vae.config.scaling_factor).float()

    def _upscale(self, spec: JobSpec, base: LoadedModel, latents: torch.Tensor) -> torch.Tensor:
        size = (spec.final_height // 8, spec.final_width // 8)
        if spec.upscaler.is_latent:
            mode, antialias = LATENT_UPSCALE_MODES[spec.upscaler.name]
            kwargs = {"antialias": antialias} if mode in ("bilinear", "bicubic") else {}
            if mode in ("bilinear", "bicubic"):
                kwargs["align_corners"] = False
            return torch.nn.functional.interpolate(latents.float(), size=size, mode=mode, **kwargs)
        image = self._decode(base, latents, spec.width, spec.height)
        from .upscalers import UpscalerError

        try:
            model = self.upscalers.get(spec.upscaler.path)
            big = upscale_image(model, image, (spec.final_width, spec.final_height))
        except UpscalerError as e:
            raise GenerationError(str(e)) from e
        except Exception as e:  # noqa: BLE001
            raise GenerationError(f"upscaler {spec.upscaler.path.name!r} failed: {e}") from e
        return self._encode(base, big)
