"""Everything read from a model file without loading it for generation: safetensors headers,
``.ckpt`` tensor names (the safe way), families of LoRAs and embeddings, and whether spandrel
takes a file as an upscaler. Model families are recognised in ``diffusionapi.families``."""
from __future__ import annotations

import json
import logging
import re
import struct
from pathlib import Path

from .vocabulary import FLUX1, FLUX2, QWEN_IMAGE, SD2, SD3, SD15, SDXL, Z_IMAGE, Family

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    pass


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file, without reading any tensor data."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path.name}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{path.name}: not a safetensors file (header size {n})")
        data = f.read(n)
        if len(data) != n:
            raise ValueError(f"{path.name}: truncated safetensors header")
    return json.loads(data)


def read_gguf_header(path: Path) -> dict:
    """A GGUF file's tensors as a safetensors-like header: {name: {"shape": [...] (torch order),
    "dtype": "Q8_0" | "F16" | ...}}; the data stays on disk (memory-mapped, never unpickled)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ValueError(f"{Path(path).name}: not a readable GGUF file ({e})") from None
    # ggml lists dimensions innermost first; torch outermost first.
    return {t.name: {"shape": [int(x) for x in reversed(t.shape.tolist())], "dtype": t.tensor_type.name}
            for t in reader.tensors}


def read_model_header(path: Path) -> dict:
    """Tensor names and shapes of a .safetensors or .gguf file."""
    return read_gguf_header(path) if Path(path).suffix.lower() == ".gguf" else read_safetensors_header(path)


def ckpt_keys(path: Path) -> list[str]:
    """Tensor names of a .ckpt, loaded the safe way: a pickle needing more than tensors is refused."""
    import pickle

    import torch

    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path.name} refused: its pickle needs more than plain tensors "
                              f"(weights_only loading): {str(e).splitlines()[0][:200]}") from e
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path.name} is not a readable checkpoint: {str(e).splitlines()[0][:200]}") from e
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path.name} holds no state dict")
    return list(sd)


UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


def single_file_unet_in_channels(path: Path) -> int:
    """The UNet's input channels in an original-layout checkpoint: 9 for inpainting models."""
    if path.suffix.lower() == ".safetensors":
        shape = read_safetensors_header(path).get(UNET_CONV_IN, {}).get("shape")
    else:
        import torch

        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
        shape = tuple(sd[UNET_CONV_IN].shape) if UNET_CONV_IN in sd else None
    return int(shape[1]) if shape and len(shape) == 4 else 4


_Z_IMAGE_LAYER = re.compile(r"(^|[._])layers[._]\d+[._]attention[._]")


def lora_family(path: Path) -> Family | None:
    try:
        header = read_safetensors_header(path)
    except (OSError, ValueError) as e:
        log.warning("LoRA %s: %s", path, e)
        return None
    meta = header.get("__metadata__") or {}
    base = str(meta.get("ss_base_model_version", ""))
    if "sdxl" in base:
        return SDXL
    if base.startswith("sd_v1"):
        return SD15
    if base.startswith("sd_v2"):
        return SD2
    if base.startswith("flux"):
        return FLUX1
    if base.startswith("sd3"):
        return SD3
    keys = [k for k in header if k != "__metadata__"]
    # Flux.2: its fused single-block projection or its shared modulations (before Flux.1's rule:
    # it has single_transformer_blocks too).
    if any("to_qkv_mlp_proj" in k or "stream_modulation" in k for k in keys):
        return FLUX2
    # Flux LoRAs: diffusers/PEFT (single_transformer_blocks), kohya (lora_unet_double_blocks_),
    # BFL / ai-toolkit / XLabs (double_blocks., single_blocks.). SD 3: joint_blocks in kohya/original.
    if any("single_transformer_blocks" in k or "double_blocks" in k or "single_blocks" in k for k in keys):
        return FLUX1
    if any("joint_blocks" in k for k in keys):
        return SD3
    # Qwen-Image: its blocks' img_mod / img_mlp / txt_mlp (diffusers/PEFT, kohya/musubi-tuner).
    if any("img_mod" in k or "img_mlp" in k or "txt_mlp" in k for k in keys):
        return QWEN_IMAGE
    # Z-Image: layers.N.attention (diffusers/PEFT) or lora_unet_layers_N_attention (kohya/musubi).
    if any(_Z_IMAGE_LAYER.search(k) for k in keys):
        return Z_IMAGE
    if any(k.startswith("transformer.transformer_blocks.") for k in keys):
        return None  # Flux (double blocks only) or SD 3: the keys do not tell; loading will
    if any(k.startswith(("lora_te2_", "lora_te1_", "lora_unet_input_blocks", "lora_unet_output_blocks"))
           or "text_encoder_2" in k or "add_embedding" in k for k in keys):
        return SDXL
    return SD15 if keys else None


class UpscalerError(RuntimeError):
    pass


def load_upscaler_descriptor(path: Path):
    """spandrel's descriptor of an image-to-image upscaler file (on the CPU)."""
    import spandrel

    for attempt in range(3):
        _wait_for_real_weights()
        try:
            desc = spandrel.ModelLoader(device="cpu").load_from_file(str(path))
            if not _has_meta_weights(desc.model):
                break
            error: Exception = RuntimeError("built with empty weights")
        except Exception as e:  # noqa: BLE001 - spandrel's UnsupportedModelError has an empty message
            error = e
        # Built while another thread loaded a pipeline (see _wait_for_real_weights): try again.
        if attempt == 2 or not _empty_weights_seen(error):
            reason = str(error).strip() or type(error).__name__
            raise UpscalerError(f"upscaler file {path.name!r} could not be loaded: {reason}") from error
    if not isinstance(desc, spandrel.ImageModelDescriptor):
        raise UpscalerError(f"upscaler file {path.name!r} is not an image-to-image upscaler")
    return desc


def _wait_for_real_weights(timeout: float = 60.0) -> None:
    """diffusers loads pipelines inside accelerate's ``init_empty_weights``, which patches
    ``torch.nn.Module.register_parameter`` for the whole process while it runs. A module built in
    another thread meanwhile (a submit checking an upscaler file) would get empty (meta) weights:
    wait until the patch is gone."""
    import time

    import torch

    def patched() -> bool:  # torch's own method lives in torch.nn.modules.module
        return getattr(torch.nn.Module.register_parameter, "__module__", "") != "torch.nn.modules.module"

    deadline = time.monotonic() + timeout
    while patched() and time.monotonic() < deadline:
        time.sleep(0.05)


def _has_meta_weights(model) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def _empty_weights_seen(error: Exception) -> bool:
    text = str(error).lower()
    return "meta" in text or "empty weights" in text


def upscaler_problem(path: Path) -> str | None:
    """None when spandrel recognises the file as an image upscaler, else why not."""
    try:
        load_upscaler_descriptor(path)
        return None
    except UpscalerError as e:
        return str(e)


# ---------------------------------------------------------------------------- embeddings

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")


class EmbeddingError(ValueError):
    pass


def read_embedding(path: Path) -> dict:
    """A textual-inversion file's vectors, as A1111 reads its layouts:

    - A1111 ``.pt``: ``{"string_to_param": {"*": tensor[n, width]}, "name": ..., "step": ...}``
    - kohya ``.safetensors`` (SD 1.5): ``{"emb_params": tensor[n, width]}``
    - diffusers ``learned_embeds.bin``: ``{"<token>": tensor[width]}`` (one vector)
    - SDXL: ``{"clip_l": tensor[n, 768], "clip_g": tensor[n, 1280]}``

    Returns ``{"": [n, width]}`` or ``{"clip_l": .., "clip_g": ..}`` (float32, CPU).
    ``.pt``/``.bin`` load with ``weights_only=True``: a pickle needing more than tensors,
    strings and numbers is refused."""
    import torch

    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path), device="cpu")
        else:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt or unsafe files are reported, never fatal
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EmbeddingError(f"{path.name} could not be read: {reason[:200]}") from e
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path.name}: not an embedding (a {type(data).__name__})")
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{path.name}: an embedding file must hold exactly one term")
        raw = {"": next(iter(params.values()))}
    elif "clip_l" in data and "clip_g" in data:
        raw = {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        raw = {"": next(iter(data.values()))}
    else:
        raise EmbeddingError(f"{path.name}: neither an A1111, a diffusers nor an SDXL embedding")
    out = {}
    for key, t in raw.items():
        if not isinstance(t, torch.Tensor):
            raise EmbeddingError(f"{path.name}: {key or 'the vectors'} is not a tensor")
        t = t.detach().float()
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2 or t.shape[0] == 0:
            raise EmbeddingError(f"{path.name}: vectors must be [count, width], not {list(t.shape)}")
        out[key] = t
    if len(out) == 2 and out["clip_l"].shape[0] != out["clip_g"].shape[0]:
        raise EmbeddingError(f"{path.name}: clip_l and clip_g hold different numbers of vectors")
    return out


def embedding_info(path: Path) -> tuple[Family, int]:
    """(family, vector count) of an embedding file; raises EmbeddingError."""
    tensors = read_embedding(path)
    return (SDXL if "clip_g" in tensors else SD15), int(next(iter(tensors.values())).shape[0])
