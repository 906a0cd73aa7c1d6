"""One job on the GPU: pipeline cache -> sampler -> LoRAs -> base / refiner -> hires -> image."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from PIL import Image

from .. import imageinput
from ..vocabulary import LATENT_UPSCALE_MODES, SD15, SDXL, ModelFormat
from . import fastmode
from .fastmode import FastMode
from .hashes import hashes_in
from .live import LiveJob, TaesdCache
from .loras import LoraManager, lora_hashes_infotext
from .pipelines import LoadedModel, PipelineCache, free_memory, pick_device
from .plan import (Cancelled, GeneratedImage, GenerationError, GenerationPlan, GenerationResult, JobCancelled, Report,
                   StepObserver, UpscalePlan, hires_total_steps)
from . import img2img, vae_io
from .controlnet.units import ControlState, infotext_params as controlnet_infotext
from .conditioning import PromptEncoder, encoder_slots, evaluations_per_step, ti_hashes_infotext, usable_embeddings
from .embeddings import EmbeddingTensors
from .prompts import extract_extra_networks
from .flow import FLOW_FAMILIES, WEIGHTED_CONDITIONING, first_step_prompt, plain_prompt
from .flow_families import encode as encode_flow, make_denoiser as make_flow_denoiser
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
        self.negative_pass = plan.cfg_scale != 1.0  # flow families skip the negative prompt at CFG 1
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
        from .hostcache import auto_capacity_gb

        host_gb = getattr(settings, "host_cache_gb", None)
        host_gb = auto_capacity_gb(self.device.type == "cuda") if host_gb is None else host_gb
        self.cache = PipelineCache(self.device, settings.pipeline_cache_size, cpu_offload=settings.cpu_offload,
                                   fast=self.fast, host_cache_bytes=int(host_gb * 2**30))
        self.loras = LoraManager(settings.lora_cache_size)
        self.hashes = hashes_in(Path(settings.queue_dir))
        self.upscalers = UpscalerCache(self.device)
        self.prompt_encoder = PromptEncoder(settings.conditioning_cache_size)
        self.embedding_tensors = EmbeddingTensors()
        self.taesd = TaesdCache(self.device)
        self.batches: list[int] = []  # sizes of the UNet batches of several jobs (tests, logs)
        self._flow_cache: dict = {}  # flow families' text conditioning (engine/flow.py), oldest first
        self._control = None  # the running job's ControlNet units (engine/controlnet/units.ControlState)
        self._references = None  # the running edit job's reference tokens (engine/flow.ReferenceTokens)
        self._step_cache = None  # the running job's step caching (engine/stepcache.StepCacheRun)

    # ------------------------------------------------------------------ entry point
    @torch.inference_mode()
    def generate(self, plan: GenerationPlan | UpscalePlan, report: Report, cancelled: Cancelled,
                 observer: StepObserver | None = None) -> GenerationResult:
        try:
            return self._generate(plan, report, cancelled, observer)
        except (JobCancelled, GenerationError):
            raise
        except torch.cuda.OutOfMemoryError as e:
            free_memory()
            raise GenerationError("out of GPU memory: try a smaller size, fewer steps or a lower hires scale") from e
        except MemoryError as e:
            free_memory()
            raise GenerationError("out of memory: try a smaller size, fewer steps or a lower hires scale") from e
        finally:
            if self._control is not None:
                self._control.close()  # IP-Adapter layers leave the resident UNet
            self._control = None
            self._references = None
            if self._step_cache is not None:
                self._step_cache.close()  # its hooks leave the resident model
            self._step_cache = None

    def _generate(self, plan: GenerationPlan | UpscalePlan, report: Report, cancelled: Cancelled,
                  observer: StepObserver | None = None) -> GenerationResult:
        progress = StageProgress(report)

        def check() -> None:
            if cancelled():
                raise JobCancelled()

        if isinstance(plan, UpscalePlan):
            return self._upscale_only(plan, progress)
        t_load = time.perf_counter()
        first_phase = "encoding" if plan.init else "initial generation" if plan.hires else "generation"
        resident = self.cache.is_loaded(plan.model.name) and (plan.refiner is None
                                                              or self.cache.is_loaded(plan.refiner.name))
        if resident:
            progress.phase(first_phase)
        needed = (plan.model.name,) + ((plan.refiner.name,) if plan.refiner else ())
        base = self._load(plan.model, progress, keep=needed)
        refiner = None
        if plan.refiner is not None:
            refiner = self._load(plan.refiner, progress, keep=needed, share_from=base)
        load_time = 0.0 if resident else time.perf_counter() - t_load  # 0: nothing was loaded (README)
        self.loras.apply(base, plan.loras)
        fastmode.set_fused(base.denoiser_module, not plan.loras)  # LoRA adapters wrap the unfused projections
        if plan.step_cache is not None:
            from .stepcache import StepCacheRun

            try:
                self._step_cache = StepCacheRun(base, plan.step_cache)
            except ValueError as e:  # e.g. a transformer too shallow for first_block
                raise GenerationError(f"step_cache {plan.step_cache.method!r} cannot run on model "
                                      f"{plan.model.name!r}: {e}") from e
        check()

        if base.spec.pipeline_sampling is not None:  # runs through its own diffusers pipeline
            return self._pipeline_job(plan, base, progress, check, load_time)

        prepared = init = None
        encode_image = lambda im: self._encode(base, im)  # noqa: E731
        if plan.init is not None:
            progress.phase("encoding")
            prepared = img2img.prepare_input(plan.init, plan.width, plan.height)
            init = img2img.encode_init(encode_image, prepared, self.device)
            check()
        if plan.references:  # an edit job: its reference images are encoded once
            progress.phase("encoding")
            self._references = self._reference_tokens(base, plan.references)
            check()
        # ControlNet units: their maps are detected once per job (engine/controlnet).
        self._control = ControlState(self, plan) if plan.controlnets or plan.ip_adapters else None
        text = JobText(plan, self._lora_key(plan.loras))
        cond = self._conditioning(base, text, plan.width, plan.height)
        rcond = self._conditioning(refiner, text, plan.width, plan.height) if refiner else None
        live = LiveJob(observer, plan.preview, family=base.family, model_name=plan.model.name,
                       vae_approx_dir=self.settings.vae_approx_dir,
                       image_size=(plan.final_width, plan.final_height), taesd=self.taesd,
                       latent_channels=vae_io.latent_channels(base.pipe.vae),
                       fit_factors=lambda: self._fitted_preview_factors(base))

        images = []
        decode_sec = 0.0
        # n_iter batches one after another, each its share of the progress; image k has seed + k.
        for it in range(plan.n_iter):
            seeds = [plan.seed + it * plan.batch_size + j for j in range(plan.batch_size)]
            window = (100.0 * it / plan.n_iter, 100.0 * (it + 1) / plan.n_iter)
            size, interrupted = (plan.final_width, plan.final_height), False
            try:
                latents = self._sample_batch(plan, base, refiner, cond, rcond, seeds, prepared, init, progress,
                                             window, check, text, live)
            except _Interrupted as stop:  # keep_partial: decode where sampling stood, then end
                latents, size, interrupted, check = stop.latents, stop.size, True, (lambda: None)
                text.warnings.append(f"interrupted: images {len(images) + 1}-{len(images) + len(seeds)} of "
                                     f"{plan.image_count} are their last denoised state; the rest were not made")
            if it == plan.n_iter - 1 or interrupted:
                live.close()  # the last preview is out before the job's final event
            for j, seed in enumerate(seeds):
                check()
                t_dec = time.perf_counter()
                image = self._decode(base, latents[j:j + 1], *size)
                decode_sec += time.perf_counter() - t_dec
                if prepared is not None and size == (plan.final_width, plan.final_height):
                    image = prepared.composite(image)
                images.append(image)
            if interrupted:
                break

        params = self._params(plan, text, prepared)
        if plan.image_count > 1:
            params["Batch size"] = plan.batch_size
        results = []
        for k, image in enumerate(images):
            extra = {"Batch pos": k % plan.batch_size} if plan.batch_size > 1 else {}
            results.append(GeneratedImage(image, plan.seed + k, {**params, "Seed": plan.seed + k, **extra}))
        if self._control is not None:  # asked-for detected maps follow the images, as in A1111
            results += [GeneratedImage(m, plan.seed, {"ControlNet detected map": name})
                        for name, m in self._control.detected_maps()]
        return GenerationResult(results, round(load_time, 3), round(decode_sec, 3), warnings=text.warnings)

    def _sample_batch(self, plan: GenerationPlan, base: LoadedModel, refiner: LoadedModel | None, cond, rcond,
                      seeds: list[int], prepared, init, progress: StageProgress, window, check,
                      text: "JobText", live: LiveJob) -> torch.Tensor:
        """Latents of one batch (one UNet batch of ``len(seeds)`` images), over ``window`` of the progress."""
        lo, hi = window
        n = len(seeds)
        hires = plan.hires
        first_hi = lo + (hi - lo) * (0.5 if hires else 1.0)
        first_phase = "initial generation" if hires else "generation"
        noise = NoiseFactory.for_seeds(seeds)
        schedule = make_schedule(base, plan.sampler, plan.steps, (plan.width, plan.height))
        shape = (n, vae_io.latent_channels(base.pipe.vae), plan.height // 8, plan.width // 8)
        init_z = None
        if init is None:
            x = noise.initial(shape, self.device) * schedule.start_sigma
        else:
            # A1111's img2img: the tail of the steps-step schedule, from the init latents noised
            # with the image's own seeded noise (which "latent noise" fill also uses).
            schedule = img2img_tail(schedule, img2img.img2img_steps(plan.steps, plan.init.denoising_strength))
            first = noise.initial(shape, self.device)
            init_z = img2img.fill_latents(init, plan.init.inpainting_fill, first)
            x = init_z + first * schedule.start_sigma
        den = self._denoiser(base, cond, plan, check, prepared, plan.width, plan.height, init, init_z)
        current = {"den": den, "size": (plan.width, plan.height)}  # the stage sampling now
        try:
            return self._sample_stages(plan, base, refiner, rcond, noise, schedule, den, x, init, init_z, progress,
                                       window, first_hi, first_phase, check, text, live, current)
        except JobCancelled as e:
            # A1111's interrupt: the sampler returns its last denoised estimate (its last_latent).
            x0 = current["den"].latest_x0() if plan.keep_partial else None
            if x0 is None:
                raise
            raise _Interrupted(x0, current["size"]) from e

    def _sample_stages(self, plan, base, refiner, rcond, noise, schedule, den, x, init, init_z, progress, window,
                       first_hi, first_phase, check, text, live, current: dict) -> torch.Tensor:
        lo, hi = window
        hires = plan.hires
        if refiner is None:
            x = schedule.run(den, x, noise, live.stage(first_phase, schedule.steps,
                                                       progress.stage(first_phase, lo, first_hi), den.latest_x0))
        else:
            k = int(round(schedule.steps * plan.refiner_switch_at))
            s_base, s_ref = schedule.split(k) if 0 < k < schedule.steps else (schedule, None)
            share = lo + (first_hi - lo) * s_base.steps / schedule.steps
            if getattr(den, "clock", None) is not None:
                den.clock.total = schedule.steps  # ControlNet's guidance window spans all the steps
            x = s_base.run(den, x, noise, live.stage(first_phase, s_base.steps,
                                                     progress.stage(first_phase, lo, share), den.latest_x0))
            if s_ref is not None:
                # A1111 keeps counting the steps of prompt editing across the switch.
                rden = self._denoiser(refiner, rcond, plan, check, None, plan.width, plan.height, init, init_z,
                                      step_offset=den.evals, stage="refiner")
                current["den"] = rden
                x = s_ref.run(rden, x, noise, live.stage("refining", s_ref.steps,
                                                         progress.stage("refining", share, first_hi), rden.latest_x0))
        if init is not None and init.keep is not None and not base.spec.inpainting_only:
            x = x * init.repaint + init_z * init.keep  # A1111 blends the final latents once more
        latents = x

        if hires:
            progress.phase("upscaling")
            latents = self._upscale(plan, base, latents)
            check()
            total = hires_total_steps(hires.steps, hires.denoising_strength)
            schedule2 = img2img_tail(make_schedule(base, plan.sampler, total, (plan.final_width, plan.final_height)),
                                     hires.steps)
            cond2 = self._conditioning(base, text, plan.final_width, plan.final_height, hires_steps=hires.steps)
            den2 = self._denoiser(base, cond2, plan, check, None, plan.final_width, plan.final_height, stage="high")
            current.update(den=den2, size=(plan.final_width, plan.final_height))
            x = latents + noise.initial(latents.shape, self.device) * schedule2.start_sigma
            latents = schedule2.run(den2, x, noise, live.stage("upscaling", schedule2.steps,
                                                               progress.stage("upscaling", first_hi, hi),
                                                               den2.latest_x0))
        check()
        return latents

    def _denoiser(self, loaded: LoadedModel, cond, plan: GenerationPlan, check, prepared, width: int, height: int,
                  init=None, init_z=None, step_offset: int = 0, stage: str = "low"):
        """The CFG denoiser; an inpainting UNet gets its mask + masked-image conditioning, and
        a mask keeps the init latents outside it at every evaluation. ``stage``: "low" (first
        pass), "high" (hires pass), "refiner" (ControlNet units guide the first two)."""
        if self._step_cache is not None and self._step_cache.serves(loaded):
            self._step_cache.begin_stage()  # a new sampling run: no state from the last one
        if loaded.is_flow:
            # The steps its schedule was made for (make_schedule): Flux.2's shift depends on them.
            steps = (hires_total_steps(plan.hires.steps, plan.hires.denoising_strength) if stage == "high"
                     else plan.steps)
            fill = self._fill_conditioning(loaded, prepared, width, height) if loaded.spec.inpainting_only else None
            den = make_flow_denoiser(loaded, cond, loaded.sigmas_at(width, height, steps), plan.cfg_scale, check,
                                     cfg_rescale=plan.cfg_rescale, guidance=plan.distilled_cfg_scale,
                                     references=getattr(self, "_references", None), fill=fill)
        else:
            den = CFGDenoiser(loaded, cond, plan.cfg_scale, check, step_offset=step_offset,
                              cfg_rescale=plan.cfg_rescale)
        if not loaded.is_flow and img2img.is_inpainting_unet(loaded.pipe.unet):
            extra = img2img.inpainting_conditioning(lambda im: self._encode(loaded, im), prepared, width, height,
                                                    self.device)
            den.unet = img2img.ConcatUNet(den.unet, extra)
        if getattr(self, "_control", None) is not None and stage != "refiner":
            den = self._control.wrap(loaded, den, stage, width, height)
        # Flux.1 Fill sees the image and the mask itself: it denoises as FluxFillPipeline does,
        # without the latent blending (the composite keeps the pixels outside the mask).
        if init is not None and init.keep is not None and not loaded.spec.inpainting_only:
            den = img2img.MaskedDenoiser(den, init_z, init.keep)
        return den

    def _fill_conditioning(self, loaded: LoadedModel, prepared, width: int, height: int) -> torch.Tensor:
        """Flux.1 Fill's image and mask channels (engine/flow.fill_conditioning), from the
        prepared init image and mask as FluxFillPipeline makes them: the mask binarised at 0.5,
        the image in [-1, 1] zeroed under it, VAE-encoded (the distribution's mode, as every init)."""
        import numpy as np

        from .flow import fill_conditioning

        if prepared is None or prepared.mask is None:  # resolve refuses this; a worker says so too
            raise GenerationError(f"{loaded.spec.label} inpaints: it needs an init image and a mask")
        mask = np.asarray(prepared.mask.convert("L").resize((width, height)), dtype=np.float32) / 255.0
        mask = (mask >= 0.5).astype(np.float32)
        src = np.asarray(prepared.conditioning_image().convert("RGB"), dtype=np.float32) / 127.5 - 1
        pixels = torch.from_numpy(src * (1 - mask[..., None])).permute(2, 0, 1).unsqueeze(0)
        vae = self._vae_for(loaded, width, height)
        z = fastmode.vae_run(loaded, vae, lambda v: vae_io.encode(v, pixels.to(self.device, v.dtype)), self.fast)
        return fill_conditioning(z.float(), torch.from_numpy(mask)[None, None].to(self.device))

    # ------------------------------------------------------------------ parts
    def _pipeline_job(self, plan: GenerationPlan, base: LoadedModel, progress: StageProgress, check,
                      load_time: float) -> GenerationResult:
        """A family that runs through its diffusers pipeline and that pipeline's own scheduler
        (FamilySpec.pipeline_sampling: Qwen-Image-Edit): the pipeline's encoders read the prompt
        and the reference images; each image's noise comes from its own seed (CPU generator, as
        the engine draws it), so image k of a batch equals the same seed made alone. Progress and
        cancel at every step; no previews."""
        from .flow import plain_prompt
        from .pipelines import folder_pipeline
        from ..families.qwen_image_edit import takes_several_references

        text = JobText(plan, ())
        prompt = plain_prompt(text.prompt, plan.steps)
        # The pipeline's rule: true CFG (a negative pass) only above 1 and with a negative prompt;
        # Qwen's own default negative prompt is one space.
        negative = (plain_prompt(plan.negative_prompt, plan.steps) or " ") if plan.cfg_scale > 1 else None
        refs = [imageinput.flatten(im) for im in plan.references]
        several = takes_several_references(folder_pipeline(plan.model.path) or "")
        if len(refs) > 1 and not several:  # resolve refuses this where it can read the folder
            raise GenerationError(f"{plan.model.name!r} takes one reference image ({len(refs)} given); "
                                  "Qwen-Image-Edit Plus takes several")
        images = []
        for it in range(plan.n_iter):
            seeds = [plan.seed + it * plan.batch_size + j for j in range(plan.batch_size)]
            update = progress.stage("generation", 100.0 * it / plan.n_iter, 100.0 * (it + 1) / plan.n_iter)

            def on_step(pipe, i, t, tensors, update=update):
                check()
                update((i + 1) / plan.steps)
                return {}

            out = base.pipe(image=refs if several else refs[0], prompt=prompt, negative_prompt=negative,
                            true_cfg_scale=plan.cfg_scale, num_inference_steps=plan.steps, height=plan.height,
                            width=plan.width, num_images_per_prompt=len(seeds),
                            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                            callback_on_step_end=on_step, output_type="pil")
            images += out.images
        params = self._params(plan, text)
        if plan.image_count > 1:
            params["Batch size"] = plan.batch_size
        results = [GeneratedImage(im, plan.seed + k, {**params, "Seed": plan.seed + k,
                                                      **({"Batch pos": k % plan.batch_size}
                                                         if plan.batch_size > 1 else {})})
                   for k, im in enumerate(images)]
        return GenerationResult(results, round(load_time, 3), warnings=text.warnings)

    def _reference_tokens(self, loaded: LoadedModel, images):
        """An edit job's reference images through the model's VAE: each at its own size, scaled
        down to the model's native area and rounded to 2x2 patches (engine/flow.py), as tokens of
        the family's transformer (Flux.1 Kontext's or Flux.2's: engine/flow_families.py)."""
        from .flow import reference_size, reference_tokens
        from .flow_families import flux2_reference_tokens

        fam = loaded.spec
        latents = []
        for im in images:
            im = imageinput.flatten(im)
            size = reference_size(im.width, im.height, fam.size * fam.size, fam.vae_scale_factor * 2)
            if size != im.size:
                im = im.resize(size, Image.LANCZOS)
            latents.append(self._encode(loaded, im))
        return flux2_reference_tokens(latents) if fam.conditioning == "flux2" else reference_tokens(latents)

    def _conditioning(self, loaded: LoadedModel, text: "JobText", width: int, height: int,
                      hires_steps: int | None = None):
        """A stage's conditioning; prompt editing counts model evaluations, as A1111 does."""
        if loaded.is_flow:
            return self._flow_conditioning(loaded, text)
        slots = encoder_slots(loaded.pipe, loaded.xl)
        found, warnings = usable_embeddings(text.embeddings, self.embedding_tensors.load, slots,
                                            SDXL if loaded.xl else SD15, [text.prompt, text.negative],
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

    def _flow_conditioning(self, loaded: LoadedModel, text: "JobText"):
        """A flow family's text conditioning of the prompt (and of the negative prompt when CFG
        runs a negative pass), cached like the CLIP encodings: by model, text and LoRAs."""
        # SD 3 reads A1111's weights and BREAK (flow.encode_sd3); the others read plain text.
        read = first_step_prompt if loaded.spec.conditioning in WEIGHTED_CONDITIONING else plain_prompt
        prompt = read(text.prompt, text.steps)
        negative = read(text.negative, text.steps) if text.negative_pass else None
        key = (loaded.entry.name, str(loaded.entry.path), loaded.entry.modules, prompt, negative, text.lora_key)
        cond = self._flow_cache.get(key)
        if cond is None:
            cond = encode_flow(loaded, prompt, negative)
            self._flow_cache[key] = cond
            while len(self._flow_cache) > max(int(self.settings.conditioning_cache_size), 1):
                self._flow_cache.pop(next(iter(self._flow_cache)))
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

    @torch.inference_mode()
    def generate_batch(self, plans: list[GenerationPlan], reports: list[Report],
                       cancelled: list[Cancelled]) -> list[GenerationResult | BaseException]:
        """Several jobs of one ``batching.batch_key`` in one UNet batch; a result or an error per job."""
        from .batching import generate_batch

        return generate_batch(self, plans, reports, cancelled, StageProgress, JobText)

    def _params(self, plan: GenerationPlan, text: "JobText", prepared=None) -> dict:
        params = {
            "Steps": plan.steps, "Sampler": plan.sampler.infotext_sampler,
            "Schedule type": plan.sampler.infotext_schedule, "CFG scale": plan.cfg_scale, "Seed": plan.seed,
            "Size": f"{plan.width}x{plan.height}",
            # A1111's short hash of a checkpoint file (sites link images to models by it).
            "Model hash": (self.hashes.sha256(plan.model.path)[:10]
                           if plan.model.format == ModelFormat.SINGLE_FILE else None),
            "Model": plan.model.name,
        }
        if plan.hires:
            hires = plan.hires
            params.update({"Denoising strength": hires.denoising_strength, "Hires upscale": hires.scale,
                           "Hires steps": hires.steps, "Hires upscaler": hires.upscaler.name})
        if plan.init is not None:
            params.update(img2img.infotext_params(plan.init, prepared))
        if plan.refiner:
            params.update({"Refiner": plan.refiner.name, "Refiner switch at": plan.refiner_switch_at})
        if plan.clip_skip != 1:
            params["Clip skip"] = plan.clip_skip
        if plan.cfg_rescale:
            params["RescaleCFG"] = plan.cfg_rescale
        if plan.step_cache is not None:
            params["Step cache"] = plan.step_cache.infotext
        if plan.model.family in FLOW_FAMILIES:
            base = self.cache._items.get(plan.model.name)
            if base is not None and base.pipe.transformer.config.get("guidance_embeds", False):
                params["Distilled CFG Scale"] = plan.distilled_cfg_scale
            if base is not None and base.spec.pipeline_sampling is None:  # the shift of this size (Flux.1-dev's depends on it)
                params["Shift"] = round(base.sigmas_at(plan.width, plan.height, plan.steps).shift, 4)
        for i, module in enumerate(plan.model.modules, 1):  # Forge's names for component files
            params[f"Module {i}"] = module.stem
        hashes = lora_hashes_infotext(plan.loras, self.hashes)
        if hashes:
            params["Lora hashes"] = hashes
        params["TI hashes"] = ti_hashes_infotext(text.used_embeddings)
        params.update(controlnet_infotext(plan.controlnets, plan.ip_adapters))
        return params

    def _fitted_preview_factors(self, loaded: LoadedModel):
        """Least-squares latent -> RGB factors of the model's own VAE (engine/previews.py), made
        once per loaded model: 8 decodes of 128 x 128 images."""
        factors = getattr(loaded, "preview_factors", None)
        if factors is None:
            from .previews import fit_latent_rgb

            vae = loaded.pipe.vae

            def decode(z):
                return vae_io.decode(vae, z.to(self.device, vae.dtype))

            factors = fit_latent_rgb(decode, channels=vae_io.latent_channels(vae))
            loaded.preview_factors = factors
        return factors

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
            return vae_io.decode(v, latents.to(v.dtype))

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
            return vae_io.encode(v, pixels.permute(2, 0, 1).unsqueeze(0).to(self.device, v.dtype))

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
        bigs = []
        for i in range(latents.shape[0]):
            image = self._decode(base, latents[i:i + 1], plan.width, plan.height)
            target = (hires.width, hires.height)
            big = image.resize(target, imageinput.PIXEL_RESIZERS[hires.upscaler.name]) if hires.upscaler.is_resize \
                else self._run_upscaler(hires.upscaler, image, target)
            bigs.append(self._encode(base, big))
        return torch.cat(bigs)

    def _run_upscaler(self, upscaler, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        try:
            model = self.upscalers.get(upscaler.path)
            return upscale_image(model, image, size)
        except UpscalerError as e:
            raise GenerationError(str(e)) from e
        except Exception as e:  # noqa: BLE001
            raise GenerationError(f"upscaler {upscaler.path.name!r} failed: {e}") from e

    def _upscale_only(self, plan: UpscalePlan, progress: StageProgress) -> GenerationResult:
        """``/upscale``: the hires path's pixel upscaler (tiled, then resized to the exact size)."""
        progress.stage("upscaling", 0.0, 100.0)
        image = imageinput.flatten(plan.image)
        size = (plan.width, plan.height)
        t0 = time.perf_counter()
        if plan.upscaler is None:
            out = image.resize(size, imageinput.PIXEL_RESIZERS[plan.method])
            load_time = 0.0
        else:
            loaded_before = self.upscalers.is_loaded(plan.upscaler.path)
            out = self._run_upscaler(plan.upscaler, image, size)
            load_time = 0.0 if loaded_before else time.perf_counter() - t0
        params = {"Postprocess upscaler": plan.method}
        params.update({"Postprocess upscale by": plan.scale} if plan.scale is not None
                      else {"Postprocess upscale to": f"{plan.width}x{plan.height}"})
        return GenerationResult([GeneratedImage(out, -1, params)], round(load_time, 3))


class _Interrupted(JobCancelled):
    """A cancel seen by a keep_partial job: the batch's last denoised latents, and their image size."""

    def __init__(self, latents: torch.Tensor, size: tuple[int, int]):
        super().__init__()
        self.latents, self.size = latents, size
