"""Text encoders and VAEs built from component files, one object for every pipeline that uses the file.

Flux.1 / SD 3.x transformer-only files take their text encoders and VAE from component files in
stable_diffusion/text_encoders/ and stable_diffusion/vae/ (engine/convert_flow.py), and several
models usually name the same clip_l / t5xxl / ae. The registry builds each (file, role, dtype)
once; every pipeline that loads it holds that same module: one T5 in memory however many Flux
models are resident, in the device cache or in the host cache (engine/hostcache.py, which moves a
shared module to host RAM only when no resident model uses it, and counts its bytes once).

The reference count is Python's own: the registry keeps weak references, so a shared module lives
exactly as long as some pipeline holds it -- evicting one model keeps it for the others, dropping
the last one frees it -- whichever path drops a pipeline (eviction, the host cache's LRU, a model
replaced on disk). A file is the same file while its resolved path, size and mtime are.

A shared module is never changed in place: a LoRA that patches a text encoder first gives its
pipeline a private copy built from the file again (``private_copy``, called by engine/loras.py),
so the LoRA cannot reach the other models. CPU offload (accelerate's per-pipeline hooks) does not
share (the pipeline cache passes no registry then).
"""
from __future__ import annotations

import logging
import weakref
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)


def file_identity(path: Path) -> tuple[str, int, int]:
    resolved = Path(path).resolve()
    st = resolved.stat()
    return str(resolved), st.st_size, st.st_mtime_ns


class SharedParts:
    """Modules built from component files, by (file identity, role, dtype). Only the worker thread
    calls it (pipelines load under the pipeline cache's lock)."""

    def __init__(self):
        self._modules: dict[tuple, weakref.ref] = {}
        # module -> (key, build): how to build another copy of it, for ``private_copy``
        self._made: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.builds: Counter[str] = Counter()  # builds per resolved file path: tests read it

    def get(self, path: Path, role: str, dtype: torch.dtype, build: Callable[[], torch.nn.Module]):
        """The module ``build()`` makes from ``path`` in ``role`` (e.g. "clip_l:projection"), the one
        already built when a pipeline still holds it."""
        key = (*file_identity(path), role, str(dtype))
        ref = self._modules.get(key)
        module = ref() if ref is not None else None
        if module is not None:
            log.info("sharing %s (%s) with the models already using it", Path(path).name, role)
            return module
        module = self._build(key, build)
        self._modules[key] = weakref.ref(module, lambda _, k=key: self._forget(k))
        self._made[module] = (key, build)
        return module

    def _build(self, key: tuple, build):
        self.builds[key[0]] += 1
        return build()

    def _forget(self, key: tuple) -> None:
        ref = self._modules.get(key)
        if ref is not None and ref() is None:
            del self._modules[key]

    def is_shared(self, module) -> bool:
        return isinstance(module, torch.nn.Module) and module in self._made

    def private_copy(self, module):
        """A new module built from the same file as the shared ``module`` (not registered: the
        caller's to change), on its device."""
        key, build = self._made[module]
        copy = self._build(key, build)
        return copy.to(next(module.parameters()).device)

    def live(self) -> list[torch.nn.Module]:
        return [m for ref in list(self._modules.values()) if (m := ref()) is not None]
