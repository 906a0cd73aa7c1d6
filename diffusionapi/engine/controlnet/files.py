"""ControlNet files: where they are, what each one is (read from the file, never the name).

``stable_diffusion/controlnet/`` (``DIFFUSIONAPI_CONTROLNET_DIR``) holds diffusers folders
(``config.json`` + weights) and single files in the layouts people download: lllyasviel's
``control_v11*.pth`` / ``.safetensors`` (the original ``input_blocks`` / ``zero_convs`` /
``input_hint_block`` names, with or without ``control_model.``) and diffusers-layout single files
(the SDXL ones). The family comes from the tensors: SDXL ControlNets have the SDXL UNet's
``add_embedding`` (``label_emb`` in the original layout); otherwise the cross-attention width
tells SD 1.5 from SD 2.x. Flux.1 ControlNets (diffusers' FluxControlNetModel: InstantX's, Shakker's
union, in a folder or as one file in the diffusers key layout) have the Flux transformer's
``controlnet_x_embedder`` and ``controlnet_blocks``; a union one its ``controlnet_mode_embedder``.
SD 3.x ControlNets (SD3ControlNetModel) have ``pos_embed_input`` and ``controlnet_blocks``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from ...config import stable_diffusion_dir

log = logging.getLogger(__name__)

WEIGHT_EXTS = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
SD2 = "sd2"  # not a family the service generates with; named so that the 422 can say what a file is


@dataclass(frozen=True)
class ControlNetEntry:
    name: str            # path under the folder without extension ("control_v11p_sd15_canny", "xl/canny")
    path: Path           # the folder or the file
    family: str | None   # "sd15", "sdxl", "sd2"; None when unreadable
    kind: str            # "controlnet" | "controlnet-union" | "control-lora" | "t2i-adapter"
    format: str          # "diffusers" | "single-file"
    hash: str            # A1111's short model hash (8 hex), as the extension shows it in titles
    error: str | None = None  # why it cannot be used (unreadable, an unsupported variant)

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]"


def controlnet_dir(settings) -> Path:
    return stable_diffusion_dir(settings, "controlnet_dir", "controlnet")


def annotators_dir(settings) -> Path:
    return stable_diffusion_dir(settings, "annotators_dir", "annotators")


def short_hash(path: Path) -> str:
    """A1111's (and the extension's) model hash: sha256 of 64 KiB at offset 1 MiB, 8 hex digits.
    Cheap for any file size, and the hash in the titles clients already know."""
    m = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            f.seek(0x100000)
            m.update(f.read(0x10000))
    except OSError:
        return "00000000"
    return m.hexdigest()[:8]


def _weights_file(folder: Path) -> Path | None:
    for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
              "diffusion_pytorch_model.fp16.safetensors"):
        if (folder / n).is_file():
            return folder / n
    return next(iter(sorted(folder.glob("*.safetensors"))), None)


def tensor_shapes(path: Path) -> dict[str, tuple]:
    """Tensor name -> shape, without loading tensor data where the format allows it."""
    if path.suffix == ".safetensors":
        from ...fileinfo import read_safetensors_header

        return {k: tuple(v["shape"]) for k, v in read_safetensors_header(path).items() if k != "__metadata__"}
    import torch

    sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}


def strip_prefix(keys) -> str:
    """The prefix lllyasviel's full checkpoints put before the ControlNet's own names."""
    for p in ("control_model.",):
        if any(k.startswith(p) for k in keys):
            return p
    return ""


def classify(shapes: dict[str, tuple]) -> tuple[str | None, str, str | None]:
    """(family, kind, error) of a single file from its tensor names and shapes."""
    prefix = strip_prefix(shapes)
    s = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    if "controlnet_x_embedder.weight" in s and "context_embedder.weight" in s:
        return "flux1", ("controlnet-union" if "controlnet_mode_embedder.weight" in s else "controlnet"), None
    if "pos_embed_input.proj.weight" in s and "controlnet_blocks.0.weight" in s:
        return "sd3", "controlnet", None
    if any(k.startswith("double_blocks.") for k in s):  # XLabs' Flux ControlNets (BFL's block names)
        return "flux1", "controlnet", "a Flux ControlNet in XLabs' layout, not read (use the diffusers layout)"
    if any("lora_controlnet" in k for k in s):
        # Stability's Control-LoRAs: low-rank diffs (``<name>.up`` / ``.down``) to the base UNet's
        # encoder, in the original layout, plus the ControlNet's own layers in full.
        if "input_hint_block.0.weight" not in s:
            return None, "control-lora", "a Control-LoRA without its input_hint_block"
        cross = next((v[-1] for k, v in s.items() if k.endswith(("attn2.to_k.down", "attn2.to_k.weight"))), None)
        family = "sdxl" if ("label_emb.0.0.weight" in s or "label_emb.0.0.down" in s) else \
            (SD2 if cross == 1024 else "sd15")
        return family, "control-lora", None
    if any(k.startswith(("task_embedding", "control_add_embedding", "transformer_layes")) for k in s):
        if "controlnet_cond_embedding.conv_in.weight" not in s:
            return "sdxl", "controlnet-union", "a ControlNet union model in a layout not read (use the diffusers layout)"
        return "sdxl", "controlnet-union", None
    if "input_hint_block.0.weight" in s or "controlnet_cond_embedding.conv_in.weight" in s:
        if "label_emb.0.0.weight" in s or "add_embedding.linear_1.weight" in s:
            return "sdxl", "controlnet", None
        cross = next((v[1] for k, v in s.items() if k.endswith("attn2.to_k.weight") and len(v) == 2), None)
        return (SD2 if cross == 1024 else "sd15"), "controlnet", None
    if any(k.startswith(("adapter.", "body.")) for k in s):
        return t2i_adapter_kind(s)
    return None, "controlnet", "not a ControlNet (no input_hint_block / controlnet_cond_embedding tensors)"


def t2i_adapter_layout(shapes: dict) -> dict:
    """The T2IAdapter config of a single file: diffusers' layout (``adapter.conv_in`` /
    ``adapter.body.<level>.resnets.<j>``) or TencentARC's original one (``conv_in`` /
    ``body.<level * blocks + j>``; the v2 adapters, whose blocks diffusers' full adapter has).
    Levels and blocks per level are read from the names (the first ``in_conv`` starts level 1), the
    downscale from ``conv_in``'s input width (pixel-unshuffled RGB or grey: x8 for SD 1.5's full
    adapter, x16 for SDXL's). Raises ValueError for a layout it cannot read."""
    if any(".skep." in k or ".down_opt." in k for k in shapes):
        raise ValueError("an original T2I-Adapter v1 layout (skep / down_opt convolutions): use its diffusers folder")
    diffusers = "adapter.conv_in.weight" in shapes
    conv_in = shapes.get("adapter.conv_in.weight" if diffusers else "conv_in.weight")
    if conv_in is None:
        raise ValueError("a T2I-Adapter layout other than the full adapter's (no conv_in)")
    if diffusers:
        levels = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("adapter.body."))
        blocks = 1 + max(int(k.split(".")[4]) for k in shapes if k.startswith("adapter.body.0.resnets."))
        channels = [shapes[f"adapter.body.{i}.resnets.0.block1.weight"][0] for i in range(levels)]
    else:
        total = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("body."))
        first = min((int(k.split(".")[1]) for k in shapes if k.startswith("body.") and ".in_conv." in k), default=0)
        if first == 0 or total % first:
            raise ValueError("cannot tell the T2I-Adapter's levels from its body blocks")
        blocks, levels = first, total // first
        channels = [shapes[f"body.{i * blocks}.block1.weight"][0] for i in range(levels)]
    factor = next((f for f in (8, 16) for c in (1, 3) if conv_in[1] == c * f * f), None)
    if factor is None:
        raise ValueError(f"conv_in takes {conv_in[1]} channels: not an RGB or grey image unshuffled x8 or x16")
    return {"in_channels": conv_in[1] // (factor * factor), "channels": channels, "num_res_blocks": blocks,
            "downscale_factor": factor, "adapter_type": "full_adapter_xl" if factor == 16 else "full_adapter",
            "original": not diffusers}


def t2i_adapter_kind(shapes: dict) -> tuple[str | None, str, str | None]:
    try:
        cfg = t2i_adapter_layout(shapes)
    except ValueError as e:
        return None, "t2i-adapter", str(e)
    return ("sdxl" if cfg["adapter_type"] == "full_adapter_xl" else "sd15"), "t2i-adapter", None


def classify_folder(folder: Path) -> tuple[str | None, str, str | None]:
    cfg = json.loads((folder / "config.json").read_text())
    cls = cfg.get("_class_name", "")
    if cls == "ControlNetModel":
        if cfg.get("addition_embed_type") == "text_time":
            return "sdxl", "controlnet", None
        cross = cfg.get("cross_attention_dim")
        return (SD2 if cross == 1024 else "sd15"), "controlnet", None
    if cls in ("T2IAdapter", "MultiAdapter"):
        return ("sdxl" if cfg.get("adapter_type") == "full_adapter_xl" else "sd15"), "t2i-adapter", None
    if cls == "ControlNetUnionModel":
        return "sdxl", "controlnet-union", None
    if cls == "FluxControlNetModel":
        return "flux1", ("controlnet-union" if cfg.get("num_mode") else "controlnet"), None
    if cls == "SD3ControlNetModel":
        return "sd3", "controlnet", None
    return None, "controlnet", (f"config.json names {cls or 'no class'}, not a ControlNetModel, FluxControlNetModel, "
                                "SD3ControlNetModel or T2IAdapter")


class ControlNetFiles:
    """Scans the ControlNet folder; each listing is a fresh directory walk, files read once per version."""

    def __init__(self, settings):
        self.settings = settings
        self._cache: dict[tuple, ControlNetEntry] = {}
        self._lock = threading.Lock()

    @property
    def root(self) -> Path:
        return controlnet_dir(self.settings)

    def entries(self) -> list[ControlNetEntry]:
        root = self.root
        if not root.is_dir():
            return []
        found: list[ControlNetEntry] = []
        real_root = root.resolve()
        for path in sorted(root.rglob("*")):
            try:
                path.resolve().relative_to(real_root)  # symlinks out of the folder are skipped
            except (ValueError, OSError):
                continue
            rel = path.relative_to(root)
            if any(part.startswith(".") for part in rel.parts):
                continue
            if path.is_dir() and (path / "config.json").is_file():
                found.append(self._entry(path, rel.as_posix(), "diffusers"))
            elif path.is_file() and path.suffix in WEIGHT_EXTS and not self._inside_folder_model(path, root):
                found.append(self._entry(path, rel.with_suffix("").as_posix(), "single-file"))
        return found

    @staticmethod
    def _inside_folder_model(path: Path, root: Path) -> bool:
        for p in path.parents:
            if p == root:
                return False
            if (p / "config.json").is_file():
                return True
        return False

    def _entry(self, path: Path, name: str, fmt: str) -> ControlNetEntry:
        stamp_file = (path / "config.json") if fmt == "diffusers" else path
        try:
            st = stamp_file.stat()
            key = (str(path), st.st_mtime_ns, st.st_size)
        except OSError:
            key = (str(path), 0, 0)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        try:
            if fmt == "diffusers":
                family, kind, error = classify_folder(path)
                weights = _weights_file(path)
                digest = short_hash(weights) if weights else "00000000"
            else:
                family, kind, error = classify(tensor_shapes(path))
                digest = short_hash(path)
        except Exception as e:  # noqa: BLE001 - one unreadable file must not hide the others
            log.warning("controlnet %s unreadable: %s", path, e)
            family, kind, error, digest = None, "controlnet", f"unreadable: {e}", "00000000"
        entry = ControlNetEntry(name, path, family, kind, fmt, digest, error)
        with self._lock:
            self._cache[key] = entry
        return entry

    def resolve(self, name: str) -> ControlNetEntry | None:
        """By name or title (``name [hash]``), any case; a bare file stem matches in subfolders too."""
        text = str(name).strip()
        if text.endswith("]") and " [" in text:
            text = text[:text.rindex(" [")].strip()
        key = text.casefold()
        entries = self.entries()
        for e in entries:
            if e.name.casefold() == key:
                return e
        for e in entries:  # "canny" for "sd15/canny", or a name with an extension
            stem = e.name.rsplit("/", 1)[-1].casefold()
            if stem == key or Path(key).stem == e.name.casefold():
                return e
        return None
