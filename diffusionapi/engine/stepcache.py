"""Step caching: reuse a denoiser's work between sampler steps (opt-in per job; docs/performance.md).

The methods and their knobs are one table, ``vocabulary.STEP_CACHE_METHODS``. Transformers (the
flow families) use diffusers' cache hooks -- First Block Cache and TaylorSeer -- attached to the
resident transformer for one job and removed after it. UNets use DeepCache (Ma et al. 2023, written
here, small): the UNet's high-level features change slowly between steps, so on a full evaluation
every block runs and the outputs of the deep blocks (every down block but the first, the mid block,
every up block but the last) are kept; on the next ``interval - 1`` evaluations only the outermost
down block, the last up block and the ends (conv_in, conv_out) run, the deep blocks answering with
the kept outputs -- the last up block gets the fresh skip features of the first down block plus the
kept deep features, which is DeepCache's shallowest branch.

A job's run: ``StepCacheRun(loaded, spec)`` attaches, ``begin_stage()`` at the start of every
sampling run (the first pass, each batch of ``n_iter``, the hires pass: their states must not mix),
``close()`` detaches, leaving the model exactly as it was (tests check an uncached job after a
cached one equals the plain image).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from ..vocabulary import StepCache

log = logging.getLogger(__name__)


class StepCacheRun:
    """One job's step caching on its base model's denoiser."""

    def __init__(self, loaded, spec: StepCache):
        self.spec = spec
        self.module = loaded.denoiser_module
        base = getattr(self.module, "_orig_mod", self.module)  # under a torch.compile wrapper
        if spec.method == "deepcache":
            self._impl = _DeepCache(base, int(spec.value))
        else:
            self._impl = _DiffusersCache(base, spec)

    def serves(self, loaded) -> bool:
        return loaded.denoiser_module is self.module

    def begin_stage(self) -> None:
        self._impl.reset()

    @property
    def stats(self) -> dict:
        return self._impl.stats()

    def close(self) -> None:
        self._impl.close()
        log.info("step cache %s: %s", self.spec.infotext, self.stats)


# ---------------------------------------------------------------------------- transformers: diffusers' hooks

class _DiffusersCache:
    def __init__(self, transformer, spec: StepCache):
        from diffusers.hooks import HookRegistry, TaylorSeerCacheConfig, apply_taylorseer_cache

        self.transformer = transformer
        if spec.method == "first_block":
            from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK

            _first_block_cache(transformer, float(spec.value))
            self.hook_names = (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK)
        elif spec.method == "taylorseer":
            from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

            apply_taylorseer_cache(transformer, TaylorSeerCacheConfig(cache_interval=int(spec.value),
                                                                      taylor_factors_dtype=transformer.dtype))
            self.hook_names = (_TAYLORSEER_CACHE_HOOK,)
        else:
            raise ValueError(f"{spec.method} is not a transformer step cache")
        self.registry = HookRegistry.check_if_exists_or_initialize(transformer)
        self.registry.invalidate_child_registries_cache()  # new hooks on child blocks (diffusers' CacheMixin does it)
        self.reset()

    def reset(self) -> None:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        self.registry.reset_stateful_hooks(recurse=True)
        # The hooks keep their state per named context; our denoiser runs the CFG rows as one batch,
        # so one context holds the whole evaluation.
        _set_cache_context(self.transformer, CacheContext("cond"))

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        from diffusers.hooks.hooks import _set_cache_context

        _set_cache_context(self.transformer, None)
        for name in self.hook_names:
            self.registry.remove_hook(name, recurse=True)
        self.registry.invalidate_child_registries_cache()


def _first_block_cache(transformer, threshold: float) -> None:
    """diffusers' ``apply_first_block_cache``, except that a last block which returns no text
    stream (SD 3's ``context_pre_only`` block) stays outside the cache and always runs: diffusers'
    tail hook would subtract from its missing text output."""
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
    from diffusers.hooks.first_block_cache import (FBCSharedBlockState, StateManager, _apply_fbc_block_hook,
                                                   _apply_fbc_head_block_hook)

    blocks = [b for name, sub in transformer.named_children()
              if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(sub, torch.nn.ModuleList) for b in sub]
    if blocks and getattr(blocks[-1], "context_pre_only", False):
        blocks = blocks[:-1]
    if len(blocks) < 2:
        raise ValueError("first_block step caching needs at least two cacheable transformer blocks")
    state = StateManager(FBCSharedBlockState, (), {})
    _apply_fbc_head_block_hook(blocks[0], state, threshold)
    for block in blocks[1:-1]:
        _apply_fbc_block_hook(block, state)
    _apply_fbc_block_hook(blocks[-1], state, is_tail=True)


# ---------------------------------------------------------------------------- UNets: DeepCache

class _DeepCache:
    def __init__(self, unet, interval: int):
        self.unet = unet
        self.interval = max(1, int(interval))
        deep = [*unet.down_blocks[1:], unet.mid_block, *unet.up_blocks[:-1]]
        self.deep = [m for m in deep if m is not None]
        for i, block in enumerate(self.deep):
            block.forward = self._deep_forward(i, block.forward)  # an instance attribute: close() deletes it
        self._pre = unet.register_forward_pre_hook(self._on_call, with_kwargs=True)
        self.full = self.reused = 0
        self.reset()

    def reset(self) -> None:
        self.kept: dict[tuple[int, int], object] = {}  # (call in the evaluation, deep block) -> its output
        self.kept_shape: dict[int, tuple] = {}
        self.last_t = None
        self.evaluation = -1
        self.call = 0
        self.reuse = False

    def _on_call(self, module, args, kwargs):
        sample = kwargs.get("sample", args[0] if args else None)
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = float(t.reshape(-1)[0]) if torch.is_tensor(t) else float(t)
        if t != self.last_t:  # a new model evaluation: each has its own timestep
            self.last_t, self.call = t, 0
            self.evaluation += 1
        else:
            self.call += 1  # one evaluation may call the UNet several times (CFG chunks)
        shape = tuple(sample.shape)
        self.reuse = self.evaluation % self.interval != 0 and self.kept_shape.get(self.call) == shape
        if self.reuse:
            self.reused += 1
        else:
            self.full += 1
            self.kept_shape[self.call] = shape

    def _deep_forward(self, index: int, forward):
        def run(*args, **kwargs):
            key = (self.call, index)
            if self.reuse:
                return self.kept[key]
            out = forward(*args, **kwargs)
            self.kept[key] = out
            return out
        return run

    def stats(self) -> dict:
        return {"full_calls": self.full, "reused_calls": self.reused}

    def close(self) -> None:
        self._pre.remove()
        for block in self.deep:
            del block.forward
        self.kept = {}


# ---------------------------------------------------------------------------- measuring the work skipped

@contextmanager
def count_attention(module):
    """Counts the attention layers that run inside ``module`` (calls of every ``to_q`` projection):
    a skipped block or a predicted attention output does not call it. Tests and benchmarks use it to
    show the work a step cache skipped."""
    calls = {"n": 0}

    def hit(*_):
        calls["n"] += 1

    base = getattr(module, "_orig_mod", module)
    handles = [m.register_forward_pre_hook(hit) for name, m in base.named_modules() if name.endswith(".to_q")]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()
