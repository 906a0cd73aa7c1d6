"""One job on the GPU: pipeline cache -> sampler -> LoRAs -> base / refiner -> hires -> image."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from PIL import Image

from ..vocabulary import LATENT_UPSCALE_MODES, SD15, SDXL, ModelFormat
from . import fastmode
from .fastmode import FastMode
from .hashes import FileHashes
from .loras import LoraManager, lora_hashes_infotext
from .pipelines import LoadedModel, PipelineCache, free_memory, pick_device
from .plan import (Cancelled, GeneratedImage, GenerationError, GenerationPlan, GenerationResult, JobCancelled, Report,
                   hires_total_steps)
from .conditioning import PromptEncoder, encoder_slots, evaluations_per_step, ti_hashes_infotext, usable_embeddings
from .embeddings import EmbeddingTensors
from .prompts import extract_extra_networks
from .sampling import CFGDenoiser, NoiseFactory, encode, img2img_tail, make_schedule
from .upscalers import UpscalerCache, UpscalerError, upscale_image

log = logging.getLogger(__name__)

__all__ = ["Engine", "GenerationError", "JobCancelled"]


class JobText:
    """A job's prompts as the text encoders see them (LoRA tags removed), and what encoding found."""

    def __init__(self, plan: GenerationPlan, lora_key: tuple):
        self.prompt = extract_extra_networks(plan.prompt)[0]
        self.negative = plan.negative_prompt
        self.clip_skip = plan.clip_skip
        self.steps = plan.steps
        self.evals_per_step = evaluations_per_step(plan.sampler.spec.algorithm)
        self.embeddings = plan.embeddings
        self.lora_key = lora_key
        self.used_embeddings: dict[str, str] = {}
        self.warnings: list[str] = []


class StageProgress:
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
    """The diffusers engine (implements ``plan.Engine``); one per worker, used by one thread."""

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
        self.fast = FastMode.from_settings(settings)
        self.cache = PipelineCache(self.device, settings.pipeline_cache_size, cpu_offload=settings.cpu_offload,
                                   fast=self.fast)
        self.loras = LoraManager(settings.lora_cache_size)
        self.hashes = FileHashes(Path(settings.queue_dir) / ".file-hashes.json")
        self.upscalers = UpscalerCache(self.device)
        self.prompt_encoder = PromptEncoder(settings.conditioning_cache_size)
        self.embedding_tensors = EmbeddingTensors()
        self.batches: list[int] = []  # sizes of the UNet batches of several jobs (tests, logs)

    # ------------------------------------------------------------------ entry point
    @torch.inference_mode()
    def generate(self, plan: GenerationPlan, report: Report, cancelled: Cancelled) -> GenerationResult:
        try:
            return self._generate(plan, report, cancelled)
        except (JobCancelled, GenerationError):
            raise
        except torch.cuda.OutOfMemoryError as e:
            free_memory()
            raise GenerationError("out of GPU memory: try a smaller size, fewer steps or a lower hires scale") from e
        except MemoryError as e:
            free_memory()
            raise GenerationError("out of memory: try a smaller size, fewer steps or a lower hires scale") from e

    def _generate(self, plan: GenerationPlan, report: Report, cancelled: Cancelled) -> GenerationResult:
        progress = StageProgress(report)

        def check() -> None:
            if cancelled():
                raise JobCancelled()

        t_load = time.perf_counter()
        hires = plan.hires
        first_hi = 50.0 if hires else 100.0
        first_phase = "initial generation" if hires else "generation"
        if self.cache.is_loaded(plan.model.name) and (plan.refiner is None or self.cache.is_loaded(plan.refiner.name)):
            progress.phase(first_phase)
        needed = (plan.model.name,) + ((plan.refiner.name,) if plan.refiner else ())
        base = self._load(plan.model, progress, keep=needed)
        refiner = None
        if plan.refiner is not None:
            refiner = self._load(plan.refiner, progress, keep=needed, share_from=base)
        load_time = time.perf_counter() - t_load
        self.loras.apply(base, plan.loras)
        fastmode.set_fused(base.pipe.unet, not plan.loras)  # LoRA adapters wrap the unfused projections
        check()

        generator = torch.Generator("cpu").manual_seed(plan.seed)
        noise = NoiseFactory(generator, plan.seed)

        schedule = make_schedule(base, plan.sampler, plan.steps)
        shape = (1, base.pipe.unet.config.in_channels, plan.height // 8, plan.width // 8)
        x = noise.initial(shape, self.device) * schedule.start_sigma
        text = JobText(plan, self._lora_key(plan.loras))
        cond = self._conditioning(base, text, plan.width, plan.height)
        den = CFGDenoiser(base, cond, plan.cfg_scale, check)
        if refiner is None:
            x = schedule.run(den, x, noise, progress.stage(first_phase, 0.0, first_hi))
        else:
            k = plan.refiner_switch_step
            s_base, s_ref = schedule.split(k)
            share = first_hi * k / plan.steps
            x = s_base.run(den, x, noise, progress.stage(first_phase, 0.0, share))
            rcond = self._conditioning(refiner, text, plan.width, plan.height)
            # A1111 keeps counting the steps of prompt editing across the switch.
            rden = CFGDenoiser(refiner, rcond, plan.cfg_scale, check, step_offset=den.evals)
            x = s_ref.run(rden, x, noise, progress.stage("refining", share, first_hi))
        latents = x

        params_hires = {}
        if hires:
            progress.phase("upscaling")
            latents = self._upscale(plan, base, latents)
            check()
            total = hires_total_steps(hires.steps, hires.denoising_strength)
            schedule2 = img2img_tail(make_schedule(base, plan.sampler, total), hires.steps)
            cond2 = self._conditioning(base, text, plan.final_width, plan.final_height, hires_steps=hires.steps)
            den2 = CFGDenoiser(base, cond2, plan.cfg_scale, check)
            x = latents + noise.initial(latents.shape, self.device) * schedule2.start_sigma
            latents = schedule2.run(den2, x, noise, progress.stage("upscaling", first_hi, 100.0))
            params_hires = {"Denoising strength": hires.denoising_strength, "Hires upscale": hires.scale,
                            "Hires steps": hires.steps, "Hires upscaler": hires.upscaler.name}
        check()
        image = self._decode(base, latents, plan.final_width, plan.final_height)
        params = self._params(plan, params_hires, text)
        return GenerationResult([GeneratedImage(image, plan.seed, params)], round(load_time, 3),
                                warnings=text.warnings)

    @torch.inference_mode()
    def generate_batch(self, plans: list[GenerationPlan], reports: list[Report],
                       cancelled: list[Cancelled]) -> list[GenerationResult | BaseException]:
        """Several jobs of one ``batching.batch_key`` in one UNet batch; a result or an error per job."""
        from .batching import generate_batch

        return generate_batch(self, plans, reports, cancelled, StageProgress, JobText)

    def _params(self, plan: GenerationPlan, params_hires: dict, text: "JobText") -> dict:
        params = {
            "Steps": plan.steps, "Sampler": plan.sampler.infotext_sampler,
            "Schedule type": plan.sampler.infotext_schedule, "CFG scale": plan.cfg_scale, "Seed": plan.seed,
            "Size": f"{plan.width}x{plan.height}",
            # A1111's short hash of a checkpoint file (sites link images to models by it).
            "Model hash": (self.hashes.sha256(plan.model.path)[:10]
                           if plan.model.format == ModelFormat.SINGLE_FILE else None),
            "Model": plan.model.name,
            **params_hires,
        }
        if plan.refiner:
            params.update({"Refiner": plan.refiner.name, "Refiner switch at": plan.refiner_switch_at})
        if plan.clip_skip != 1:
            params["Clip skip"] = plan.clip_skip
        hashes = lora_hashes_infotext(plan.loras, self.hashes)
        if hashes:
            params["Lora hashes"] = hashes
        params["TI hashes"] = ti_hashes_infotext(text.used_embeddings)
        return params

    # ------------------------------------------------------------------ parts
    def _conditioning(self, loaded: LoadedModel, text: "JobText", width: int, height: int,
                      hires_steps: int | None = None):
        """A stage's conditioning; prompt editing counts model evaluations, as A1111 does."""
        slots = encoder_slots(loaded.pipe, loaded.family != SD15)
        found, warnings = usable_embeddings(text.embeddings, self.embedding_tensors.load, slots,
                                            SD15 if loaded.family == SD15 else SDXL, [text.prompt, text.negative],
                                            self.hashes.sha256)
        for w in warnings:
            if w not in text.warnings:
                log.warning("%s", w)
                text.warnings.append(w)
        cond = encode(loaded, text.prompt, text.negative, width, height, prompts=self.prompt_encoder,
                      clip_skip=text.clip_skip, total_steps=text.steps * text.evals_per_step,
                      hires_steps=hires_steps * text.evals_per_step if hires_steps else None,
                      embeddings=found, extra_key=text.lora_key)
        text.used_embeddings.update(cond.used_embeddings())
        return cond

    @staticmethod
    def _lora_key(loras) -> tuple:
        # LoRAs change the text encoders: an encoding is reused only under the same LoRAs.
        return tuple((str(u.entry.path), u.entry.path.stat().st_mtime_ns, float(u.weight)) for u in loras)

    def _load(self, entry, progress: StageProgress, *, keep, share_from=None) -> LoadedModel:
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

    def _vae_for(self, loaded: LoadedModel, width: int, height: int):
        """The VAE, tiled above the size threshold. Its precision is fastmode.vae_run's: fp16
        first, redone in the wider type when the result overflows (the SDXL VAE does)."""
        vae = loaded.pipe.vae
        if width * height > self.settings.vae_tiling_pixels:
            vae.enable_tiling()
        else:
            vae.disable_tiling()
        return vae

    def _decode(self, loaded: LoadedModel, latents: torch.Tensor, width: int, height: int) -> Image.Image:
        vae = self._vae_for(loaded, width, height)

        def decode(v):
            z = latents.to(v.dtype) / v.config.scaling_factor
            if getattr(v.config, "shift_factor", None):
                z = z + v.config.shift_factor
            return v.decode(z, return_dict=False)[0]

        img = fastmode.vae_run(loaded, vae, decode, self.fast)
        if not torch.isfinite(img).all():
            raise GenerationError("the VAE produced NaN values (an fp16 overflow); set an fp16-fix VAE "
                                  "or run this model in fp32")
        arr = ((img[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(arr)

    def _encode(self, loaded: LoadedModel, image: Image.Image) -> torch.Tensor:
        import numpy as np

        vae = self._vae_for(loaded, *image.size)
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1)

        def encode(v):
            t = pixels.permute(2, 0, 1).unsqueeze(0).to(self.device, v.dtype)
            z = v.encode(t, return_dict=False)[0].mode()
            if getattr(v.config, "shift_factor", None):
                z = z - v.config.shift_factor
            return z * v.config.scaling_factor

        return fastmode.vae_run(loaded, vae, encode, self.fast).float()

    def _upscale(self, plan: GenerationPlan, base: LoadedModel, latents: torch.Tensor) -> torch.Tensor:
        hires = plan.hires
        size = (hires.height // 8, hires.width // 8)
        if hires.upscaler.is_latent:
            mode, antialias = LATENT_UPSCALE_MODES[hires.upscaler.name]
            kwargs = {"antialias": antialias} if mode in ("bilinear", "bicubic") else {}
            if mode in ("bilinear", "bicubic"):
                kwargs["align_corners"] = False
            return torch.nn.functional.interpolate(latents.float(), size=size, mode=mode, **kwargs)
        image = self._decode(base, latents, plan.width, plan.height)
        try:
            model = self.upscalers.get(hires.upscaler.path)
            big = upscale_image(model, image, (hires.width, hires.height))
        except UpscalerError as e:
            raise GenerationError(str(e)) from e
        except Exception as e:  # noqa: BLE001
            raise GenerationError(f"upscaler {hires.upscaler.path.name!r} failed: {e}") from e
        return self._encode(base, big)
