"""Models evicted from the device kept in host RAM, so switching back is a copy, not a disk load.

The pipeline cache (engine/pipelines.py) holds the models on the device; when it evicts one, the
whole loaded pipeline (weights, adapters, fused projections, the scheduler config) moves here
instead of being dropped: its weights go to host memory -- pinned on CUDA, so the copy back runs
at the bus's full speed (``non_blocking``) -- and the next job for that model moves it back.
Least recently used first out, by size in bytes (``DIFFUSIONAPI_HOST_CACHE_GB``). On a CPU-only
box the device *is* host memory: the model simply stays in RAM, which is what the tests use.

A text encoder or VAE that several models share (engine/sharedparts.py) counts once in the size,
and stays on the device while a resident model still uses it.

A refiner that borrows its base's VAE and text encoder is not kept (its borrowed parts move with
the base); a model loaded with CPU offload is managed by accelerate's hooks and is not kept either.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict

import torch

log = logging.getLogger(__name__)

# Auto size on CUDA boxes: a quarter of the machine's RAM, at most this many GB (a few SDXL /
# Flux pipelines); 0 on CPU-only boxes, where the device cache already lives in RAM.
AUTO_FRACTION = 0.25
AUTO_MAX_GB = 64.0


def auto_capacity_gb(cuda: bool) -> float:
    if not cuda:
        return 0.0
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0.0
    return round(min(ram * AUTO_FRACTION / 2**30, AUTO_MAX_GB), 1)


def _modules(pipe) -> list[tuple[str, torch.nn.Module]]:
    return [(n, c) for n, c in getattr(pipe, "components", {}).items() if isinstance(c, torch.nn.Module)]


def pipeline_bytes(*pipes) -> int:
    """Bytes of the pipelines' weights, a tensor they share counted once."""
    seen, total = set(), 0
    for module in {id(m): m for pipe in pipes for _, m in _modules(pipe)}.values():
        for t in list(module.parameters()) + list(module.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def _to_host(pipe, pin: bool, leave=frozenset()) -> None:
    for _, module in _modules(pipe):
        if id(module) in leave:
            continue
        module.to("cpu")
        if pin:
            for t in list(module.parameters()) + list(module.buffers()):
                if not t.is_pinned():
                    t.data = t.data.pin_memory()


def _to_device(pipe, device: torch.device) -> None:
    for _, module in _modules(pipe):
        module.to(device, non_blocking=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HostCache:
    """Evicted ``LoadedModel`` objects by name, LRU by bytes. Only the worker thread calls it
    (under the pipeline cache's lock)."""

    def __init__(self, capacity_bytes: int, device: torch.device):
        self.capacity = max(0, int(capacity_bytes))
        self.device = device
        self.pin = device.type == "cuda"
        self._items: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self.hits = 0    # models served from here (a device copy instead of a disk load)
        self.misses = 0  # loads that found nothing here while the cache was on
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @property
    def used(self) -> int:
        return pipeline_bytes(*(loaded.pipe for loaded, _ in self._items.values()))

    def names(self) -> list[str]:
        return list(self._items)

    def put(self, name: str, loaded, in_use=frozenset()) -> bool:
        """Keep an evicted model; False when it cannot be kept (too big, off, borrowed parts).
        Its modules whose ids are in ``in_use`` (shared with resident models) stay where they are."""
        self._items.pop(name, None)
        if not self.enabled or getattr(loaded, "borrowed_from", None) or _offloaded(loaded.pipe):
            return False
        size = pipeline_bytes(loaded.pipe)
        if size > self.capacity:
            log.info("model %s (%.1f GB) is larger than the host cache: dropped", name, size / 2**30)
            return False
        while self._items and pipeline_bytes(loaded.pipe, *(it.pipe for it, _ in self._items.values())) \
                > self.capacity:
            old, _ = self._items.popitem(last=False)
            self.evictions += 1
            log.info("host cache: dropping model %s", old)
        if self.device.type != "cpu":
            _to_host(loaded.pipe, self.pin, in_use)
        self._items[name] = (loaded, size)
        log.info("model %s kept in host RAM (%.2f GB%s)", name, size / 2**30, ", pinned" if self.pin else "")
        return True

    def take(self, name: str, path) -> object | None:
        """The model ``name`` from ``path``, moved back to the device, or None (counted as a miss)."""
        if not self.enabled:
            return None
        item = self._items.pop(name, None)
        if item is None or item[0].entry.path != path:
            self.misses += 1
            _count("miss")
            return None
        loaded = item[0]
        if self.device.type != "cpu":
            _to_device(loaded.pipe, self.device)
        self.hits += 1
        _count("hit")
        return loaded

    def clear(self) -> None:
        self._items.clear()


def _offloaded(pipe) -> bool:
    return any(hasattr(m, "_hf_hook") for _, m in _modules(pipe))


def _count(result: str) -> None:
    from .. import metrics

    metrics.HOST_CACHE.labels(result).inc()
