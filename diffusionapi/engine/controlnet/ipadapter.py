"""IP-Adapter: a reference image's CLIP embedding as extra cross-attention tokens.

Files: the adapters in ``stable_diffusion/ipadapter/`` (h94's ``ip-adapter_sd15.safetensors`` /
``.bin`` layout: ``image_proj.*`` + ``ip_adapter.<n>.to_k_ip/to_v_ip``), the image encoders in
``stable_diffusion/clip_vision/`` (``CLIPVisionModelWithProjection`` diffusers/transformers folders).
An adapter is matched to the encoder whose projection width its ``image_proj`` takes, and to a
model by its cross-attention width (the family where the width is a real model's).

Per job the adapter's attention processors and image projection are put into the resident UNet
(diffusers' own IP-Adapter layers) and taken out again afterwards: the exact processor objects
the UNet had before come back, so the next job runs the model as it was. Plain IP-Adapters
(4 image tokens from the projected image embedding) and "plus" ones (a resampler's tokens,
``latents`` of them, from the encoder's penultimate hidden states; the unconditional pass sees the
hidden states of a black image, as diffusers does) are supported; full face and Face ID variants
are refused.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from ...config import stable_diffusion_dir
from .files import WEIGHT_EXTS, tensor_shapes

log = logging.getLogger(__name__)

CROSS_DIMS = {768: "sd15", 1024: "sd2", 2048: "sdxl"}


def ipadapter_dir(settings) -> Path:
    return stable_diffusion_dir(settings, "ipadapter_dir", "ipadapter")


def clip_vision_dir(settings) -> Path:
    return stable_diffusion_dir(settings, "clip_vision_dir", "clip_vision")


@dataclass(frozen=True)
class IPAdapterEntry:
    name: str
    path: Path
    cross_dim: int | None      # the text width its to_k_ip takes (the model's cross-attention width)
    image_dim: int | None      # the image-encoder width its image_proj takes (plain: projection, plus: hidden)
    family: str | None         # from cross_dim when that is a real model's width
    error: str | None = None
    variant: str = "plain"     # "plain" (image embedding) | "plus" (resampler over the hidden states)
    tokens: int = 4            # image tokens it adds to cross-attention, per image


@dataclass(frozen=True)
class EncoderEntry:
    name: str
    path: Path
    projection_dim: int
    hidden_size: int | None = None


def _split(shapes: dict) -> tuple[dict, dict]:
    proj = {k[len("image_proj."):]: v for k, v in shapes.items() if k.startswith("image_proj.")}
    ip = {k[len("ip_adapter."):]: v for k, v in shapes.items() if k.startswith("ip_adapter.")}
    return proj, ip


def read_adapter_shapes(path: Path) -> tuple[dict, dict]:
    if path.suffix == ".safetensors":
        return _split(tensor_shapes(path))
    import torch

    sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    return ({k: tuple(v.shape) for k, v in sd.get("image_proj", {}).items()},
            {k: tuple(v.shape) for k, v in sd.get("ip_adapter", {}).items()})


def load_adapter_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        flat = load_file(str(path))
        proj, ip = _split(flat)
        return {"image_proj": proj, "ip_adapter": ip}
    import torch

    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    return {"image_proj": dict(sd["image_proj"]), "ip_adapter": dict(sd["ip_adapter"])}


def describe_adapter(name: str, path: Path) -> IPAdapterEntry:
    try:
        proj, ip = read_adapter_shapes(path)
    except Exception as e:  # noqa: BLE001
        return IPAdapterEntry(name, path, None, None, None, f"unreadable: {e}")
    if not proj or not ip:
        return IPAdapterEntry(name, path, None, None, None, "not an IP-Adapter (no image_proj / ip_adapter tensors)")
    k = next((v for key, v in ip.items() if key.endswith("to_k_ip.weight")), None)
    cross = k[1] if k else None
    if "latents" in proj and "proj_in.weight" in proj and "perceiver_resampler.proj_in.weight" not in proj:
        return IPAdapterEntry(name, path, cross, proj["proj_in.weight"][1], CROSS_DIMS.get(cross), variant="plus",
                              tokens=proj["latents"][1])
    if "proj.weight" not in proj:
        return IPAdapterEntry(name, path, None, None, None, "an IP-Adapter variant other than plain and plus "
                                                            "(full face / Face ID): not supported yet")
    return IPAdapterEntry(name, path, cross, proj["proj.weight"][1], CROSS_DIMS.get(cross))


class IPAdapterFiles:
    def __init__(self, settings):
        self.settings = settings
        self._cache: dict[tuple, IPAdapterEntry] = {}
        self._lock = threading.Lock()

    def entries(self) -> list[IPAdapterEntry]:
        root = ipadapter_dir(self.settings)
        if not root.is_dir():
            return []
        out = []
        for path in sorted(root.rglob("*")):
            if not path.is_file() or path.suffix not in WEIGHT_EXTS or path.name.startswith("."):
                continue
            st = path.stat()
            key = (str(path), st.st_mtime_ns, st.st_size)
            with self._lock:
                e = self._cache.get(key)
            if e is None:
                e = describe_adapter(path.relative_to(root).with_suffix("").as_posix(), path)
                with self._lock:
                    self._cache[key] = e
            out.append(e)
        return out

    def resolve(self, name: str) -> IPAdapterEntry | None:
        key = str(name).strip()
        if key.endswith("]") and " [" in key:
            key = key[:key.rindex(" [")]
        key = key.casefold()
        for e in self.entries():
            if e.name.casefold() == key or e.name.rsplit("/", 1)[-1].casefold() == key:
                return e
        return None

    def encoders(self) -> list[EncoderEntry]:
        root = clip_vision_dir(self.settings)
        if not root.is_dir():
            return []
        out = []
        for cfg in sorted(root.rglob("config.json")):
            try:
                data = json.loads(cfg.read_text())
            except (OSError, ValueError):
                continue
            vision = data.get("vision_config") or {}
            dim = data.get("projection_dim") or vision.get("projection_dim")
            hidden = data.get("hidden_size") or vision.get("hidden_size")
            if dim:
                out.append(EncoderEntry(cfg.parent.relative_to(root).as_posix(), cfg.parent, int(dim),
                                        int(hidden) if hidden else None))
        return out

    def encoder_for(self, entry: IPAdapterEntry) -> EncoderEntry | None:
        """Plain adapters take the encoder's projected embedding, plus ones its hidden states."""
        if entry.variant == "plus":
            return next((e for e in self.encoders() if e.hidden_size == entry.image_dim), None)
        return next((e for e in self.encoders() if e.projection_dim == entry.image_dim), None)


def model_cross_dim(model) -> int | None:
    """The model's cross-attention width: its UNet config (folders), or its family's."""
    cfg = Path(model.path) / "unet" / "config.json"
    if cfg.is_file():
        try:
            return int(json.loads(cfg.read_text())["cross_attention_dim"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return {"sd15": 768, "sdxl": 2048}.get(str(model.family))


# ---------------------------------------------------------------------------- in the engine

class EncoderCache:
    def __init__(self):
        self._items: dict[tuple, object] = {}

    def get(self, enc: EncoderEntry, device, dtype):
        from transformers import CLIPVisionModelWithProjection

        key = (str(enc.path), str(device), dtype)
        if key not in self._items:
            self._items.clear()  # one encoder resident
            model = CLIPVisionModelWithProjection.from_pretrained(str(enc.path), local_files_only=True,
                                                                  dtype=dtype)
            self._items[key] = model.to(device).eval()
        return self._items[key]


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_embeds(encoder, images, device, variant: str = "plain"):
    """(conditional, unconditional or None) for the adapter: CLIP's preprocessing (shorter side to
    the encoder's size, centre crop, CLIP normalisation), then plain: the projected image embedding,
    (1, n_images, projection_dim), and None (the unconditional pass sees zeros); plus: the
    penultimate hidden states, (1, n_images, tokens, hidden), and those of a black image."""
    import torch
    from transformers import CLIPImageProcessor

    size = encoder.config.image_size
    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    pixels = proc(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
    pixels = pixels.to(device, encoder.dtype)
    if variant == "plus":
        cond = encoder(pixels, output_hidden_states=True).hidden_states[-2]
        uncond = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        return cond.unsqueeze(0), uncond.unsqueeze(0)
    return encoder(pixels).image_embeds.unsqueeze(0), None


class InstalledAdapters:
    """IP-Adapters put into a UNet for one job; ``remove()`` gives the UNet back exactly as it was."""

    def __init__(self, unet, states: list[dict]):
        self.unet = unet
        self.processors = dict(unet.attn_processors)
        self.hid_proj = unet.encoder_hid_proj
        self.hid_type = unet.config.encoder_hid_dim_type
        try:
            unet._load_ip_adapter_weights(states)
        except BaseException:
            self.remove()  # never leave a half-changed UNet resident
            raise
        self.ip_processors = [p for p in unet.attn_processors.values() if hasattr(p, "scale")
                              and isinstance(getattr(p, "scale"), list)]

    def set_scales(self, scales: list[float]) -> None:
        for p in self.ip_processors:
            p.scale = list(scales)

    def remove(self) -> None:
        # the image projection first: a plus adapter's resampler has attention layers of its own,
        # which the UNet counts among its processors while it is there
        self.unet.encoder_hid_proj = self.hid_proj
        self.unet.config.encoder_hid_dim_type = self.hid_type
        self.unet.set_attn_processor(self.processors)
