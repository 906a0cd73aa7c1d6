"""Loading ControlNets for a base model, offline, and keeping a few resident.

Diffusers folders load with ``from_pretrained``. Single files are read as tensors (``.pth`` /
``.ckpt`` with ``weights_only=True``), renamed from the original layout with diffusers' own
converter when needed, and built from a config: ``<stem>.config/config.json`` next to the file
when present, otherwise one *read from the tensors* (blocks, channels, layers, cross-attention
width, conditioning embedding) completed with what weights cannot tell — attention heads, the
SDXL time-embedding width, norm groups — from the base model's UNet, which a ControlNet copies.
Every parameter must be loaded: a file that leaves one out is refused, never run half-random.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import weakref
from collections import OrderedDict
from pathlib import Path

import torch

from .files import ControlNetEntry, strip_prefix

log = logging.getLogger(__name__)


class ControlNetLoadError(RuntimeError):
    pass


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _ldm_layers_per_block(sd: dict) -> int:
    """Original layout: input_blocks.N.0.op is the first down-sampler, after ``layers_per_block`` layers."""
    ops = sorted(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks.") and ".0.op." in k)
    if ops:
        return ops[0] - 1
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("input_blocks.")}
    return max(blocks) if blocks else 1


def to_diffusers_layout(sd: dict) -> dict:
    prefix = strip_prefix(sd)
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if "controlnet_cond_embedding.conv_in.weight" in sd:
        return sd
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    out = convert_controlnet_checkpoint(sd, {"layers_per_block": _ldm_layers_per_block(sd)})
    # diffusers' converter leaves out SDXL's label_emb (the micro-conditioning embedding)
    for a, b in (("linear_1", "0.0"), ("linear_2", "0.2")):
        for kind in ("weight", "bias"):
            if f"label_emb.{b}.{kind}" in sd:
                out[f"add_embedding.{a}.{kind}"] = sd[f"label_emb.{b}.{kind}"]
    return {k: v for k, v in out.items() if v is not None}


def _count(sd: dict, prefix: str, index_at: int) -> int:
    idx = {int(k.split(".")[index_at]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def infer_config(sd: dict, unet_config) -> dict:
    """A ControlNetModel config from diffusers-layout tensors plus the base UNet's config."""
    n = _count(sd, "down_blocks.", 1)
    if not n:
        raise ControlNetLoadError("no down_blocks tensors")
    blocks = [sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(n)]
    attn = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in sd) for i in range(n)]
    tlayers = [max(_count(sd, f"down_blocks.{i}.attentions.0.transformer_blocks.", 5), 1) for i in range(n)]
    cross = next((v.shape[1] for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)
    proj = next((v for k, v in sd.items() if k.endswith("proj_in.weight")), None)
    emb = ["controlnet_cond_embedding.conv_in.weight"] + [
        f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight"
        for i in range(_count(sd, "controlnet_cond_embedding.blocks.", 2) // 2)]
    ucfg = dict(unet_config)

    def per_block(v):
        return list(v[:n]) if isinstance(v, (list, tuple)) else v

    cfg = dict(
        in_channels=sd["conv_in.weight"].shape[1],
        conditioning_channels=sd["controlnet_cond_embedding.conv_in.weight"].shape[1],
        conditioning_embedding_out_channels=[sd[k].shape[0] for k in emb],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        block_out_channels=blocks,
        layers_per_block=_count(sd, "down_blocks.0.resnets.", 3),
        transformer_layers_per_block=tlayers,
        cross_attention_dim=cross or ucfg.get("cross_attention_dim", 768),
        use_linear_projection=bool(proj is not None and proj.dim() == 2),
        mid_block_type="UNetMidBlock2DCrossAttn" if any(k.startswith("mid_block.attentions.") for k in sd)
        else "UNetMidBlock2D",
        # What tensors cannot say: a ControlNet is a copy of its base UNet's encoder.
        attention_head_dim=per_block(ucfg.get("attention_head_dim", 8)),
        num_attention_heads=per_block(ucfg.get("num_attention_heads")),
        norm_num_groups=ucfg.get("norm_num_groups", 32),
        upcast_attention=ucfg.get("upcast_attention", False),
    )
    if "add_embedding.linear_1.weight" in sd:
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=ucfg.get("addition_time_embed_dim", 256),
                   projection_class_embeddings_input_dim=sd["add_embedding.linear_1.weight"].shape[1])
    return cfg


def infer_union_config(sd: dict, unet_config) -> dict:
    """A ControlNetUnionModel config: the ControlNet's, plus the control-type transformer's sizes
    read from ``task_embedding`` / ``transformer_layes`` / ``spatial_ch_projs`` (heads: the published 8)."""
    cfg = infer_config(sd, unet_config)
    cfg.pop("mid_block_type")  # (a union model's middle block is always the cross-attention one)
    types, channels = sd["task_embedding"].shape
    cfg.update(num_control_type=types, num_trans_channel=channels, num_trans_layer=_count(sd, "transformer_layes.", 1),
               num_proj_channel=sd["spatial_ch_projs.weight"].shape[0], num_trans_head=8)
    return cfg


def infer_flux_config(sd: dict, transformer_config) -> dict:
    """A FluxControlNetModel config from diffusers-layout tensors; the rotary axes (which weights
    cannot show) from the base transformer's config."""
    inner, in_channels = sd["x_embedder.weight"].shape
    head_dim = sd["transformer_blocks.0.attn.norm_q.weight"].shape[0] if "transformer_blocks.0.attn.norm_q.weight" \
        in sd else dict(transformer_config).get("attention_head_dim", 128)
    mode = sd.get("controlnet_mode_embedder.weight")
    return dict(patch_size=1, in_channels=in_channels, num_layers=_count(sd, "transformer_blocks.", 1),
                num_single_layers=_count(sd, "single_transformer_blocks.", 1), attention_head_dim=head_dim,
                num_attention_heads=inner // head_dim, joint_attention_dim=sd["context_embedder.weight"].shape[1],
                pooled_projection_dim=sd["time_text_embed.text_embedder.linear_1.weight"].shape[1],
                guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in sd,
                axes_dims_rope=list(dict(transformer_config).get("axes_dims_rope", (16, 56, 56))),
                num_mode=None if mode is None else mode.shape[0])


def infer_sd3_config(sd: dict, transformer_config) -> dict:
    """An SD3ControlNetModel config from diffusers-layout tensors; head width, sample and position
    sizes from the base transformer's config. With a text embedder it is InstantX's kind (zero
    pooled vector, own position embedding); without, SD 3.5's (the transformer's position embedding)."""
    tc = dict(transformer_config)
    proj = sd["pos_embed_input.proj.weight"]
    inner = proj.shape[0]
    head_dim = tc.get("attention_head_dim", 64)
    text = sd.get("context_embedder.weight")
    return dict(sample_size=tc.get("sample_size", 128), patch_size=proj.shape[-1], in_channels=proj.shape[1],
                out_channels=tc.get("out_channels", 16), num_layers=_count(sd, "transformer_blocks.", 1),
                attention_head_dim=head_dim, num_attention_heads=inner // head_dim,
                joint_attention_dim=None if text is None else text.shape[1],
                caption_projection_dim=inner if text is None else text.shape[0],
                pooled_projection_dim=sd["time_text_embed.text_embedder.linear_1.weight"].shape[1],
                pos_embed_max_size=tc.get("pos_embed_max_size", 96),
                dual_attention_layers=tuple(sorted({int(k.split(".")[1]) for k in sd
                                                    if k.startswith("transformer_blocks.") and ".attn2." in k})),
                qk_norm="rms_norm" if any(".attn.norm_q." in k for k in sd) else None,
                use_pos_embed="pos_embed.proj.weight" in sd, force_zeros_for_pooled_projection=text is not None)


def control_lora_state(path: Path) -> tuple[dict, dict]:
    """A Control-LoRA file as (full tensors, weight diffs), both in diffusers' ControlNet names.
    The file holds, in the original layout, the ControlNet's own layers (hint block, zero
    convolutions) and the norms/biases in full, and each encoder weight as a low-rank diff to the
    base UNet's: ``W = W_unet + up @ down`` (reshaped to the weight's shape)."""
    raw = read_state_dict(path)
    raw.pop("lora_controlnet", None)
    full = {k: v for k, v in raw.items() if not k.endswith((".up", ".down"))}
    diffs = {}
    for k, up in raw.items():
        if k.endswith(".up"):
            down = raw.get(k[:-3] + ".down")
            if down is None:
                raise ControlNetLoadError(f"{k} has no matching .down tensor")
            diffs[k[:-3] + ".weight"] = (up.float().flatten(1) @ down.float().flatten(1)).reshape(
                up.shape[0], *down.shape[1:])
    clash = sorted(set(full) & set(diffs))
    if clash:
        raise ControlNetLoadError(f"{clash[0]} is both a full tensor and a diff")
    # Renamed to diffusers' names together (the converter reads the structure from all keys); a
    # marker per key says which were diffs.
    merged = to_diffusers_layout({**full, **diffs})
    marks = to_diffusers_layout({k: torch.ones(1) if k in diffs else torch.zeros(1) for k in (*full, *diffs)})
    is_diff = {k for k, v in marks.items() if v.item() == 1}
    return ({k: v for k, v in merged.items() if k not in is_diff},
            {k: v for k, v in merged.items() if k in is_diff})


def load_control_lora(entry: ControlNetEntry, unet):
    """The ControlNet a Control-LoRA means for this base UNet: the UNet's encoder copied
    (``from_unet``), the diffs added to its weights, the file's full tensors put in place. Every
    ControlNet-only parameter must come from the file."""
    from diffusers import ControlNetModel

    full, diffs = control_lora_state(entry.path)
    shapes = {**{k: v.shape for k, v in full.items()}, **{k: v.shape for k, v in diffs.items()}}
    emb = ["controlnet_cond_embedding.conv_in.weight"] + [
        f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight"
        for i in range(_count(shapes, "controlnet_cond_embedding.blocks.", 2) // 2)]
    missing = [k for k in emb if k not in full]
    if missing:
        raise ControlNetLoadError(f"parameter {missing[0]} missing from the file")
    model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(full[k].shape[0] for k in emb),
                                      conditioning_channels=full[emb[0]].shape[1])
    model = model.float()
    params = model.state_dict()
    own = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
    lacking = [k for k in params if k.startswith(own) and k not in full]
    if lacking:
        raise ControlNetLoadError(f"parameter {lacking[0]} missing from the file")
    with torch.no_grad():
        for k, v in {**full, **diffs}.items():
            if k not in params:
                raise ControlNetLoadError(f"{k}: the base model's ControlNet has no such parameter")
            if params[k].shape != v.shape:
                raise ControlNetLoadError(f"{k} is {tuple(v.shape)}, the base model's is {tuple(params[k].shape)}: "
                                          "a Control-LoRA for another model family")
            if k in diffs:
                params[k].add_(v.to(params[k].dtype))
            else:
                params[k].copy_(v)
    return model


def load_t2i_adapter_file(path: Path):
    """A single-file T2I-Adapter (files.t2i_adapter_layout), every tensor in place."""
    from diffusers import T2IAdapter

    from .files import t2i_adapter_layout

    sd = read_state_dict(path)
    cfg = t2i_adapter_layout({k: tuple(v.shape) for k, v in sd.items()})
    if cfg.pop("original"):  # body.<level * blocks + j>.X -> adapter.body.<level>.(resnets.<j>.X | in_conv)
        blocks, renamed = cfg["num_res_blocks"], {}
        for k, v in sd.items():
            if k.startswith("body."):
                _, n, rest = k.split(".", 2)
                level, j = divmod(int(n), blocks)
                renamed[f"adapter.body.{level}.{rest}" if rest.startswith("in_conv.") else
                        f"adapter.body.{level}.resnets.{j}.{rest}"] = v
            else:
                renamed["adapter." + k] = v
        sd = renamed
    model = T2IAdapter(**cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)[:2]
    if missing or unexpected:
        raise ControlNetLoadError(f"{len(missing)} parameters missing, {len(unexpected)} tensors unplaced "
                                  f"(e.g. {(missing or unexpected)[0]})")
    return model


def sidecar_config(path: Path) -> dict | None:
    for cand in (path.with_name(path.stem + ".config") / "config.json", path.with_suffix(".json")):
        if cand.is_file():
            return {k: v for k, v in json.loads(cand.read_text()).items() if not k.startswith("_")}
    return None


def load_controlnet(entry: ControlNetEntry, unet_config, device, dtype, unet=None):
    """``unet``: the base UNet itself (a Control-LoRA is built from its weights)."""
    if entry.error:
        raise ControlNetLoadError(entry.error)
    if entry.kind == "control-lora":
        if unet is None:
            raise ControlNetLoadError("a Control-LoRA needs its base model's UNet")
        model = load_control_lora(entry, unet)
    elif entry.family in ("flux1", "sd3"):
        from diffusers import FluxControlNetModel, SD3ControlNetModel

        cls, infer = (FluxControlNetModel, infer_flux_config) if entry.family == "flux1" else \
            (SD3ControlNetModel, infer_sd3_config)
        if entry.format == "diffusers":
            model = cls.from_pretrained(str(entry.path), torch_dtype=dtype, local_files_only=True)
        else:
            sd = read_state_dict(entry.path)
            cfg = sidecar_config(entry.path) or infer(sd, unet_config)
            # (SD 3's position embedding is a buffer made at init, not in the file: built on the CPU)
            with torch.device("meta") if entry.family == "flux1" else contextlib.nullcontext():
                model = cls(**cfg)
            missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)[:2]
            if missing or unexpected:
                raise ControlNetLoadError(f"{len(missing)} parameters missing from the file, {len(unexpected)} "
                                          f"tensors unplaced (e.g. {(missing or unexpected)[0]})")
    elif entry.format == "diffusers":
        if entry.kind == "t2i-adapter":
            from diffusers import T2IAdapter as cls
        elif entry.kind == "controlnet-union":
            from diffusers import ControlNetUnionModel as cls
        else:
            from diffusers import ControlNetModel as cls
        model = cls.from_pretrained(str(entry.path), torch_dtype=dtype, local_files_only=True)
    elif entry.kind == "t2i-adapter":
        model = load_t2i_adapter_file(entry.path)
    else:
        from diffusers import ControlNetModel, ControlNetUnionModel

        sd = to_diffusers_layout(read_state_dict(entry.path))
        union = entry.kind == "controlnet-union"
        cfg = sidecar_config(entry.path) or (infer_union_config if union else infer_config)(sd, unet_config)
        cfg = {k: v for k, v in cfg.items() if v is not None}
        with torch.device("meta"):
            model = (ControlNetUnionModel if union else ControlNetModel)(**cfg)
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)[:2]
        if missing:
            raise ControlNetLoadError(f"{len(missing)} parameters missing from the file (e.g. {missing[0]})")
        if unexpected:
            raise ControlNetLoadError(f"{len(unexpected)} tensors the architecture has no place for "
                                      f"(e.g. {unexpected[0]})")
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            raise ControlNetLoadError(f"parameter {name} missing from the file")
    return model.to(device=device, dtype=dtype).eval()


class ControlNetCache:
    """Resident ControlNets (LRU, as many as A1111's default unit count), keyed by file version and
    the base UNet config they were built for."""

    def __init__(self, capacity: int = 3):
        self.capacity = capacity
        self._items: OrderedDict[tuple, torch.nn.Module] = OrderedDict()
        self._bases: dict[tuple, weakref.ref] = {}  # Control-LoRAs: the UNet each was built from
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, entry: ControlNetEntry, unet, device):
        stamp = (entry.path / "config.json") if entry.format == "diffusers" else entry.path
        # What the built model depends on: the file version, and (single files) the base UNet's config.
        base = json.dumps({k: v for k, v in dict(unet.config).items() if not k.startswith("_")}, sort_keys=True,
                          default=str)
        key = (str(entry.path), stamp.stat().st_mtime_ns, base, str(device), unet.dtype)
        lora = entry.kind == "control-lora"
        if lora:  # built from this UNet's weights, not only its config (two SD 1.5 checkpoints share one)
            key += (id(unet),)
        with self._lock:
            if key in self._items and (not lora or self._bases.get(key, lambda: None)() is unet):
                self._items.move_to_end(key)
                return self._items[key]
            self._items.pop(key, None)  # (a Control-LoRA of a UNet gone, whose id a new one reuses)
            while len(self._items) >= self.capacity:
                self._bases.pop(self._items.popitem(last=False)[0], None)
            model = load_controlnet(entry, unet.config, device, unet.dtype, unet=unet)
            self.loads += 1
            self._items[key] = model
            if lora:
                self._bases[key] = weakref.ref(unet)
            return model
