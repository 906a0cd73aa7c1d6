"""Flow families' single files (BFL / Stability / ComfyUI layouts) -> diffusers pipelines, any size.

diffusers' own single-file converters assume full-size widths (its Flux converter splits the
single blocks' fused projection at 3072), so the tiny test models and any narrower fine-tune
would not load; the converters here read every size from the tensors:

- Flux transformer (BFL keys ``double_blocks.*``, ``single_blocks.*``, ``img_in`` ...): width
  from ``img_in``, head size from the per-head ``query_norm.scale``, heads = width / head size,
  block counts from the keys, input/output channels, text and pooled widths from ``img_in``,
  ``final_layer``, ``txt_in``, ``vector_in``; guidance-distilled when ``guidance_in`` exists.
  Shapes cannot tell the rotary axes split: published Flux.1 models (head size 128) use BFL's
  (16, 56, 56); other head sizes take (d/4, d/4, d/2), the tiny test models' split; a
  ``<file stem>.config/transformer/config.json`` next to the file overrides any of it.
- Chroma transformer (lodestones' / ComfyUI's keys: Flux.1's blocks without their modulation
  layers, plus ``distilled_guidance_layer.*``): Flux.1's sizes as above, the approximator's
  input channels, hidden width and layer count from its tensors. diffusers' own Chroma converter
  splits the single blocks' fused projection at 3072 as its Flux one does.
- SD 3.x transformer (``joint_blocks.*``): diffusers' converter, which reads its sizes from the
  tensors; the config (layers, patch, position grid, dual-attention layers, qk norm) is read from
  the shapes here; heads are not in the shapes: 64 channels each (every published SD 3.x; 8 for
  widths under 512, the tiny test models).
- VAE (LDM / BFL ``ae.safetensors`` keys): block widths, layers and channels from the shapes,
  diffusers' LDM key converter; the group-norm group count is not in the shapes: 32 (every
  published VAE) unless the narrowest block has fewer channels (gcd with 32). Scaling and shift
  factors are the family's (Flux's ae and SD 3's VAE have the same shapes).
- CLIP (HF transformers keys, with or without ``text_model.``): sizes from the shapes; heads of
  64 channels (CLIP-L 12, CLIP-G 20; encoders narrower than 512, the tiny ones, 8 channels),
  activation quick_gelu except for CLIP-G's width 1280 (gelu), as OpenAI's and OpenCLIP's are.
- T5 (HF T5EncoderModel keys): heads and buckets from the relative attention bias, the rest
  from the shapes; gated-GELU when ``wi_0`` / ``wi_1`` exist.

Models are built on the meta device and take the file's tensors (split views made contiguous),
then are cast to the running dtype: fp8 weights stay fp8 and are upcast per layer, scaled fp8 is
dequantized at load, GGUF blocks stay quantized in diffusers' GGUFLinear (see below). Model files
are ``.safetensors`` or ``.gguf`` (jobs/resolve.py refuses others); a ``.ckpt`` reaching
``load_tensors`` is opened weights-only, after fileinfo.ckpt_keys refused any pickle needing more.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from ..components import (CLIP_G, CLIP_L, INSIDE_PREFIXES, T5_TOKENIZER_FOLDER, T5XXL, VAE, ComponentError,
                          classify, component_family)
from ..families import spec

BFL_PREFIX = "model.diffusion_model."
CLIP_TOKENIZER = Path(__file__).resolve().parents[1] / "configs" / "clip-tokenizer"


class ComponentLoadError(ComponentError):
    """A component file that cannot be built (the message names the file)."""


# ---------------------------------------------------------------------------- state dicts

FP8_TYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return dequantize_scaled_fp8(load_file(str(path)))
    if path.suffix.lower() == ".gguf":  # city96's quantized transformers: diffusers' GGUF reader
        from diffusers.models.model_loading_utils import load_gguf_checkpoint

        return load_gguf_checkpoint(str(path))
    from ..fileinfo import ckpt_keys

    ckpt_keys(path)  # refuses pickles that need more than tensors
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj) if isinstance(obj, dict) else obj


def dequantize_scaled_fp8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's "scaled" fp8 files: each fp8 ``<layer>.weight`` has a ``<layer>.scale_weight``
    (real weight = stored weight x scale; ``scale_input`` and the ``scaled_fp8`` marker are for
    fp8 matmuls). They are dequantized here, at load, to float32 (then cast to the running dtype):
    a per-tensor scale cannot ride diffusers' layerwise-casting hook, which only changes dtype."""
    scales = [k for k in sd if k.endswith(".scale_weight")]
    if not scales and not any(k.endswith("scaled_fp8") for k in sd):
        return sd
    out = dict(sd)
    for k in scales:
        weight = k[:-len("scale_weight")] + "weight"
        scale = out.pop(k).to(torch.float32)
        if weight in out:
            out[weight] = out[weight].to(torch.float32) * scale
    return {k: v for k, v in out.items() if not k.endswith((".scale_input", "scaled_fp8"))}


def to_running_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast to the running dtype; weights stored as fp8 stay fp8 in memory and are upcast layer
    by layer for each forward (diffusers' layerwise casting: Linear / Conv weights, norms and
    embeddings kept in the running dtype), so an fp8 Flux.1-dev needs about half the memory of
    bf16. The round trip fp8 -> running dtype -> fp8 is exact."""
    fp8 = next((p.dtype for p in model.parameters() if p.dtype in FP8_TYPES), None)
    model.to(dtype)
    if fp8 is not None:
        from diffusers.hooks import apply_layerwise_casting

        apply_layerwise_casting(model, storage_dtype=fp8, compute_dtype=dtype)
    return model


def split_all_in_one(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A ComfyUI-layout checkpoint -> {"transformer": ..., "clip_l": ..., "vae": ...} (parts present)."""
    parts: dict[str, dict] = {}
    taken: set[str] = set()
    for kind, prefixes in INSIDE_PREFIXES.items():
        for prefix in prefixes:
            part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and k not in taken}
            if part:
                parts[kind] = part
                taken.update(prefix + k for k in part)
                break
    rest = {k: v for k, v in sd.items() if k not in taken}
    if any(k.startswith(BFL_PREFIX) for k in rest):
        rest = {k[len(BFL_PREFIX):]: v for k, v in rest.items() if k.startswith(BFL_PREFIX)}
    parts["transformer"] = rest
    return parts


def _dims(t: torch.Tensor) -> tuple[int, ...]:
    """A tensor's logical shape (a GGUF-quantized one holds bytes: its ``quant_shape`` is the weight's)."""
    return tuple(int(x) for x in getattr(t, "quant_shape", t.shape))


def _is_gguf(t) -> bool:
    return hasattr(t, "quant_type") and hasattr(t, "quant_shape")


def _count(sd, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m[1]) for k in sd if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _build(cls, config, sd: dict, what: str, *, rename=None, compute_dtype: torch.dtype = torch.float32):
    """``cls(config)`` on the meta device, then the tensors assigned (strict: a missing or extra
    tensor is an error naming the file's part). GGUF-quantized weights go into diffusers'
    GGUFLinear layers, which dequantize them per forward in ``compute_dtype``."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = cls(config) if not isinstance(config, dict) else cls(**config)
    quantized = {k for k, v in sd.items() if _is_gguf(v)}
    if quantized:
        from diffusers.quantizers.gguf.utils import _replace_with_gguf_linear

        _replace_with_gguf_linear(model, compute_dtype, sd)
    own = model.state_dict()
    if rename is not None:
        sd = rename(sd, own)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ComponentLoadError(f"{what}: tensors do not match the architecture read from it "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in sd.items():
        if _dims(v) != tuple(own[k].shape):
            raise ComponentLoadError(f"{what}: {k} is {_dims(v)}, expected {tuple(own[k].shape)}")
    # Contiguous copies of split views (fused qkv): a strided weight rounds matmuls differently.
    plain = {k: v if v.is_contiguous() else v.contiguous() for k, v in sd.items() if k not in quantized}
    model.load_state_dict(plain, assign=True, strict=not quantized)
    for k in quantized:  # byte-shaped: set as they are (load_state_dict would compare shapes)
        owner, _, name = k.rpartition(".")
        v = sd[k]
        model.get_submodule(owner)._parameters[name] = type(v)(v.contiguous(), quant_type=v.quant_type)
    return model.eval()


# ---------------------------------------------------------------------------- Flux transformer

def _swap_scale_shift(w: torch.Tensor) -> torch.Tensor:
    # BFL's final AdaLayerNorm splits (shift, scale); diffusers' (scale, shift).
    shift, scale = w.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def _flux_layout_config(sd: dict) -> dict:
    """What Flux.1 and Chroma share: width, heads, block counts, channels, text width, rotary axes."""
    inner, in_channels = _dims(sd["img_in.weight"])
    head = _dims(sd["double_blocks.0.img_attn.norm.query_norm.scale"] if "double_blocks.0.img_attn.norm.query_norm.scale"
                 in sd else sd["single_blocks.0.norm.query_norm.scale"])[0]
    cfg = dict(patch_size=1, in_channels=int(in_channels), num_layers=_count(sd, r"double_blocks\.(\d+)\."),
               num_single_layers=_count(sd, r"single_blocks\.(\d+)\."), attention_head_dim=int(head),
               num_attention_heads=int(inner // head), joint_attention_dim=_dims(sd["txt_in.weight"])[1],
               axes_dims_rope=(16, 56, 56) if head == 128 else (head // 4, head // 4, head // 2))
    out = _dims(sd["final_layer.linear.weight"])[0]
    if out != in_channels:
        cfg["out_channels"] = out
    return cfg


def _with_sidecar(cfg: dict, sidecar: dict | None) -> dict:
    for k, v in (sidecar or {}).items():
        if not k.startswith("_") and (k in cfg or k == "out_channels"):
            cfg[k] = tuple(v) if isinstance(v, list) else v
    return cfg


def flux_config(sd: dict, sidecar: dict | None = None) -> dict:
    cfg = _flux_layout_config(sd)
    cfg.update(pooled_projection_dim=_dims(sd["vector_in.in_layer.weight"])[1],
               guidance_embeds="guidance_in.in_layer.weight" in sd)
    return _with_sidecar(cfg, sidecar)


def flux_bfl_to_diffusers(sd: dict, cfg: dict, *, modulated: bool = True) -> dict:
    """BFL keys -> diffusers' FluxTransformer2DModel keys (the inverse is tests/flow_files.py);
    ``modulated`` False: Chroma's blocks, which have no modulation layers of their own (its
    approximator gives every block its shifts and scales) and no final adaLN."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}
    inner = cfg["attention_head_dim"] * cfg["num_attention_heads"]

    def take(dst, src):
        out[dst] = sd.pop(src)

    for dst, src in (("time_text_embed.timestep_embedder", "time_in"), ("time_text_embed.text_embedder", "vector_in"),
                     ("time_text_embed.guidance_embedder", "guidance_in")):
        if f"{src}.in_layer.weight" in sd:
            for a, b in (("linear_1", "in_layer"), ("linear_2", "out_layer")):
                for p in ("weight", "bias"):
                    take(f"{dst}.{a}.{p}", f"{src}.{b}.{p}")
    for p in ("weight", "bias"):
        take(f"context_embedder.{p}", f"txt_in.{p}")
        take(f"x_embedder.{p}", f"img_in.{p}")
        take(f"proj_out.{p}", f"final_layer.linear.{p}")
        if modulated:
            out[f"norm_out.linear.{p}"] = _swap_scale_shift(sd.pop(f"final_layer.adaLN_modulation.1.{p}"))
    for i in range(cfg["num_layers"]):
        b, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for p in ("weight", "bias"):
            if modulated:
                take(f"{b}norm1.linear.{p}", f"{d}img_mod.lin.{p}")
                take(f"{b}norm1_context.linear.{p}", f"{d}txt_mod.lin.{p}")
            for (q, k, v), src in ((("to_q", "to_k", "to_v"), "img_attn"),
                                   (("add_q_proj", "add_k_proj", "add_v_proj"), "txt_attn")):
                for name, t in zip((q, k, v), torch.chunk(sd.pop(f"{d}{src}.qkv.{p}"), 3, dim=0)):
                    out[f"{b}attn.{name}.{p}"] = t
            take(f"{b}ff.net.0.proj.{p}", f"{d}img_mlp.0.{p}")
            take(f"{b}ff.net.2.{p}", f"{d}img_mlp.2.{p}")
            take(f"{b}ff_context.net.0.proj.{p}", f"{d}txt_mlp.0.{p}")
            take(f"{b}ff_context.net.2.{p}", f"{d}txt_mlp.2.{p}")
            take(f"{b}attn.to_out.0.{p}", f"{d}img_attn.proj.{p}")
            take(f"{b}attn.to_add_out.{p}", f"{d}txt_attn.proj.{p}")
        take(f"{b}attn.norm_q.weight", f"{d}img_attn.norm.query_norm.scale")
        take(f"{b}attn.norm_k.weight", f"{d}img_attn.norm.key_norm.scale")
        take(f"{b}attn.norm_added_q.weight", f"{d}txt_attn.norm.query_norm.scale")
        take(f"{b}attn.norm_added_k.weight", f"{d}txt_attn.norm.key_norm.scale")
    for i in range(cfg["num_single_layers"]):
        b, s = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for p in ("weight", "bias"):
            if modulated:
                take(f"{b}norm.linear.{p}", f"{s}modulation.lin.{p}")
            fused = sd.pop(f"{s}linear1.{p}")
            q, k, v, mlp = torch.split(fused, (inner, inner, inner, _dims(fused)[0] - 3 * inner), dim=0)
            for name, t in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", mlp)):
                out[f"{b}{name}.{p}"] = t
            take(f"{b}proj_out.{p}", f"{s}linear2.{p}")
        take(f"{b}attn.norm_q.weight", f"{s}norm.query_norm.scale")
        take(f"{b}attn.norm_k.weight", f"{s}norm.key_norm.scale")
    if sd:
        raise ComponentLoadError(f"unknown {'Flux' if modulated else 'Chroma'} tensors: {sorted(sd)[:3]}")
    return out


def build_flux_transformer(sd: dict, what: str, sidecar: dict | None = None, dtype: torch.dtype = torch.float32):
    from diffusers import FluxTransformer2DModel

    if "img_in.weight" not in sd:
        raise ComponentLoadError(f"{what}: not a Flux transformer in BFL layout (no img_in)")
    cfg = flux_config(sd, sidecar)
    return _build(FluxTransformer2DModel, cfg, flux_bfl_to_diffusers(sd, cfg), what, compute_dtype=dtype)


# ---------------------------------------------------------------------------- Chroma transformer

APPROXIMATOR = "distilled_guidance_layer."


def chroma_config(sd: dict, sidecar: dict | None = None) -> dict:
    """Flux.1's layout read as Flux.1's, plus the approximator: its input channels (timestep and
    guidance embeddings and the modulation index, 64 in Chroma), hidden width and layer count."""
    cfg = _flux_layout_config(sd)
    hidden, channels = _dims(sd[f"{APPROXIMATOR}in_proj.weight"])
    cfg.update(approximator_num_channels=int(channels), approximator_hidden_dim=int(hidden),
               approximator_layers=_count(sd, re.escape(APPROXIMATOR) + r"layers\.(\d+)\."))
    return _with_sidecar(cfg, sidecar)


def chroma_bfl_to_diffusers(sd: dict, cfg: dict) -> dict:
    """lodestones' / ComfyUI's Chroma keys -> diffusers' ChromaTransformer2DModel keys: the
    approximator (``in_layer`` / ``out_layer`` MLPs, RMS norms' ``scale``) renamed, the blocks as
    Flux.1's without their modulation layers."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}
    g = APPROXIMATOR
    for p in ("weight", "bias"):
        out[f"{g}in_proj.{p}"] = sd.pop(f"{g}in_proj.{p}")
        out[f"{g}out_proj.{p}"] = sd.pop(f"{g}out_proj.{p}")
        for i in range(cfg["approximator_layers"]):
            out[f"{g}layers.{i}.linear_1.{p}"] = sd.pop(f"{g}layers.{i}.in_layer.{p}")
            out[f"{g}layers.{i}.linear_2.{p}"] = sd.pop(f"{g}layers.{i}.out_layer.{p}")
    for i in range(cfg["approximator_layers"]):
        out[f"{g}norms.{i}.weight"] = sd.pop(f"{g}norms.{i}.scale")
    out.update(flux_bfl_to_diffusers(sd, cfg, modulated=False))
    return out


def build_chroma_transformer(sd: dict, what: str, sidecar: dict | None = None, dtype: torch.dtype = torch.float32):
    from diffusers import ChromaTransformer2DModel

    if "img_in.weight" not in sd or f"{APPROXIMATOR}in_proj.weight" not in sd:
        raise ComponentLoadError(f"{what}: not a Chroma transformer in lodestones' (BFL) layout")
    cfg = chroma_config(sd, sidecar)
    try:
        converted = chroma_bfl_to_diffusers(sd, cfg)
    except KeyError as e:
        raise ComponentLoadError(f"{what}: Chroma tensor {e} is missing") from None
    except ComponentLoadError as e:  # tensors Chroma does not have
        raise ComponentLoadError(f"{what}: {e}") from None
    return _build(ChromaTransformer2DModel, cfg, converted, what, compute_dtype=dtype)


# ---------------------------------------------------------------------------- SD 3 transformer

def sd3_config(sd: dict, sidecar: dict | None = None) -> dict:
    from diffusers.loaders.single_file_utils import get_attn2_layers

    inner, in_channels, patch, _ = _dims(sd["x_embedder.proj.weight"])  # (inner, in_channels, patch, patch)
    layers = _count(sd, r"joint_blocks\.(\d+)\.")
    pos = _dims(sd["pos_embed"])[1]                  # (1, grid * grid, inner)
    grid = int(round(math.sqrt(pos)))
    out_channels = _dims(sd["final_layer.linear.weight"])[0] // (patch * patch)
    # sample_size is only the pipeline's default size (the position grid is cropped per image): 128
    # latents (1024 px) as published, the grid itself when smaller.
    cfg = dict(sample_size=min(grid, 128), patch_size=patch, in_channels=in_channels,
               out_channels=out_channels, num_layers=layers, attention_head_dim=64 if inner >= 512 else 8,
               num_attention_heads=inner // (64 if inner >= 512 else 8),
               joint_attention_dim=_dims(sd["context_embedder.weight"])[1],
               caption_projection_dim=_dims(sd["context_embedder.weight"])[0],
               pooled_projection_dim=_dims(sd["y_embedder.mlp.0.weight"])[1], pos_embed_max_size=grid,
               dual_attention_layers=tuple(get_attn2_layers(sd)),
               qk_norm="rms_norm" if any("ln_q" in k for k in sd) else None)
    for k, v in (sidecar or {}).items():
        if not k.startswith("_") and k in cfg:
            cfg[k] = tuple(v) if isinstance(v, list) else v
    return cfg


def build_sd3_transformer(sd: dict, what: str, sidecar: dict | None = None, dtype: torch.dtype = torch.float32):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    if "x_embedder.proj.weight" not in sd:
        raise ComponentLoadError(f"{what}: not an SD 3 transformer in Stability's layout (no x_embedder)")
    cfg = sd3_config(sd, sidecar)
    return _build(SD3Transformer2DModel, cfg, convert_sd3_transformer_checkpoint_to_diffusers(dict(sd)), what,
                  compute_dtype=dtype)


# ---------------------------------------------------------------------------- VAE

def vae_config(sd: dict, family: str) -> dict:
    n = _count(sd, r"encoder\.down\.(\d+)\.")
    widths = tuple(int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(n))
    fam = spec(family)
    return dict(in_channels=int(sd["encoder.conv_in.weight"].shape[1]),
                out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                block_out_channels=widths, layers_per_block=_count(sd, r"encoder\.down\.0\.block\.(\d+)\."),
                latent_channels=int(sd["decoder.conv_in.weight"].shape[1]),
                norm_num_groups=math.gcd(32, min(widths)), sample_size=1024 if min(widths) >= 128 else 64,
                use_quant_conv="quant_conv.weight" in sd, use_post_quant_conv="post_quant_conv.weight" in sd,
                mid_block_add_attention="encoder.mid.attn_1.q.weight" in sd,
                scaling_factor=fam.vae_scaling_factor, shift_factor=fam.vae_shift_factor)


def build_vae(sd: dict, family: str, what: str):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if "decoder.up_blocks.0.resnets.0.conv1.weight" in sd:  # already diffusers' layout
        raise ComponentLoadError(f"{what}: diffusers-layout VAE files are not read; use the LDM / BFL layout file")
    if "encoder.down.0.block.0.conv1.weight" not in sd:
        raise ComponentLoadError(f"{what}: not a VAE in LDM / BFL layout")
    cfg = vae_config(sd, family)
    return _build(AutoencoderKL, cfg, convert_ldm_vae_checkpoint(sd, cfg), what)


# ---------------------------------------------------------------------------- text encoders

def _strip_text_model(sd: dict, own: dict) -> dict:
    """Match a file's CLIP keys (``text_model.`` or not) to what the installed transformers names."""
    def bare(k):
        return k[len("text_model."):] if k.startswith("text_model.") else k

    by_bare = {bare(k): k for k in own}
    out = {}
    for k, v in sd.items():
        if bare(k) in by_bare:
            out[by_bare[bare(k)]] = v
        elif not k.endswith("position_ids"):
            out[k] = v
    return out


def build_clip(sd: dict, what: str, *, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    key = next((k for k in sd if k.endswith("embeddings.token_embedding.weight")), None)
    if key is None:
        raise ComponentLoadError(f"{what}: not a CLIP text encoder")
    pre = key[:-len("embeddings.token_embedding.weight")]
    vocab, hidden = (int(x) for x in sd[key].shape)
    proj = sd.get("text_projection.weight")
    if projection and proj is None:
        raise ComponentLoadError(f"{what}: this CLIP file has no text_projection (SD 3 needs it)")
    if not projection:
        sd.pop("text_projection.weight", None)
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden,
                         intermediate_size=int(sd[f"{pre}encoder.layers.0.mlp.fc1.weight"].shape[0]),
                         num_hidden_layers=_count(sd, re.escape(pre) + r"encoder\.layers\.(\d+)\."),
                         num_attention_heads=hidden // 64 if hidden >= 512 else hidden // 8,
                         max_position_embeddings=int(sd[f"{pre}embeddings.position_embedding.weight"].shape[0]),
                         hidden_act="gelu" if hidden == 1280 else "quick_gelu", layer_norm_eps=1e-5,
                         projection_dim=int(proj.shape[0]) if proj is not None else hidden,
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return _build(CLIPTextModelWithProjection if projection else CLIPTextModel, cfg, sd, what,
                  rename=_strip_text_model)


def build_t5(sd: dict, what: str):
    from transformers import T5Config, T5EncoderModel

    sd = dict(sd)
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    if "encoder.embed_tokens.weight" not in sd and "shared.weight" in sd:
        sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    bias = sd.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    if bias is None or "shared.weight" not in sd:
        raise ComponentLoadError(f"{what}: not a T5 encoder (HF transformers layout)")
    vocab, d_model = (int(x) for x in sd["shared.weight"].shape)
    buckets, heads = (int(x) for x in bias.shape)
    inner = int(sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0])
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    d_ff = sd["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"].shape[0]
    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=int(d_ff),
                   num_layers=_count(sd, r"encoder\.block\.(\d+)\."), num_heads=heads,
                   relative_attention_num_buckets=buckets, dropout_rate=0.0,
                   feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False,
                   use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return _build(T5EncoderModel, cfg, sd, what)


def clip_tokenizer(pad: str = "<|endoftext|>"):
    """CLIP's BPE tokenizer from the shipped files (configs/clip-tokenizer); CLIP-G pads with "!"."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(CLIP_TOKENIZER / "vocab.json"), str(CLIP_TOKENIZER / "merges.txt"),
                         model_max_length=77, pad_token=pad)


def t5_tokenizer(folder: Path | None, text_encoders_dir_hint: str):
    if folder is None:
        raise ComponentLoadError(f"no T5 tokenizer: put T5's tokenizer (spiece.model or tokenizer.json with its "
                                 f"tokenizer_config.json, e.g. from google/t5-v1_1-xxl) in "
                                 f"{text_encoders_dir_hint}/{T5_TOKENIZER_FOLDER}/")
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True, model_max_length=512)


# ---------------------------------------------------------------------------- pipelines

def _sidecar(path: Path) -> dict | None:
    cfg = path.with_name(path.stem + ".config") / "transformer" / "config.json"
    try:
        return json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None


def _component_parts(modules, model_parts: dict) -> dict[str, tuple[dict | Path, str]]:
    """{kind: (tensors or component file, what)} from the model file's own parts and the chosen
    component files (read when built: a shared module already built is not read again)."""
    parts: dict = {k: (v, f"the {k} inside the model file") for k, v in model_parts.items() if k != "transformer"}
    for path in modules:
        path = Path(path)
        from ..fileinfo import read_safetensors_header

        try:
            kind = classify(read_safetensors_header(path), path.name)[0]
        except (OSError, ValueError) as e:
            raise ComponentLoadError(f"{path.name}: {e}") from None
        parts[kind] = (path, path.name)
    return parts


def _need(parts, kind: str, model: str):
    if kind not in parts:
        raise ComponentLoadError(f"{model}: no {kind} (name a module for it)")
    return parts[kind]


def _part(source: dict | Path, what: str, role: str, build, dtype: torch.dtype, shared):
    """The module ``build(tensors, what)`` in the running dtype; from a component file through
    ``shared`` (engine/sharedparts.py) when given, so models naming the same file hold one module."""
    def make():
        if isinstance(source, Path):
            try:
                sd = load_tensors(source)
            except (OSError, ValueError) as e:
                raise ComponentLoadError(f"{source.name}: {e}") from None
        else:
            sd = source
        return to_running_dtype(build(sd, what), dtype)

    if isinstance(source, Path) and shared is not None:
        return shared.get(source, role, dtype, make)
    return make()


def load_flow_single_file(entry, dtype: torch.dtype, shared=None):
    """A Flux.1 / SD 3.x / Chroma transformer-only or all-in-one file, with ``entry.modules`` for the
    parts it lacks, as the family's diffusers pipeline. With ``shared`` (a SharedParts), text
    encoders and VAEs from component files are the ones other resident models already hold."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    path = Path(entry.path)
    fam = spec(entry.family)
    model_parts = split_all_in_one(load_tensors(path))
    parts = _component_parts(entry.modules, model_parts)
    sidecar = _sidecar(path)
    hint = str(Path(entry.t5_tokenizer).parent) if entry.t5_tokenizer else "stable_diffusion/text_encoders"

    def part(kind: str, role: str, build):
        return _part(*_need(parts, kind, path.name), role, build, dtype, shared)

    def vae(sd, what):
        return build_vae(sd, entry.family, what)

    def clip(projection: bool):
        return lambda sd, what: build_clip(sd, what, projection=projection)

    if entry.family == "chroma":  # T5 alone (no CLIP) and Flux.1's VAE
        transformer = build_chroma_transformer(model_parts["transformer"], path.name, sidecar, dtype)
        sched = fam.scheduler
        components = dict(text_encoder=part(T5XXL, "t5", build_t5), tokenizer=t5_tokenizer(entry.t5_tokenizer, hint),
                          vae=part(VAE, f"vae:{entry.family}", vae))
    elif component_family(entry.family) == "flux1":  # Flux.1 and Flux.1 Fill (384 input channels)
        transformer = build_flux_transformer(model_parts["transformer"], path.name, sidecar, dtype)
        sched = fam.scheduler if transformer.config.guidance_embeds else fam.scheduler_undistilled
        components = dict(text_encoder=part(CLIP_L, "clip", clip(False)), tokenizer=clip_tokenizer(),
                          text_encoder_2=part(T5XXL, "t5", build_t5),
                          tokenizer_2=t5_tokenizer(entry.t5_tokenizer, hint),
                          vae=part(VAE, f"vae:{entry.family}", vae))
    elif entry.family == "sd3":
        transformer = build_sd3_transformer(model_parts["transformer"], path.name, sidecar, dtype)
        sched = fam.scheduler
        t5 = T5XXL in parts
        components = dict(text_encoder=part(CLIP_L, "clip:projection", clip(True)), tokenizer=clip_tokenizer(),
                          text_encoder_2=part(CLIP_G, "clip:projection", clip(True)),
                          tokenizer_2=clip_tokenizer(pad="!"),
                          # No T5 file: SD 3 runs with zeros for T5's part, as diffusers does.
                          text_encoder_3=part(T5XXL, "t5", build_t5) if t5 else None,
                          tokenizer_3=t5_tokenizer(entry.t5_tokenizer, hint) if t5 else None,
                          vae=part(VAE, f"vae:{entry.family}", vae))
    else:
        raise ComponentLoadError(f"{path.name}: {fam.label} files are not read by the flow loader")
    cls = getattr(diffusers, fam.pipeline)
    return cls(scheduler=FlowMatchEulerDiscreteScheduler(**sched), transformer=to_running_dtype(transformer, dtype),
               **components)


def replace_vae(own, modules, dtype: torch.dtype):
    """A1111's ``sd_vae``: a VAE file (LDM layout, as A1111 VAEs and Flux's ae are stored) in place
    of a model's own, built on the model's VAE config (its scaling and shift factors stay)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    (path,) = [Path(m) for m in modules]  # resolve_modules allows one VAE and nothing else here
    sd = load_tensors(path)
    for prefix in INSIDE_PREFIXES[VAE]:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if "encoder.down.0.block.0.conv1.weight" not in sd:
        raise ComponentLoadError(f"{path.name}: not a VAE in LDM layout")
    config = {k: v for k, v in dict(own.config).items() if not k.startswith("_")}
    converted = convert_ldm_vae_checkpoint(sd, config)
    vae = _build(AutoencoderKL, config, {k: v for k, v in converted.items() if not k.startswith("loss.")},
                 path.name)
    return vae.to(device=own.device, dtype=dtype)


def upcast_fp8_adapters(pipe) -> None:
    """PEFT gives LoRA weights the stored type of the layer they adapt -- fp8 for fp8-stored
    layers, in which nothing computes -- and no layerwise-casting hook covers them: they go to the
    running dtype (they are small). They passed through fp8 once on the way (PEFT's cast)."""
    module = getattr(pipe, "transformer", None)
    if module is None:
        return
    compute = module.dtype  # diffusers reports the layerwise-casting compute dtype
    for name, p in module.named_parameters():
        if "lora_" in name and p.dtype in FP8_TYPES:
            p.data = p.data.to(compute)
