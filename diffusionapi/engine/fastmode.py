"""Fast mode: speed settings applied when a pipeline loads, warm-up shapes, and the VAE's fp16 policy.

What runs by default never changes an image beyond fp16 noise: fp16 weights on CUDA, PyTorch's
scaled-dot-product attention (diffusers' default in torch 2), and VAE decode/encode in fp16 with a
redo in fp32 (or bf16) only when the fp16 result has NaN/inf values, remembered per model so an
overflowing VAE (SDXL's) goes straight to the wider type afterwards. The rest are settings, each
measured by ``benchmarks/gpu.py``: channels-last UNet, fused QKV projections, ``torch.compile``.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import stable_diffusion_dir

log = logging.getLogger(__name__)

# Inductor's default mode: no CUDA graphs (they pin input buffers and break with LoRA/shape changes),
# no autotuning (minutes of start-up); the fusions are where most of the gain is.
DEFAULT_COMPILE_MODE = "default"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
UPCAST_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class FastMode:
    channels_last: bool = False
    fused_qkv: bool = False
    compile_unet: bool = False
    compile_mode: str = DEFAULT_COMPILE_MODE
    vae_fp16: bool = True
    vae_upcast_dtype: str = "float32"
    compile_cache_dir: str = ""  # "": torch's own default (a temp folder); see compile_cache_root

    @classmethod
    def from_settings(cls, settings) -> "FastMode":
        values = {k: getattr(settings, k) for k in cls.__dataclass_fields__ if hasattr(settings, k)}
        values["compile_cache_dir"] = str(compile_cache_root(settings))
        return cls(**values)


def compile_cache_root(settings) -> Path:
    """DIFFUSIONAPI_COMPILE_CACHE_DIR, else the ``compile-cache`` folder next to the models folder."""
    return stable_diffusion_dir(settings, "compile_cache_dir", "compile-cache")


def apply(pipe, device: torch.device, mode: FastMode) -> list[str]:
    """Put ``pipe`` (already on ``device``) into fast mode; returns what was switched on."""
    applied = []
    if getattr(pipe, "unet", None) is None:
        return applied  # the speed-ups here are for UNets; flow families' transformers run as loaded
    if device.type != "cuda":
        # channels-last and compile are CUDA speed-ups; fused QKV is exact everywhere, so it is
        # applied on every device (the CPU tests check it against the unfused model).
        if mode.fused_qkv and fuse_qkv(pipe.unet):
            applied.append("fused_qkv")
        return applied
    if mode.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        applied.append("channels_last")
    if mode.fused_qkv and fuse_qkv(pipe.unet):
        applied.append("fused_qkv")
    if mode.compile_unet:
        pipe.unet = compile_unet(pipe.unet, mode.compile_mode, mode.compile_cache_dir)
        applied.append(f"compile_unet({mode.compile_mode})")
    return applied


# ---------------------------------------------------------------------------- torch.compile and its disk cache

def use_compile_cache(root: str | Path) -> Path:
    """Inductor's caches (the FX graph cache, AOTAutograd's, Triton's kernels) under ``root``, one
    folder per torch build: a restart reuses every graph compiled before instead of compiling for
    minutes. Inductor keys each graph by its code, input shapes, dtypes, devices, its own config
    and the torch / Triton / CUDA versions, so a changed model, shape set or version compiles anew
    (and lands next to the old entries), never reuses a wrong one."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    folder = Path(root) / f"torch-{torch.__version__}"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder.resolve())  # read at each cache lookup
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return folder


def compile_unet(unet, compile_mode: str = DEFAULT_COMPILE_MODE, cache_dir: str | Path = ""):
    """``torch.compile`` of a UNet, its batch dimension dynamic, its spatial size static.

    Shapes: the batch (CFG's 2 x jobs of a dynamic batch) is marked dynamic at every call, so
    batch 2, 4, 8 ... share one compiled graph (a batch of 1 -- CFG scale 1 -- is its own: dynamo
    always specializes size 1); each image size compiles once (spatially dynamic convolution
    kernels are slower, and the sizes a server sees are few: ``WARMUP_SHAPES`` compiles them at
    start, the disk cache makes that quick after the first start)."""
    # not "import torch._dynamo": that makes torch a local name
    from torch import _dynamo as dynamo

    if cache_dir:
        use_compile_cache(cache_dir)
    # Every resident model and size is an entry for the same UNet forward code: past dynamo's
    # default of 8 it would silently run eager, so a server gets room for many.
    dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
    dynamo.config.automatic_dynamic_shapes = False  # a new size compiles a static graph, not a dynamic one
    compiled = torch.compile(unet, mode=None if compile_mode == "default" else compile_mode)
    compiled.register_forward_pre_hook(_batch_dynamic, with_kwargs=True)
    return compiled


def _batch_dynamic(module, args, kwargs):
    """Marks dim 0 of every input with the sample's batch (the sample, timesteps, text embeddings,
    SDXL's added conditioning) dynamic: one unmarked input would make each batch size a new graph."""
    sample = kwargs.get("sample", args[0] if args else None)
    if not torch.is_tensor(sample) or sample.shape[0] < 2:
        return
    batch = sample.shape[0]

    def mark(value):
        if torch.is_tensor(value):
            if value.dim() > 0 and value.shape[0] == batch:
                torch._dynamo.maybe_mark_dynamic(value, 0)
        elif isinstance(value, dict):
            for v in value.values():
                mark(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                mark(v)

    mark(list(args))
    mark(kwargs)


# ---------------------------------------------------------------------------- fused QKV

def _base(unet):
    return getattr(unet, "_orig_mod", unet)  # the module under a torch.compile wrapper


def fuse_qkv(unet) -> bool:
    """One matmul for q, k and v (k and v for cross-attention) instead of three. The unfused
    projections stay, so LoRA jobs can switch back (``set_fused``): LoRA adapters wrap to_q/to_k/to_v."""
    unet = _base(unet)
    if getattr(unet, "_dapi_fused", None) is not None:
        return True
    try:
        with torch.no_grad():
            unet.fuse_qkv_projections()
    except (ValueError, AttributeError) as e:  # e.g. added-KV attention: not supported by diffusers
        log.info("fused QKV not available for this UNet: %s", e)
        return False
    unet._dapi_fused = unet.attn_processors  # the fused processors, to switch back to
    unet._dapi_fused_on = True
    return True


def set_fused(unet, on: bool) -> None:
    """Switch a fused UNet between its fused and its original attention processors."""
    if unet is None:
        return
    unet = _base(unet)
    fused = getattr(unet, "_dapi_fused", None)
    if fused is None or unet._dapi_fused_on == on:
        return
    unet.set_attn_processor(fused if on else unet.original_attn_processors)
    unet._dapi_fused_on = on


def is_fused(unet) -> bool:
    return bool(getattr(_base(unet), "_dapi_fused_on", False))


# ---------------------------------------------------------------------------- VAE precision

def vae_run(loaded, vae, fn, mode: FastMode):
    """``fn(vae)`` -> tensor, in the VAE's fp16 first (unless ``mode.vae_fp16`` is off or this model
    already overflowed), then once more in the upcast type if the result is not finite.

    ``loaded.vae_upcast`` remembers the overflow for the model. With ``vae_fp16`` off, the config's
    ``force_upcast`` decides, as diffusers' SDXL pipeline does."""
    wide = UPCAST_DTYPES.get(mode.vae_upcast_dtype, torch.float32)
    if vae.dtype != torch.float16:
        return fn(vae)
    first_wide = getattr(loaded, "vae_upcast", False) or (
        not mode.vae_fp16 and bool(getattr(vae.config, "force_upcast", False)))
    if not first_wide:
        out = fn(vae)
        if torch.isfinite(out).all():
            return out
        log.info("model %s: the VAE overflowed in fp16; it runs in %s from now on",
                 getattr(getattr(loaded, "entry", None), "name", "?"), mode.vae_upcast_dtype)
        try:
            loaded.vae_upcast = True
        except AttributeError:
            pass
    vae.to(wide)
    try:
        return fn(vae)
    finally:
        vae.to(torch.float16)


# ---------------------------------------------------------------------------- warm-up shapes

_SHAPE = re.compile(r"^(?:(?P<model>[^:]+):)?(?P<w>\d+)x(?P<h>\d+)(?:x(?P<n>\d+))?$")


@dataclass(frozen=True)
class WarmupShape:
    model: str | None  # None: the default model
    width: int
    height: int
    batch: int = 1


def parse_warmup_shapes(text: str) -> list[WarmupShape]:
    """``"[model:]WIDTHxHEIGHT[xBATCH], ..."``, e.g. ``"sd15:512x512,sd15:512x512x4,sdxl:1024x1024"``."""
    out = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        m = _SHAPE.match(item)
        if not m:
            raise ValueError(f"warmup_shapes: {item!r} is not [model:]WIDTHxHEIGHT[xBATCH]")
        n = int(m["n"] or 1)
        if n < 1 or int(m["w"]) < 8 or int(m["h"]) < 8:
            raise ValueError(f"warmup_shapes: {item!r} has a size under 8 or a batch under 1")
        out.append(WarmupShape(m["model"].strip() if m["model"] else None, int(m["w"]), int(m["h"]), n))
    return out
