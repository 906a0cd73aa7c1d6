"""Loading pipelines and keeping them resident: a small LRU keyed by model name."""
from __future__ import annotations

import dataclasses
import gc
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..families import FamilySpec, folder_pipeline, spec
from ..vocabulary import SDXL_REFINER, ModelEntry, ModelFormat, sd15_loader_kwargs
from . import fastmode
from .fastmode import FastMode
from .flow import FlowModelSigmas, FlowShift
from .kdiffusion import ModelSigmas

log = logging.getLogger(__name__)


def pick_device(setting: str) -> torch.device:
    if setting and setting != "auto":
        return torch.device(setting)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def dtype_for(device: torch.device) -> torch.dtype:
    # fp16 halves memory and doubles speed on GPUs; CPUs have no fast fp16 kernels.
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


@dataclass
class LoadedModel:
    entry: ModelEntry
    pipe: object
    sigmas: ModelSigmas
    scheduler_config: dict
    loras: dict = field(default_factory=dict)  # adapter bookkeeping, owned by engine.loras
    borrowed_from: str | None = None  # the base whose VAE/text_encoder_2 a refiner uses
    vae_upcast: bool = False  # its VAE overflowed in fp16 once: it runs in the wider type (fastmode.vae_run)
    flow: FlowModelSigmas | None = None  # flow-matching families: sigmas per image size (engine/flow.py)
    preview_factors: object = None  # latent -> RGB fit of its VAE, when its family has no published one
    shared: object = None  # the SharedParts its component-file modules come from (engine/sharedparts.py)

    @property
    def is_flow(self) -> bool:
        return self.flow is not None

    def sigmas_at(self, width: int, height: int, steps: int | None = None):
        """The noise levels for an image of this size (a flow model's shift depends on it, and
        Flux.2's on the step count of the schedule too)."""
        return self.flow.at(width, height, steps) if self.flow is not None else self.sigmas

    @property
    def denoiser_module(self):
        """The network that denoises: the UNet, or a flow family's transformer."""
        pipe = self.pipe
        return getattr(pipe, "unet", None) if getattr(pipe, "unet", None) is not None else pipe.transformer

    @property
    def family(self) -> str:
        return self.entry.family

    @property
    def spec(self) -> FamilySpec:
        return spec(self.entry.family)

    @property
    def xl(self) -> bool:
        """Prompts go through SDXL's two-encoder (or the refiner's CLIP-G) conditioning."""
        return self.spec.conditioning != "clip"

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def ztsnr(self) -> bool:
        return bool(self.scheduler_config.get("rescale_betas_zero_snr", False))


def _pipeline_class(family: str, folder: Path | None = None):
    import diffusers

    fam = spec(family)
    if fam.runnable:
        raise ValueError(fam.runnable)
    named = folder_pipeline(folder) if folder is not None and fam.pipeline_variants else None
    return getattr(diffusers, named if named in fam.pipeline_variants else fam.pipeline)


def scheduler_for_entry(scheduler, entry: ModelEntry):
    """The loaded scheduler, switched to v-prediction / zero-terminal-SNR when the file says so
    and its config does not: NoobAI-style single files carry ``v_pred`` / ``ztsnr`` marker keys
    that diffusers ignores. Never the other way: an entry made elsewhere (a cluster catalog)
    with the defaults leaves a folder's own config alone."""
    config = dict(scheduler.config)
    changes = {}
    if entry.prediction == "v_prediction" and config.get("prediction_type") != "v_prediction":
        changes["prediction_type"] = "v_prediction"
    if entry.ztsnr and not config.get("rescale_betas_zero_snr"):
        changes["rescale_betas_zero_snr"] = True
    if not changes:
        return scheduler
    return type(scheduler).from_config({**config, **changes})


def load_pipeline(entry: ModelEntry, device: torch.device, dtype: torch.dtype, *, share_from=None,
                  cpu_offload: bool = False, fast: FastMode = FastMode(), shared=None) -> LoadedModel:
    """Load a model offline. ``share_from`` (an SDXL base) lends its VAE and text_encoder_2
    to a refiner when they are the same architecture, so the two stay one copy in memory;
    ``shared`` (engine/sharedparts.py) holds the text encoders and VAEs built from component
    files, one module per file for every model that names it."""
    cls = _pipeline_class(entry.family, None if entry.format == ModelFormat.SINGLE_FILE else Path(entry.path))
    dtype = family_dtype(entry.family, device, dtype)
    kwargs: dict = dict(dtype=dtype, local_files_only=True, **sd15_loader_kwargs(entry.family))
    if entry.format == ModelFormat.SINGLE_FILE:
        from .checkpoints import load_single_file

        pipe = load_single_file(cls, entry, dtype, shared)
    else:
        if share_from is not None and entry.family == SDXL_REFINER:
            kwargs.update(_shareable(share_from.pipe, Path(entry.path)))
        variant = _weights_variant(Path(entry.path))
        if variant:
            kwargs["variant"] = variant
        pipe = cls.from_pretrained(str(entry.path), **kwargs)
    if entry.modules and (entry.format != ModelFormat.SINGLE_FILE or spec(entry.family).prediction != "flow"):
        from .convert_flow import replace_vae  # sd_vae / a VAE module on a model with its own VAE

        pipe.vae = replace_vae(pipe.vae, entry.modules, dtype)
    _check_no_meta(pipe, entry)
    pipe.scheduler = scheduler_for_entry(pipe.scheduler, entry)
    pipe.set_progress_bar_config(disable=True)
    if cpu_offload and device.type == "cuda":
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
        fastmode.apply(pipe, device, fast)
    config = dict(pipe.scheduler.config)
    lender = share_from.entry.name if share_from is not None and entry.family == SDXL_REFINER else None
    fam = spec(entry.family)
    if fam.prediction == "flow":
        shift = FlowShift.from_scheduler_config(config)
        if fam.empirical_shift:
            shift = dataclasses.replace(shift, empirical=True)
        flow = FlowModelSigmas(shift, vae_scale=fam.vae_scale_factor)
        return LoadedModel(entry, pipe, flow.at(fam.size, fam.size), config, flow=flow, shared=shared)
    return LoadedModel(entry, pipe, ModelSigmas.from_scheduler_config(config), config, borrowed_from=lender,
                       shared=shared)


def family_dtype(family: str, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The cache's dtype, or the family's own on GPUs (bfloat16 for Flux, whose activations
    overflow fp16)."""
    want = spec(family).gpu_dtype
    if dtype == torch.float16 and want == "bfloat16" and device.type == "cuda":
        return torch.bfloat16
    return dtype


def _weights_variant(folder: Path) -> str | None:
    """"fp16" when the UNet ships only as a variant file (hub downloads made with variant="fp16")."""
    unet = folder / "unet"
    if any(unet.glob("diffusion_pytorch_model.safetensors")) or any(unet.glob("diffusion_pytorch_model.bin")) \
            or any(unet.glob("diffusion_pytorch_model.safetensors.index.json")):
        return None
    for f in sorted(unet.glob("diffusion_pytorch_model.*.safetensors")) + sorted(unet.glob("diffusion_pytorch_model.*.bin")):
        parts = f.name.split(".")
        if len(parts) == 3:  # diffusion_pytorch_model.<variant>.<ext>
            return parts[1]
    return None


def _shareable(base_pipe, refiner_dir: Path) -> dict:
    import json

    shared = {}
    for name in ("vae", "text_encoder_2"):
        part = getattr(base_pipe, name, None)
        cfg = refiner_dir / name / "config.json"
        if part is None or not cfg.exists():
            continue
        theirs = {k: v for k, v in json.loads(cfg.read_text()).items() if not k.startswith("_")}
        ours = {k: v for k, v in part.config.to_dict().items() if not k.startswith("_")} \
            if hasattr(part.config, "to_dict") else {k: v for k, v in dict(part.config).items() if not k.startswith("_")}
        if all(ours.get(k) == v for k, v in theirs.items() if k not in ("torch_dtype", "transformers_version", "dtype")):
            shared[name] = part
    return shared


def _check_no_meta(pipe, entry: ModelEntry) -> None:
    # A partial checkpoint "loads" with parameters left on the meta device and then
    # generates garbage; refuse it here with a message naming the file.
    for name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            for pname, p in comp.named_parameters():
                if p.device.type == "meta":
                    raise ValueError(f"model {entry.name!r} is incomplete: {name}.{pname} missing from {entry.path}")


class PipelineCache:
    """Resident pipelines, least recently used evicted first. Only the worker thread calls it."""

    def __init__(self, device: torch.device, capacity: int = 1, *, cpu_offload=False, fast: FastMode = FastMode(),
                 host_cache_bytes: int = 0):
        from .hostcache import HostCache
        from .sharedparts import SharedParts

        self.device = device
        self.dtype = dtype_for(device)
        self.capacity = capacity
        self.options = dict(cpu_offload=cpu_offload, fast=fast)
        self._items: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # how many loads from disk happened: tests and benchmarks read it
        # Component-file modules shared by the models naming the same file; not with CPU offload,
        # whose hooks belong to one pipeline.
        self.shared = None if cpu_offload else SharedParts()
        # Evicted models kept in host RAM (engine/hostcache.py); off with 0 or with CPU offload.
        self.host = HostCache(0 if cpu_offload else host_cache_bytes, device)

    def is_loaded(self, name: str) -> bool:
        return name in self._items

    def resident(self) -> list[str]:
        return list(self._items)

    def get(self, entry: ModelEntry, *, keep: tuple[str, ...] = (), share_from: LoadedModel | None = None) -> LoadedModel:
        with self._lock:
            item = self._items.get(entry.name)
            if item is not None and (item.entry.path, item.entry.modules) == (entry.path, entry.modules):
                self._items.move_to_end(entry.name)
                return item
            if item is not None:
                self._evict(entry.name)
            # Make room first, so the old model's memory is free before the new one loads. A job
            # that needs several models at once (base + refiner) may exceed the capacity.
            needed = set(keep) | {entry.name}
            while len(self._items) >= max(self.capacity, len(needed)):
                victim = next((n for n in self._items if n not in needed), None)
                if victim is None:
                    break
                self._evict(victim)
            loaded = self.host.take(entry.name, entry.path)
            if loaded is None:
                loaded = load_pipeline(entry, self.device, self.dtype, share_from=share_from, shared=self.shared,
                                       **self.options)
                self.loads += 1
            self._items[entry.name] = loaded
            return loaded

    def _evict(self, name: str) -> None:
        item = self._items.pop(name)
        log.info("unloading model %s", name)
        # A refiner holding this model's VAE/text encoder would keep them alive: it goes too.
        for other in [n for n, it in self._items.items() if it.borrowed_from == name]:
            self._items.pop(other)
        # A module the remaining models share (engine/sharedparts.py) stays on the device.
        self.host.put(name, item, in_use={id(m) for it in self._items.values() for m in _modules(it.pipe)})
        del item
        free_memory()


def _modules(pipe) -> list:
    return [c for c in getattr(pipe, "components", {}).values() if isinstance(c, torch.nn.Module)]


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
