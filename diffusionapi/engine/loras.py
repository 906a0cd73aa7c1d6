"""LoRAs on a resident pipeline: loaded once as named adapters, switched by adapter weights.

Scales are applied only through ``set_adapters`` weights, never through a call's
``cross_attention_kwargs`` (that sets pipe._lora_scale, which silently rescales every
later text-encoder load). A job without LoRAs disables them, which gives exactly the
base model's pixels.

A text encoder that several models share (engine/sharedparts.py) is never patched: a LoRA with
keys for it first gives its model a private copy of that encoder (kept while the model stays
loaded), so the LoRA cannot reach the other models.
"""
from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from typing import Sequence

from ..vocabulary import FAMILY_LABELS, SD2, SD15, LoraEntry
from .hashes import FileHashes
from .plan import LoraUse

log = logging.getLogger(__name__)


class LoraError(RuntimeError):
    pass


def adapter_name(entry: LoraEntry) -> str:
    return "lora_" + hashlib.sha1(str(entry.path).encode()).hexdigest()[:12]


def lora_hashes_infotext(loras: Sequence[LoraUse], hashes: FileHashes) -> str | None:
    if not loras:
        return None
    return ", ".join(f"{u.entry.name}: {hashes.sha256(u.entry.path)[:12]}" for u in loras)


def canonical_order(loras: Sequence[LoraUse]) -> list[LoraUse]:
    """The order LoRAs are applied in: by name, then path, then weight (never the request's order)."""
    return sorted(loras, key=lambda u: (u.entry.name, str(u.entry.path), float(u.weight)))


class LoraManager:
    """Adapter bookkeeping per loaded model (kept on ``LoadedModel.loras``)."""

    def __init__(self, cache_size: int = 8):
        self.cache_size = cache_size
        self.loads = 0  # LoRA files read; tests and benchmarks check the cache with it

    def apply(self, loaded, loras: Sequence[LoraUse]) -> None:
        pipe = loaded.pipe
        book: OrderedDict = loaded.loras if isinstance(loaded.loras, OrderedDict) else OrderedDict(loaded.loras)
        loaded.loras = book
        model_family = loaded.spec.lora_family
        # A kohya SD 2 LoRA without metadata has SD 1.x's key names: it is read as sd15.
        fits = {model_family, SD15} if model_family == SD2 else {model_family}
        names, weights = [], []
        # A canonical order: PEFT sums the active adapters' deltas in the order they are set,
        # and fp32 sums in another order give other bits (on some CPUs). Sorted, the same set of
        # LoRAs gives the same pixels whatever order the request named them in, on every machine.
        for use in canonical_order(loras):
            entry, scale = use.entry, use.weight
            if entry.family and entry.family not in fits:
                raise LoraError(f"LoRA {entry.name!r} is for {FAMILY_LABELS.get(entry.family, entry.family)}, "
                                f"but model {loaded.entry.name!r} is {FAMILY_LABELS.get(loaded.family)}")
            name = adapter_name(entry)
            stamp = (entry.path.stat().st_mtime, entry.path.stat().st_size)
            if name in book and book[name] != stamp:  # file replaced on disk: reload it
                self._delete(pipe, book, name)
            if name not in book:
                _private_text_encoders(loaded, entry)
                self._load(pipe, book, entry, name, stamp)
            book.move_to_end(name)
            names.append(name)
            weights.append(float(scale))
        self._trim(pipe, book, keep=set(names))
        if names:
            pipe.enable_lora()
            pipe.set_adapters(names, adapter_weights=weights)
        elif book:
            pipe.disable_lora()

    def _load(self, pipe, book, entry: LoraEntry, name: str, stamp) -> None:
        try:
            pipe.load_lora_weights(str(entry.path.parent), weight_name=entry.path.name, adapter_name=name)
        except Exception as e:  # noqa: BLE001 - every failure leaves half-injected layers
            self._reset(pipe, book)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LoraError(f"LoRA {entry.name!r} could not be applied: {reason[:300]}") from e
        if name not in _adapters(pipe):
            self._reset(pipe, book)
            raise LoraError(f"LoRA {entry.name!r} could not be applied: no layer of the model matched its keys")
        from .convert_flow import upcast_fp8_adapters

        upcast_fp8_adapters(pipe)  # fp8-stored layers (convert_flow.to_running_dtype)
        book[name] = stamp
        self.loads += 1

    def _trim(self, pipe, book, keep: set[str]) -> None:
        while len(book) > self.cache_size:
            victim = next((n for n in book if n not in keep), None)
            if victim is None:
                break
            self._delete(pipe, book, victim)

    def _delete(self, pipe, book, name: str) -> None:
        try:
            pipe.delete_adapters([name])
        except Exception:  # noqa: BLE001
            self._reset(pipe, book)
            return
        book.pop(name, None)

    @staticmethod
    def _reset(pipe, book) -> None:
        """Remove every LoRA layer: the pipeline is exactly the base model again."""
        try:
            pipe.unload_lora_weights()
        finally:
            book.clear()


def _private_text_encoders(loaded, entry: LoraEntry) -> None:
    """Give ``loaded`` its own copy of each shared text encoder the LoRA ``entry`` has keys for."""
    shared, pipe = getattr(loaded, "shared", None), loaded.pipe
    if shared is None:
        return
    names = [n for n, c in pipe.components.items() if n.startswith("text_encoder") and shared.is_shared(c)]
    if not names:
        return
    try:  # diffusers' reading of the LoRA: keys under the component each patch goes to
        state = pipe.lora_state_dict(str(entry.path.parent), weight_name=entry.path.name)
    except Exception as e:  # noqa: BLE001 - a file diffusers cannot read
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoraError(f"LoRA {entry.name!r} could not be applied: {reason[:300]}") from e
    state = state[0] if isinstance(state, tuple) else state
    for name in names:
        if any(k.startswith(name + ".") for k in state):
            log.info("LoRA %s patches %s, shared with other models: model %s gets its own copy",
                     entry.name, name, loaded.entry.name)
            setattr(pipe, name, shared.private_copy(getattr(pipe, name)))


def _adapters(pipe) -> set[str]:
    try:
        return {a for names in pipe.get_list_adapters().values() for a in names}
    except Exception:  # noqa: BLE001
        return set()
