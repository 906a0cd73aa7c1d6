#!/usr/bin/env python3
"""GPU benchmark: bare diffusers vs the service (real uvicorn, HTTP, long-poll), side by side in one run.

    python benchmarks/gpu.py [--quick] [--budget S] [--out FILE]      # full size, on CUDA
    python benchmarks/gpu.py --tiny --device cpu                      # tiny models: correctness only

No downloads. Full size builds SD 1.5 and SDXL (UNet, VAE, text encoders) from the configs the
package ships (``diffusionapi/configs``) with random fp16 weights (speed does not depend on the
weights' values), installs each as a diffusers folder and as a single-file checkpoint, and
measures: steps/s and s/image at 512x512 (SD 1.5) and 1024x1024 (SDXL), 20 steps, batch 1 and 4,
bare diffusers vs the service; peak VRAM; model load times; each fast-mode option on/off; the
service in fast mode (torch.compile warmed up at start); dynamic batching with 8 concurrent
clients. Prints a table last and writes JSON ($OUT/gpu.json when OUT is set). Sections that would
overrun ``--budget`` seconds are skipped and listed as skipped; a failing section is recorded and
the run goes on. Never fails on slow numbers: figures belong here, not in the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, dramatic clouds"
CFG_SCALE = 7.0
BATCH_WAIT_MS = 20  # the batching service waits this long for a batch to fill
FAMILIES = ("sd15", "sdxl")
# Per family: image side, steps. Tiny mode keeps the shapes of the flow, not the sizes.
FULL = {"sd15": (512, 20), "sdxl": (1024, 20)}
TINY = {"sd15": (64, 4), "sdxl": (64, 4)}
# Flow-matching families (section "flow", --flow-families): Flux.1-dev (bf16, CFG 1, distilled
# guidance 3.5) and SD 3.5 Large (bf16, CFG 4.5), Qwen-Image (bf16, true CFG 4, empty negative
# prompt) and Flux.2 klein 4B (bf16, distilled: 4 steps, CFG 1), Euler on the Simple schedule.
FLOW_FULL = {"flux1": (1024, 20), "sd3": (1024, 20), "qwen-image": (1024, 20), "flux2": (1024, 4)}
FLOW_TINY = {"flux1": (64, 4), "sd3": (64, 4), "qwen-image": (64, 4), "flux2": (64, 4)}
FLOW_CFG = {"flux1": 1.0, "sd3": 4.5, "qwen-image": 4.0, "flux2": 1.0}


# ---------------------------------------------------------------------------- bookkeeping

class OutOfTime(Exception):
    """The hard limit (budget + grace) passed inside a section: it stops, the report is still written."""


class Run:
    """Results, the time budget, and what was skipped or failed. JSON is rewritten after each section,
    so a run killed from outside still leaves what it measured."""

    def __init__(self, budget: float | None, out: Path | None = None, grace: float = 40):
        self.t0 = time.perf_counter()
        self.budget = budget
        self.out = out
        if budget is not None and hasattr(signal, "SIGALRM"):
            def expire(signum, frame):
                raise OutOfTime(f"hard limit of {budget + grace:.0f} s reached")
            signal.signal(signal.SIGALRM, expire)
            signal.alarm(int(budget + grace))
        self.results: dict = {"speed": [], "options": [], "load": {}, "build": {}, "fast_service": [],
                              "batching": {}, "skipped": [], "errors": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def allows(self, name: str, estimate_s: float) -> bool:
        if self.budget is not None and self.elapsed() >= self.budget:
            estimate_s = max(estimate_s, 1)
        if self.budget is None or self.elapsed() + estimate_s <= self.budget:
            return True
        self.results["skipped"].append(f"{name} (needs ~{estimate_s:.0f} s, {self.budget - self.elapsed():.0f} s left)")
        log(f"skip {name}: budget")
        return False

    def save(self) -> None:
        if self.out is not None:
            self.results["elapsed_s"] = round(self.elapsed(), 1)
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.results, indent=2))

    def section(self, name: str):
        run = self

        class _S:
            def __enter__(self):
                log(f"== {name} (t={run.elapsed():.0f} s)")
                return self

            def __exit__(self, et, e, tb):
                run.save()
                if et is None:
                    return False
                if et is KeyboardInterrupt:
                    return False
                run.results["errors"].append(f"{name}: {et.__name__}: {e}")
                log(f"!! {name} failed: {et.__name__}: {e}\n{''.join(traceback.format_tb(tb)[-4:])}")
                return True  # the run goes on
        return _S()


def log(msg: str) -> None:
    print(msg, flush=True)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median(xs):
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------------------- models

def build_full(family: str, device: str):
    """The full-size architecture from the shipped configs, random fp16 weights, on ``device``."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from diffusionapi.engine.checkpoints import packaged_config

    folder = packaged_config(family)  # config jsons + CLIP's tokenizer files, no weights

    def cfg(part):
        return json.loads((folder / part / "config.json").read_text())

    torch.manual_seed(0)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(cfg("unet")).eval()
            vae = AutoencoderKL.from_config(cfg("vae")).eval()
            te = CLIPTextModel(CLIPTextConfig(**cfg("text_encoder"))).eval()
            te2 = (CLIPTextModelWithProjection(CLIPTextConfig(**cfg("text_encoder_2"))).eval()
                   if family == "sdxl" else None)
    finally:
        torch.set_default_dtype(old)
    sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    tok = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    if family == "sd15":
        return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                       scheduler=PNDMScheduler.from_config(sched_cfg), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    tok2 = CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2"))
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=EulerDiscreteScheduler.from_config(sched_cfg))


def build_full_flow(family: str, device: str):
    """Full-size Flux.1-dev or SD 3.5 Large with random bf16 weights (fp32 on CPU): the published
    architectures, CLIP-L / CLIP-G configs from the shipped SD 1.5 / SDXL folders, T5-XXL, the
    16-channel VAE. Tokenizers: CLIP's shipped BPE and the in-memory T5 stand-in (random weights
    do not care which tokens they see)."""
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                              T5EncoderModel)

    from diffusionapi.demo import FLUX_DEV_SCHEDULER, SD3_SCHEDULER, tiny_t5_tokenizer
    from diffusionapi.engine.checkpoints import packaged_config

    sd15, sdxl = packaged_config("sd15"), packaged_config("sdxl")

    def cfg(folder, part):
        return json.loads((folder / part / "config.json").read_text())

    t5 = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                  relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                  is_encoder_decoder=False, use_cache=False, dropout_rate=0.0)
    vae_kw = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                  latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**{**cfg(sdxl, "text_encoder"), "projection_dim": 768}))
            t5_model = T5EncoderModel(t5).eval()
            if family == "flux1":
                transformer = FluxTransformer2DModel(guidance_embeds=True).eval()  # the defaults are Flux.1's
                vae = AutoencoderKL(**vae_kw, shift_factor=0.1159, scaling_factor=0.3611).eval()
                te = CLIPTextModel(CLIPTextConfig(**cfg(sd15, "text_encoder"))).eval()
            else:  # SD 3.5 Large
                transformer = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                                                    num_layers=38, attention_head_dim=64, num_attention_heads=38,
                                                    joint_attention_dim=4096, caption_projection_dim=2432,
                                                    pooled_projection_dim=2048, pos_embed_max_size=192,
                                                    qk_norm="rms_norm").eval()
                vae = AutoencoderKL(**vae_kw, shift_factor=0.0609, scaling_factor=1.5305).eval()
                clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**cfg(sdxl, "text_encoder_2"))).eval()
    finally:
        torch.set_default_dtype(old)
    tok = CLIPTokenizer.from_pretrained(str(sd15 / "tokenizer"))
    if family == "flux1":
        return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), vae=vae, text_encoder=te,
                            tokenizer=tok, text_encoder_2=t5_model, tokenizer_2=tiny_t5_tokenizer(),
                            transformer=transformer)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
                                    vae=vae, text_encoder=clip_l, tokenizer=tok, text_encoder_2=clip_g,
                                    tokenizer_2=CLIPTokenizer.from_pretrained(str(sdxl / "tokenizer_2")),
                                    text_encoder_3=t5_model, tokenizer_3=tiny_t5_tokenizer())


def build_full_dit(family: str, device: str):
    """Full-size Qwen-Image (20B MMDiT, Qwen2.5-VL-7B text encoder, its video-style VAE) or Flux.2
    klein 4B (5 double + 20 single blocks, 24 heads of 128, Qwen3-4B text encoder whose layers 9,
    18 and 27 it reads, the 32-channel VAE) with random bf16 weights (fp32 on CPU): the published
    architectures; the tokenizer is the in-memory Qwen stand-in (random weights do not care which
    tokens they see). Qwen-Image's folder is about 58 GB: mind the disk."""
    import torch
    from diffusers import (AutoencoderKLFlux2, AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler,
                           Flux2KleinPipeline, Flux2Transformer2DModel, QwenImagePipeline, QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

    from diffusionapi.demo import FLUX2_SCHEDULER, QWEN_IMAGE_SCHEDULER, qwen_token_id, tiny_qwen_tokenizer

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if family == "qwen-image":
                transformer = QwenImageTransformer2DModel().eval()  # the defaults are Qwen-Image's
                vae = AutoencoderKLQwenImage().eval()
                te = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
                    text_config={"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                                 "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                                 "rope_theta": 1000000.0, "max_position_embeddings": 128000,
                                 "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default",
                                                  "type": "default"}},
                    vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                                   "out_hidden_size": 3584},
                    hidden_size=3584, vocab_size=152064,
                    image_token_id=qwen_token_id("<|image_pad|>"), video_token_id=qwen_token_id("<|video_pad|>"),
                    vision_start_token_id=qwen_token_id("<|vision_start|>"),
                    vision_end_token_id=qwen_token_id("<|vision_end|>"))).eval()
            else:
                transformer = Flux2Transformer2DModel(
                    patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=3 * 2560, timestep_guidance_channels=256,
                    axes_dims_rope=[32, 32, 32, 32], guidance_embeds=False).eval()
                vae = AutoencoderKLFlux2().eval()
                te = Qwen3ForCausalLM(Qwen3Config(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                                  num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                                  vocab_size=151936, max_position_embeddings=40960,
                                                  rope_theta=1000000.0, tie_word_embeddings=True)).eval()
    finally:
        torch.set_default_dtype(old)
    if family == "qwen-image":
        return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER), vae=vae,
                                 text_encoder=te, tokenizer=tiny_qwen_tokenizer(), transformer=transformer)
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER), vae=vae, text_encoder=te,
                              tokenizer=tiny_qwen_tokenizer(), transformer=transformer, is_distilled=True)


def flow_section(run: Run, work: Path, fam: str, tiny: bool, device: str, reps: int, services: list) -> None:
    """One flow family: build, save as a diffusers folder, bare diffusers (Euler, the Simple
    sigmas, same noise) then the service (Euler + simple), one after the other so each has the
    GPU to itself; images compared, speed ratio and peak VRAM recorded."""
    import numpy as np
    import torch
    from diffusers import (FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, FluxPipeline, QwenImagePipeline,
                           StableDiffusion3Pipeline)
    from PIL import Image

    from diffusionapi.engine.vae_io import patchify

    size, steps = (FLOW_TINY if tiny else FLOW_FULL)[fam]
    models = work / "flow-models"
    t = time.perf_counter()
    pipe = build_tiny(fam, device) if tiny else (build_full_dit(fam, device) if fam in ("qwen-image", "flux2")
                                                  else build_full_flow(fam, device))
    build_s = time.perf_counter() - t
    pipe.save_pretrained(models / fam, safe_serialization=True)
    del pipe
    free(device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    cls = {"flux1": FluxPipeline, "sd3": StableDiffusion3Pipeline, "qwen-image": QwenImagePipeline,
           "flux2": Flux2KleinPipeline}[fam]
    t = time.perf_counter()
    bare = cls.from_pretrained(str(models / fam), dtype=dtype, local_files_only=True).to(device)
    if fam == "qwen-image":  # the service's Simple schedule has no terminal stretch (docs/families.md)
        bare.scheduler = FlowMatchEulerDiscreteScheduler.from_config(bare.scheduler.config, shift_terminal=None)
    bare.set_progress_bar_config(disable=True)
    bare_load_s = time.perf_counter() - t
    lat = size // 8
    sigmas = list(np.linspace(1.0, 1 / steps, steps))
    kw = {"flux1": dict(guidance_scale=3.5), "qwen-image": dict(true_cfg_scale=FLOW_CFG[fam], negative_prompt=""),
          "flux2": dict(guidance_scale=FLOW_CFG[fam])}.get(fam, dict(guidance_scale=FLOW_CFG[fam], negative_prompt=""))
    channels = 32 if fam == "flux2" else 16

    def bare_call(seed: int):
        noise = torch.randn((1, channels, lat, lat), generator=torch.Generator("cpu").manual_seed(seed))
        if fam in ("flux1", "qwen-image"):
            latents = bare._pack_latents(noise, 1, 16, lat, lat)
        else:
            latents = patchify(noise) if fam == "flux2" else noise
        sync(device)
        t0 = time.perf_counter()
        img = bare(prompt=PROMPT, height=size, width=size, num_inference_steps=steps, sigmas=sigmas,
                   latents=latents.to(device, dtype), output_type="np", **kw).images[0]
        sync(device)
        return time.perf_counter() - t0, img

    peak_reset(device)
    bare_call(1)
    bare_runs = [bare_call(100 + i) for i in range(reps)]
    bare_peak = peak_mb(device)
    ref = bare_runs[0][1]
    bare = None  # noqa: F841 - frees the bare pipeline before the service loads its own
    free(device)
    svc = Service(f"flow-{fam}", work, models, device, default_model=fam)
    services.append(svc)
    svc.ready()
    req = dict(prompt=PROMPT, model=fam, width=size, height=size, steps=steps, cfg_scale=FLOW_CFG[fam],
               sampler_name="Euler", scheduler_type="simple", fileType="png")
    t = time.perf_counter()
    svc.job(**req, seed=1)
    first_job_s = time.perf_counter() - t
    svc_runs = [svc.job(**req, seed=100 + i) for i in range(reps)]
    import base64
    import io

    ours = np.asarray(Image.open(io.BytesIO(base64.b64decode(svc_runs[0]["image"]))).convert("RGB"), dtype=np.float32)
    diff = np.abs(ours - np.rint(ref * 255))
    b, s_ = median([r[0] for r in bare_runs]), median([r["wall"] for r in svc_runs])
    row = {"family": fam, "size": size, "steps": steps, "build_s": round(build_s, 1), "bare_load_s": round(bare_load_s, 1),
           "service_first_job_s": round(first_job_s, 1), "bare_s_per_image": round(b, 4),
           "service_s_per_image": round(s_, 4), "service_vs_bare_speed": round(b / s_, 3),
           "bare_peak_vram_mb": bare_peak, "service_gpu_mb": svc.gpu_mb(),
           "image_mean_abs_diff": round(float(diff.mean()), 3), "image_max_abs_diff": float(diff.max())}
    run.results.setdefault("flow", []).append(row)
    log(f"   {fam}: bare {b:.3f} s, service {s_:.3f} s (x{b / s_:.3f}), |diff| mean {row['image_mean_abs_diff']}")
    svc.close()
    services.remove(svc)
    run.results.setdefault("service_log_tails", {})[svc.name] = svc.tail(2000)


def build_tiny(family: str, device: str):
    from diffusionapi.demo import BUILDERS

    return BUILDERS[family](0)


def folder_gb(path: Path) -> float:
    if path.is_file():
        return round(path.stat().st_size / 1e9, 3)
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9, 3)


def install_models(run: Run, models: Path, families, tiny: bool, device: str, single_file: bool = True) -> None:
    """Each family twice: ``<family>`` (diffusers folder) and ``<family>-file`` (single file)."""
    from tests.checkpoint_factory import save_original_checkpoint

    for fam in families:
        with run.section(f"build {fam}"):
            t = time.perf_counter()
            pipe = (build_tiny if tiny else build_full)(fam, device)
            sync(device)
            built = time.perf_counter() - t
            t = time.perf_counter()
            pipe.save_pretrained(models / fam, safe_serialization=True)
            saved_folder = time.perf_counter() - t
            t = time.perf_counter()
            # Tiny architectures differ from the shipped configs: they travel with a sidecar config.
            if single_file or fam == "sd15":
                save_original_checkpoint(pipe, models / f"{fam}-file.safetensors", with_config=tiny)
            saved_file = time.perf_counter() - t
            del pipe
            free(device)
            run.results["build"][fam] = {"build_s": round(built, 2), "save_folder_s": round(saved_folder, 2),
                                         "save_single_file_s": round(saved_file, 2),
                                         "folder_gb": folder_gb(models / fam),
                                         "single_file_gb": folder_gb(models / f"{fam}-file.safetensors")
                                         if (models / f"{fam}-file.safetensors").exists() else None}
            log(f"   {run.results['build'][fam]}")


def free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- bare diffusers

def bare_load(path: Path, family: str, device: str):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from diffusionapi.demo import _quiet

    _quiet()
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    cls = StableDiffusionPipeline if family == "sd15" else StableDiffusionXLPipeline
    kw = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False) if family == "sd15" else {}
    pipe = cls.from_pretrained(str(path), dtype=dtype, local_files_only=True, **kw).to(device)
    # The service's "Euler" with the "default" schedule: same number of UNet evaluations.
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    pipe.set_progress_bar_config(disable=True)
    sync(device)
    return pipe


def bare_call(pipe, size: int, steps: int, batch: int, seed: int, device: str) -> tuple[float, list]:
    import torch

    sync(device)
    t = time.perf_counter()
    images = pipe(PROMPT, negative_prompt="", num_inference_steps=steps, height=size, width=size,
                  guidance_scale=CFG_SCALE, num_images_per_prompt=batch,
                  generator=torch.Generator("cpu").manual_seed(seed)).images
    sync(device)
    return time.perf_counter() - t, images


def peak_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_mb(device: str) -> float | None:
    import torch

    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**20)
    return None


# ---------------------------------------------------------------------------- the service

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """`uvicorn diffusionapi.main:app` as a child process; one kept-alive client, long-polling."""

    def __init__(self, name: str, work: Path, models: Path, device: str, **settings):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        work = work / name
        work.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
               "DIFFUSIONAPI_MODELS_DIR": str(models), "DIFFUSIONAPI_LORAS_DIR": str(work / "loras"),
               "DIFFUSIONAPI_UPSCALERS_DIR": str(work / "upscalers"),
               "DIFFUSIONAPI_OUTPUTS_DIR": str(work / "out"), "DIFFUSIONAPI_QUEUE_DIR": str(work / "queue"),
               "DIFFUSIONAPI_MODEL_LABELS": str(work / "labels.json"), "DIFFUSIONAPI_DEVICE": device,
               "DIFFUSIONAPI_DEFAULT_MODEL": "sd15", "DIFFUSIONAPI_MAX_QUEUED_JOBS": "1000",
               **{f"DIFFUSIONAPI_{k.upper()}": str(v) for k, v in settings.items()}}
        self.log_path = work / "server.log"
        self._log = open(self.log_path, "wb")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "diffusionapi.main:app", "--host", "127.0.0.1",
                                      "--port", str(self.port), "--log-level", "warning"],
                                     env=env, cwd=work, stdout=self._log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(600, connect=10))

    def ready(self, timeout: float = 300) -> "Service":
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service {self.name} exited: {self.tail()}")
            try:
                if self.client.get("/hello").status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"service {self.name} did not start: {self.tail()}")

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def submit(self, client: httpx.Client | None = None, **req) -> str:
        r = (client or self.client).post("/txt2img", json=req)
        if r.status_code != 200:
            raise RuntimeError(f"POST /txt2img {r.status_code}: {r.text[:500]}")
        return r.json()["job_id"]

    def wait(self, job_id: str, client: httpx.Client | None = None) -> dict:
        c = client or self.client
        while True:
            body = c.get(f"/queue/{job_id}", params={"wait": 60}).json()
            if body.get("state") in ("done", "error", "cancelled"):
                return body

    def job(self, client: httpx.Client | None = None, **req) -> dict:
        t = time.perf_counter()
        body = self.wait(self.submit(client, **req), client)
        body["wall"] = time.perf_counter() - t
        if body["state"] != "done":
            raise RuntimeError(f"job failed: {body.get('error')}\n{self.tail()}")
        return body

    def gpu_mb(self) -> float | None:
        return process_gpu_mb(self.proc.pid)

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def process_gpu_mb(pid: int) -> float | None:
    """GPU memory the driver charges to ``pid`` (the CUDA context and the caching allocator's pool)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            if p.pid == pid and p.usedGpuMemory:
                return round(p.usedGpuMemory / 2**20)
    except Exception:  # noqa: BLE001 - not available everywhere (containers hide pids)
        return None
    return None


def request(family: str, size: int, steps: int, batch: int, seed: int, **extra) -> dict:
    req = dict(prompt=PROMPT, negative_prompt="", model=family, width=size, height=size, steps=steps,
               cfg_scale=CFG_SCALE, sampler_name="Euler", scheduler_type="default", seed=seed, fileType="jpg")
    if batch > 1:
        req["batch_size"] = batch
    req.update(extra)
    return req


def service_supports_batch_size(svc: Service) -> bool:
    """Whether this build knows the request field batch_size (several images of one job)."""
    r = svc.client.post("/txt2img", json={**request("sd15", 64, 1, 2, 0), "prompt": "probe"})
    if r.status_code != 200:
        return False
    body = r.json()
    svc.wait(body["job_id"])
    return "batch_size" not in (body.get("ignored_fields") or [])


def check_image(body: dict, size: int, batch: int) -> None:
    """The done response carries decodable images of the requested size (and count)."""
    import base64
    import io

    from PIL import Image

    imgs = [body["image"]] + [i["image"] for i in (body.get("images") or [])[1:]]
    if batch > 1 and body.get("images"):
        assert len(body["images"]) == batch, f"expected {batch} images, got {len(body['images'])}"
    for b64 in imgs:
        im = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert im.size == (size, size), im.size


# ---------------------------------------------------------------------------- sections

def speed_rows(run: Run, fam: str, pipe, svc: Service | None, size: int, steps: int, batch: int, reps: int,
               device: str, supports_batch: bool) -> None:
    """Bare and service at one shape, interleaved (bare, service, bare, ...) after a warm-up of each."""
    warm_steps = steps if batch == 1 else max(2, steps // 5)  # b1: a whole run, so clocks are up
    peak_reset(device)
    bare_call(pipe, size, warm_steps, batch, 1, device)
    bare_t, svc_t, svc_gen = [], [], []
    bare_images = None
    use_svc = svc is not None and (batch == 1 or supports_batch)
    if use_svc:
        svc.job(**request(fam, size, warm_steps, batch, 1))
    for i in range(reps):
        dt, bare_images = bare_call(pipe, size, steps, batch, 100 + i, device)
        bare_t.append(dt)
        if use_svc:
            body = svc.job(**request(fam, size, steps, batch, 100 + i))
            check_image(body, size, batch)
            svc_t.append(body["wall"])
            svc_gen.append(body["generation_time_sec"])
    assert bare_images and bare_images[0].size == (size, size)
    peak = peak_mb(device)
    for harness, times in (("bare diffusers", bare_t), ("service", svc_t)):
        if not times:
            continue
        m = median(times)
        row = {"family": fam, "size": size, "steps": steps, "batch": batch, "harness": harness, "runs_s": times,
               "s_per_call": round(m, 4), "s_per_image": round(m / batch, 4), "it_per_s": round(steps / m, 3),
               "images_per_s": round(batch / m, 3)}
        if harness == "bare diffusers":
            row["peak_vram_mb"] = peak
        else:
            row["worker_s_median"] = median(svc_gen)
            row["service_gpu_mb"] = svc.gpu_mb()
        run.results["speed"].append(row)
        log(f"   {fam} b{batch} {harness}: {row['s_per_image']:.3f} s/image, {row['it_per_s']:.2f} it/s")
    if svc is not None and not use_svc:
        run.results["skipped"].append(f"service {fam} batch {batch}: this build has no batch_size field")


def option_rows(run: Run, fam: str, pipe, size: int, steps: int, reps: int, device: str, attention: bool = True) -> None:
    """Each fast-mode option switched on in turn, on top of the previous ones (bare pipeline, batch 1).
    torch.compile is measured apart (``compile_rows``): it costs a minute or more of compiling."""
    import torch

    from diffusionapi.engine import fastmode

    unet = pipe.unet
    if fam == "sd15" and attention:
        from diffusers.models.attention_processor import AttnProcessor

        saved = unet.attn_processors
        unet.set_attn_processor(AttnProcessor())
        measure_option(run, fam, pipe, size, steps, reps, device, "SDPA attention (off: classic attention)", False)
        unet.set_attn_processor(saved)
    measure_option(run, fam, pipe, size, steps, reps, device, "baseline: bare diffusers (fp16 on CUDA, SDPA)", True)
    if device.startswith("cuda"):
        unet.to(memory_format=torch.channels_last)
        measure_option(run, fam, pipe, size, steps, reps, device, "+ channels-last UNet", True)
    fastmode.fuse_qkv(unet)
    measure_option(run, fam, pipe, size, steps, reps, device, "+ fused QKV projections", True)
    if fam == "sdxl":
        # Bare SDXL decodes in fp32 (force_upcast); the service decodes in fp16 and redoes it
        # in fp32 only if the result has NaNs (real SDXL VAE weights do; these random ones do not).
        pipe.vae.register_to_config(force_upcast=False)
        measure_option(run, fam, pipe, size, steps, reps, device, "+ VAE decode in fp16", True)


def measure_option(run: Run, fam, pipe, size, steps, reps, device, label: str, on: bool, extra: dict | None = None):
    bare_call(pipe, size, steps, 1, 1, device)  # warm: kernels picked, layouts, clocks up
    times = [bare_call(pipe, size, steps, 1, 200 + i, device)[0] for i in range(reps)]
    m = median(times)
    row = {"family": fam, "size": size, "steps": steps, "option": label, "on": on, "runs_s": times,
           "s_per_image": round(m, 4), "it_per_s": round(steps / m, 3), **(extra or {})}
    run.results["options"].append(row)
    log(f"   {fam} {label} {'on' if on else 'off'}: {row['it_per_s']:.2f} it/s")


def compile_rows(run: Run, fam: str, pipe, size: int, steps: int, reps: int, device: str) -> None:
    """torch.compile of the UNet on top of the other options (first call = compile time)."""
    import torch

    from diffusionapi.engine import fastmode

    unet = pipe.unet
    t = time.perf_counter()
    pipe.unet = torch.compile(unet, mode=None if fastmode.DEFAULT_COMPILE_MODE == "default"
                              else fastmode.DEFAULT_COMPILE_MODE, dynamic=False)
    bare_call(pipe, size, 2, 1, 1, device)
    compile_s = time.perf_counter() - t
    measure_option(run, fam, pipe, size, steps, reps, device, "+ torch.compile UNet", True,
                   {"compile_s": round(compile_s, 1)})
    pipe.unet = unet


def batching_run(svc: Service, fam: str, size: int, steps: int, clients: int, jobs_each: int) -> dict:
    """``clients`` threads, each with its own kept-alive client, each running ``jobs_each`` jobs in turn."""
    errors: list[str] = []
    walls: list[float] = []
    barrier = threading.Barrier(clients)

    def client(k: int):
        with httpx.Client(base_url=svc.url, timeout=httpx.Timeout(600, connect=10)) as c:
            barrier.wait()
            for j in range(jobs_each):
                try:
                    body = svc.job(c, **request(fam, size, steps, 1, 1000 + k * 100 + j,
                                                prompt=f"{PROMPT}, variation {k}-{j}"))
                    walls.append(body["wall"])
                except Exception as e:  # noqa: BLE001
                    errors.append(str(e)[:300])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t
    n = clients * jobs_each - len(errors)
    return {"clients": clients, "jobs": clients * jobs_each, "ok": n, "errors": errors[:3], "wall_s": round(dt, 3),
            "images_per_s": round(n / dt, 3), "job_latency_median_s": median(walls)}


# ---------------------------------------------------------------------------- main

def machine(device: str) -> dict:
    import diffusers
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "device": device,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    capability=f"{p.major}.{p.minor}")
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny random models (CPU check of the whole flow)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and sections (under 4 minutes on an H100)")
    ap.add_argument("--budget", type=float, default=None, help="seconds; sections that would overrun are skipped "
                    "(default 430, --quick 195, --tiny none); a section still running 40 s past it is stopped")
    ap.add_argument("--families", default="sd15,sdxl")
    ap.add_argument("--flow-families", default="", help="section flow: flux1,sd3,qwen-image,flux2 (full size: "
                    "Flux.1-dev, SD 3.5 Large, Qwen-Image, Flux.2 klein 4B, bf16; about 34, 26, 58 and 16 GB of "
                    "weights each)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile measurements")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--sections", default="speed,batch4,attention,options,batching,compile,fast,flow,"
                    "compile_cache,step_cache,quant,host_cache",
                    help="which to run (the model build always runs)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per figure (default 3, --quick 2)")
    ap.add_argument("--no-single-file", action="store_true", help="install SDXL as a folder only")
    ap.add_argument("--fast-options", default="channels_last,fused_qkv",
                    help="settings the fast-mode service turns on besides compile_unet")
    args = ap.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.budget is None and not args.tiny:
        args.budget = 195 if args.quick else 430
    families = [f for f in args.families.split(",") if f]
    shapes = TINY if args.tiny else FULL
    reps = args.reps or (1 if args.tiny else (2 if args.quick else 3))
    sections = set(args.sections.split(","))
    compile_ok = not args.no_compile and device.startswith("cuda")
    out = args.out or (Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT")
                       else ROOT / "benchmarks" / "results-gpu" / ("tiny.json" if args.tiny else "latest.json"))

    run = Run(args.budget, out)
    R = run.results
    R["machine"] = machine(device)
    R["mode"] = "tiny" if args.tiny else ("quick" if args.quick else "full")
    R["budget_s"] = args.budget
    R["settings"] = {"shapes": {f: {"size": shapes[f][0], "steps": shapes[f][1]} for f in families},
                     "sampler": "Euler, default (linspace) schedule", "cfg_scale": CFG_SCALE, "file_type": "jpg",
                     "repetitions": reps, "argv": sys.argv[1:]}
    log(f"GPU benchmark ({R['mode']}) on {R['machine'].get('gpu', device)}")
    work = Path(tempfile.mkdtemp(prefix="dapi-gpu-"))
    models = work / "models"
    services: list[Service] = []
    try:
        install_models(run, models, families, args.tiny, device, single_file=not (args.quick or args.no_single_file))
        fams = [f for f in families if f in R["build"]]

        # S1: the service with default settings, started now so it imports while bare diffusers loads.
        # One job at a time (MAX_BATCH_JOBS's default is 8 on CUDA): the per-job figures and the
        # batching section's baseline.
        s1 = Service("default", work, models, device, max_batch_jobs=1)
        services.append(s1)
        supports_batch = False
        pipes = {}
        for fam in fams:
            size, steps = shapes[fam]
            fam_reps = reps if fam == "sd15" else min(reps, 3)  # SDXL images take 2-3x longer
            with run.section(f"{fam}: bare diffusers vs service"):
                t = time.perf_counter()
                pipe = pipes[fam] = bare_load(models / fam, fam, device)
                R["load"].setdefault(fam, {})["bare_folder_s"] = round(time.perf_counter() - t, 2)
                s1.ready()
                if fam == fams[0]:
                    supports_batch = service_supports_batch_size(s1)  # also: CUDA initialised in the service
                    R["service_batch_size_field"] = supports_batch
                # Load times as the service reports them (load_time_sec): single file, then folder.
                names = ([(f"{fam}-file", "service_single_file_s")] if (models / f"{fam}-file.safetensors").exists()
                         else []) + [(fam, "service_folder_s")]
                for name, key in names:
                    body = s1.job(**request(name, size, 1, 1, 0))
                    R["load"][fam][key] = body["load_time_sec"]
                log(f"   load {R['load'][fam]}")
                speed_rows(run, fam, pipe, s1, size, steps, 1, fam_reps, device, supports_batch)
                reps4 = 1 if (args.tiny or args.quick or fam == "sdxl") else 2
                if "batch4" in sections and not (args.quick and fam == "sdxl") and run.allows(f"{fam} batch 4", 0 if args.tiny else
                                                                     (25 if fam == "sd15" else 45) * reps4):
                    speed_rows(run, fam, pipe, s1, size, steps, 4, reps4, device, supports_batch)
            if "options" in sections and not (args.quick and fam == "sdxl") and run.allows(f"options {fam}", 0 if args.tiny else
                                                                 (25 if fam == "sd15" else 45)):
                with run.section(f"{fam}: fast-mode options"):
                    option_rows(run, fam, pipe, size, steps, fam_reps, device, "attention" in sections)
            if fam != "sd15":
                del pipes[fam], pipe
                free(device)

        # Dynamic batching: the same clients against the default service, then one that batches.
        if "batching" in sections and "sd15" in fams and run.allows("dynamic batching", 0 if args.tiny else 55):
            size, steps = shapes["sd15"]
            jobs_each = 1 if args.tiny else 2
            with run.section("dynamic batching"):
                s1.job(**request("sd15", size, 2, 1, 0))  # resident again after SDXL
                solo = batching_run(s1, "sd15", size, steps, args.clients, jobs_each)
                s1.close()
                s2 = Service("batching", work, models, device, max_batch_jobs=args.clients, batch_wait_ms=BATCH_WAIT_MS)
                services.append(s2)
                s2.ready()
                s2.job(**request("sd15", size, 2, 1, 0))
                batched = batching_run(s2, "sd15", size, steps, args.clients, jobs_each)
                s2.close()
                R["batching"] = {"family": "sd15", "size": size, "steps": steps, "batch_wait_ms": BATCH_WAIT_MS,
                                 "max_batch_jobs_1": solo,
                                 f"max_batch_jobs_{args.clients}": batched,
                                 "speedup": round(batched["images_per_s"] / solo["images_per_s"], 3)}
                log(f"   batching {R['batching']}")
        s1.close()

        # torch.compile, in process (on top of the options above) and in the fast-mode service,
        # which compiles and warms up the measured shapes at start (the in-process compile fills
        # inductor's cache first, as a restarted server would find it).
        if "compile" in sections and compile_ok and "sd15" in pipes and run.allows("torch.compile sd15 (in process)", 80):
            with run.section("sd15: torch.compile option"):
                compile_rows(run, "sd15", pipes["sd15"], *shapes["sd15"], reps, device)
        pipes.clear()
        free(device)
        fast_fams = [f for f in fams if not (args.quick and f == "sdxl")] if "fast" in sections else []
        for k in range(len(fast_fams), 0, -1):  # as many families as the budget allows
            est = 0 if args.tiny else (30 + (150 if "sdxl" in fast_fams[:k] else 0) + 45 * (not compile_ok))
            if run.allows(f"fast-mode service {','.join(fast_fams[:k])}", est):
                fast_fams = fast_fams[:k]
                break
        else:
            fast_fams = []
        if fast_fams:
            with run.section("fast-mode service"):
                shapes_env = ",".join(f"{f}:{shapes[f][0]}x{shapes[f][0]}" for f in fast_fams)
                t = time.perf_counter()
                # Both models stay resident (cache 2): each keeps its compiled UNet.
                opts = {o: "true" for o in args.fast_options.split(",") if o}
                R["fast_service_settings"] = {**opts, "compile_unet": compile_ok, "warmup_shapes": shapes_env}
                s3 = Service("fast", work, models, device, compile_unet=str(compile_ok).lower(),
                             warmup_shapes=shapes_env, pipeline_cache_size=len(fast_fams), **opts)
                services.append(s3)
                s3.ready()
                for fam in fast_fams:
                    size, steps = shapes[fam]
                    s3.job(**request(fam, size, steps, 1, 1))  # waits for the start-up warm-up, then warm
                    if fam == fast_fams[0]:
                        R["fast_service_warmup_s"] = round(time.perf_counter() - t, 1)
                    times = [s3.job(**request(fam, size, steps, 1, 300 + i))["wall"] for i in range(reps)]
                    m = median(times)
                    R["fast_service"].append({"family": fam, "size": size, "steps": steps, "batch": 1, "runs_s": times,
                                              "s_per_image": round(m, 4), "it_per_s": round(steps / m, 3),
                                              "compile": compile_ok, "service_gpu_mb": s3.gpu_mb()})
                    log(f"   fast service {fam}: {steps / m:.2f} it/s")
                R["fast_service_warmup_total_s"] = round(time.perf_counter() - t, 1)
                s3.close()
        for fam in [f for f in args.flow_families.split(",") if f] if "flow" in sections else []:
            if run.allows(f"flow {fam}", 0 if args.tiny else 240):
                with run.section(f"flow {fam}: bare diffusers vs service"):
                    flow_section(run, work, fam, args.tiny, device, min(reps, 2), services)
        round2(run, args, sections, work, models, fams, device, shapes, services)
    except OutOfTime as e:
        R["errors"].append(str(e))
    finally:
        for s in services:
            try:
                s.close()
            except Exception:  # noqa: BLE001
                pass
            R.setdefault("service_log_tails", {})[s.name] = s.tail(4000)
        if hasattr(signal, "SIGALRM"):
            signal.alarm(0)
        run.save()
        shutil.rmtree(work, ignore_errors=True)
    print_table(R)
    log(f"\nJSON: {out}")
    return 0


def round2(run: Run, args, sections: set, work: Path, models: Path, fams: list, device: str, shapes: dict,
           services: list) -> None:
    """Issue 29's sections (benchmarks/gpu_round2.py): compile cache, step caching, quantized
    compute, host-RAM model switches."""
    import gpu_round2 as r2

    tiny = args.tiny
    flow_fams = [f for f in args.flow_families.split(",") if f]
    flow_models = work / "flow-models"
    jobs = {f: (shapes[f][0], shapes[f][1], {"cfg_scale": CFG_SCALE}) for f in fams}
    flow_shapes = FLOW_TINY if tiny else FLOW_FULL
    jobs.update({f: (flow_shapes[f][0], flow_shapes[f][1], {"cfg_scale": FLOW_CFG[f], "scheduler_type": "simple"})
                 for f in flow_fams})
    if "compile_cache" in sections and (tiny or device.startswith("cuda")) and \
            run.allows("compile cache", 0 if tiny else 420):
        with run.section("compile cache: cold vs warm start"):
            r2.compile_cache_section(run, work, tiny, device, fams)
    if ("step_cache" in sections or "quant" in sections) and flow_fams:
        for fam in flow_fams:  # the flow section saved them when it ran; else build them now
            if not (flow_models / fam / "model_index.json").exists() and run.allows(f"build {fam}", 0 if tiny else 120):
                with run.section(f"build {fam}"):
                    pipe = build_tiny(fam, device) if tiny else build_full_flow(fam, device)
                    pipe.save_pretrained(flow_models / fam, safe_serialization=True)
                    del pipe
                    free(device)
    if "step_cache" in sections and run.allows("step caching", 0 if tiny else 60 + 90 * len(flow_fams)):
        with run.section("step caching vs uncached"):
            pairs = [(f, models, "unet") for f in fams] + [(f, flow_models, "transformer") for f in flow_fams
                                                          if (flow_models / f).exists()]
            r2.step_cache_section(run, pairs, work, device, tiny, jobs, Service, request)
    if "quant" in sections and flow_fams and run.allows("quantized compute", 0 if tiny else 200 * len(flow_fams)):
        with run.section("quantized compute (torchao)"):
            r2.quant_section(run, flow_models, flow_fams, device, tiny, jobs)
    if "host_cache" in sections and "sd15" in fams and (models / "sd15-file.safetensors").exists() and \
            run.allows("host cache", 0 if tiny else 60):
        with run.section("model switch: disk vs host RAM"):
            r2.host_cache_section(run, work, models, device, tiny, Service, request, jobs)


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def print_table(R: dict) -> None:
    m = R["machine"]
    log(f"\nDiffusionAPI GPU benchmark ({R['mode']}): {m.get('gpu', m['device'])}, torch {m['torch']}, "
        f"diffusers {m['diffusers']}, {m['date']}, {R['elapsed_s']} s")
    log("| model | size | batch | bare diffusers s/image (it/s) | service s/image (it/s) | service / bare it/s | bare peak VRAM MB |")
    log("|---|---|---|---|---|---|---|")
    rows = {(r["family"], r["batch"], r["harness"]): r for r in R["speed"]}
    for (fam, batch, h), r in rows.items():
        if h != "bare diffusers":
            continue
        s = rows.get((fam, batch, "service"))
        log(f"| {fam} | {r['size']} | {batch} | {r['s_per_image']:.3f} ({r['it_per_s']:.2f}) | "
            + (f"{s['s_per_image']:.3f} ({s['it_per_s']:.2f}) | {ratio(s['it_per_s'], r['it_per_s'])} |" if s else "- | - |")
            + f" {r.get('peak_vram_mb') or '-'} |")
    if R["options"]:
        log("\n| model | fast-mode option (cumulative, bare pipeline, batch 1) | it/s | vs baseline |")
        log("|---|---|---|---|")
        base = {r["family"]: r["it_per_s"] for r in R["options"] if r["option"].startswith("baseline")}
        for r in R["options"]:
            extra = f" (compile {r['compile_s']} s)" if "compile_s" in r else ""
            log(f"| {r['family']} | {r['option']}{extra} | {r['it_per_s']:.2f} | {ratio(r['it_per_s'], base.get(r['family']))} |")
    if R["fast_service"]:
        log("\n| model | service, fast mode (batch 1) it/s | vs bare diffusers |")
        log("|---|---|---|")
        for r in R["fast_service"]:
            b = rows.get((r["family"], 1, "bare diffusers"))
            log(f"| {r['family']} | {r['it_per_s']:.2f} | {ratio(r['it_per_s'], b and b['it_per_s'])} |")
    if R["load"]:
        log("\n| model | bare from_pretrained s | service single file s | service folder s |")
        log("|---|---|---|---|")
        for fam, v in R["load"].items():
            log(f"| {fam} | {v.get('bare_folder_s', '-')} | {v.get('service_single_file_s', '-')} | {v.get('service_folder_s', '-')} |")
    b = R.get("batching")
    if b:
        keys = [k for k in b if k.startswith("max_batch_jobs_")]
        log(f"\ndynamic batching, {b['family']} {b['size']}, {b[keys[0]]['clients']} clients: "
            + ", ".join(f"{k}: {b[k]['images_per_s']} images/s" for k in keys) + f"; speed-up {b['speedup']}x")
    if R.get("flow"):
        log("\n| model | size | steps | bare diffusers s/image | service s/image | service / bare speed | "
            "bare peak VRAM MB | service GPU MB | image mean abs diff |")
        log("|---|---|---|---|---|---|---|---|---|")
        for r in R["flow"]:
            log(f"| {r['family']} | {r['size']} | {r['steps']} | {r['bare_s_per_image']:.3f} | "
                f"{r['service_s_per_image']:.3f} | {r['service_vs_bare_speed']:.3f} | {r['bare_peak_vram_mb'] or '-'} | "
                f"{r['service_gpu_mb'] or '-'} | {r['image_mean_abs_diff']} |")
    import gpu_round2

    gpu_round2.print_tables(R, log)
    if R["skipped"]:
        log("skipped: " + "; ".join(R["skipped"]))
    if R["errors"]:
        log("errors: " + "; ".join(R["errors"]))


if __name__ == "__main__":
    sys.exit(main())
