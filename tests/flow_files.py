"""Tiny Flux.1 / SD 3.x pipelines written out the way people store the real ones: transformer-only
files in BFL / Stability layout, component files (HF-transformers CLIP / T5, LDM / BFL VAE) and
ComfyUI-layout all-in-one checkpoints. These are the inverse of engine/convert_flow.py's
mappings, written independently (from the published key layouts) so a test of the pair can fail.
"""
from __future__ import annotations

from pathlib import Path

import torch

FLUX_VAE_NAME, SD3_VAE_NAME = "ae", "sd3_vae"


def tiny_flux_for_files(seed: int = 0, guidance: bool = True):
    """The tiny Flux pipeline with a CLIP-L that speaks the shipped CLIP tokenizer (49408 tokens),
    as published clip_l files do: single files carry no tokenizer, the service ships CLIP's."""
    from diffusionapi.demo import tiny_flux_pipeline
    from diffusionapi.engine.convert_flow import clip_tokenizer

    pipe = tiny_flux_pipeline(seed, guidance=guidance)
    pipe.text_encoder = full_vocab_clip(pipe.text_encoder, seed)
    pipe.tokenizer = clip_tokenizer()
    return pipe


def tiny_sd3_for_files(seed: int = 0):
    from diffusionapi.demo import tiny_sd3_pipeline
    from diffusionapi.engine.convert_flow import clip_tokenizer

    pipe = tiny_sd3_pipeline(seed)
    pipe.text_encoder = full_vocab_clip(pipe.text_encoder, seed)
    pipe.text_encoder_2 = full_vocab_clip(pipe.text_encoder_2, seed + 1)
    pipe.tokenizer, pipe.tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad="!")
    return pipe


def full_vocab_clip(te, seed: int):
    """``te`` with CLIP's real vocabulary size (its other weights kept)."""
    cfg = te.config
    vocab = 49408
    new_cfg = type(cfg)(**{**cfg.to_dict(), "vocab_size": vocab, "bos_token_id": vocab - 2,
                           "eos_token_id": vocab - 1, "pad_token_id": vocab - 1})
    new = type(te)(new_cfg).eval()
    sd = te.state_dict()
    g = torch.Generator().manual_seed(seed + 77)
    key = next(k for k in sd if k.endswith("token_embedding.weight"))
    sd[key] = torch.randn(vocab, cfg.hidden_size, generator=g) * 0.02
    new.load_state_dict(sd)
    return new


# ---------------------------------------------------------------------------- diffusers -> original keys

def _blocks_to_bfl(sd: dict, out: dict, modulation: bool) -> None:
    """diffusers' double and single transformer blocks (taken out of ``sd``) -> BFL's
    ``double_blocks.N`` / ``single_blocks.N`` (into ``out``); ``modulation``: with each block's
    modulation layers (Flux.1; Chroma's blocks have none)."""
    def put(dst, src):
        out[dst] = sd.pop(src)

    for i in sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")}):
        b, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for p in ("weight", "bias"):
            if modulation:
                put(f"{d}img_mod.lin.{p}", f"{b}norm1.linear.{p}")
                put(f"{d}txt_mod.lin.{p}", f"{b}norm1_context.linear.{p}")
            out[f"{d}img_attn.qkv.{p}"] = torch.cat([sd.pop(f"{b}attn.to_{x}.{p}") for x in "qkv"])
            out[f"{d}txt_attn.qkv.{p}"] = torch.cat([sd.pop(f"{b}attn.add_{x}_proj.{p}") for x in "qkv"])
            put(f"{d}img_attn.proj.{p}", f"{b}attn.to_out.0.{p}")
            put(f"{d}txt_attn.proj.{p}", f"{b}attn.to_add_out.{p}")
            put(f"{d}img_mlp.0.{p}", f"{b}ff.net.0.proj.{p}")
            put(f"{d}img_mlp.2.{p}", f"{b}ff.net.2.{p}")
            put(f"{d}txt_mlp.0.{p}", f"{b}ff_context.net.0.proj.{p}")
            put(f"{d}txt_mlp.2.{p}", f"{b}ff_context.net.2.{p}")
        put(f"{d}img_attn.norm.query_norm.scale", f"{b}attn.norm_q.weight")
        put(f"{d}img_attn.norm.key_norm.scale", f"{b}attn.norm_k.weight")
        put(f"{d}txt_attn.norm.query_norm.scale", f"{b}attn.norm_added_q.weight")
        put(f"{d}txt_attn.norm.key_norm.scale", f"{b}attn.norm_added_k.weight")
    for i in sorted({int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")}):
        b, s = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for p in ("weight", "bias"):
            if modulation:
                put(f"{s}modulation.lin.{p}", f"{b}norm.linear.{p}")
            out[f"{s}linear1.{p}"] = torch.cat([sd.pop(f"{b}attn.to_{x}.{p}") for x in "qkv"]
                                               + [sd.pop(f"{b}proj_mlp.{p}")])
            put(f"{s}linear2.{p}", f"{b}proj_out.{p}")
        put(f"{s}norm.query_norm.scale", f"{b}attn.norm_q.weight")
        put(f"{s}norm.key_norm.scale", f"{b}attn.norm_k.weight")


def flux_to_bfl(sd: dict) -> dict:
    sd = dict(sd)
    out = {}

    def put(dst, src):
        out[dst] = sd.pop(src)

    for src, dst in (("time_text_embed.timestep_embedder", "time_in"), ("time_text_embed.text_embedder", "vector_in"),
                     ("time_text_embed.guidance_embedder", "guidance_in")):
        if f"{src}.linear_1.weight" in sd:
            for p in ("weight", "bias"):
                put(f"{dst}.in_layer.{p}", f"{src}.linear_1.{p}")
                put(f"{dst}.out_layer.{p}", f"{src}.linear_2.{p}")
    for p in ("weight", "bias"):
        put(f"txt_in.{p}", f"context_embedder.{p}")
        put(f"img_in.{p}", f"x_embedder.{p}")
        put(f"final_layer.linear.{p}", f"proj_out.{p}")
        scale, shift = sd.pop(f"norm_out.linear.{p}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    _blocks_to_bfl(sd, out, modulation=True)
    assert not sd, sorted(sd)[:5]
    return out


def vae_to_ldm(sd: dict) -> dict:
    """diffusers AutoencoderKL keys -> LDM / BFL ``ae.safetensors`` keys."""
    sd = dict(sd)
    n_up = len({k.split(".")[2] for k in sd if k.startswith("decoder.up_blocks.")})
    out = {}
    res = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for k, v in sd.items():
        parts = k.split(".")
        side = parts[0]
        rest = ".".join(parts[1:])
        if rest.startswith(("conv_in.", "conv_out.")) or side in ("quant_conv", "post_quant_conv"):
            out[k] = v
        elif rest.startswith("conv_norm_out."):
            out[f"{side}.norm_out.{parts[-1]}"] = v
        elif parts[1] in ("down_blocks", "up_blocks"):
            i = int(parts[2]) if parts[1] == "down_blocks" else n_up - 1 - int(parts[2])
            name = "down" if parts[1] == "down_blocks" else "up"
            if parts[3] == "resnets":
                out[f"{side}.{name}.{i}.block.{parts[4]}.{res[parts[5]]}.{parts[-1]}"] = v
            else:  # downsamplers.0.conv / upsamplers.0.conv
                out[f"{side}.{name}.{i}.{'downsample' if name == 'down' else 'upsample'}.conv.{parts[-1]}"] = v
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            out[f"{side}.mid.block_{int(parts[3]) + 1}.{res[parts[4]]}.{parts[-1]}"] = v
        elif parts[1] == "mid_block" and parts[2] == "attentions":
            sub = ".".join(parts[4:-1])
            t = v if sub == "group_norm" or v.ndim != 2 else v[:, :, None, None]
            out[f"{side}.mid.attn_1.{attn[sub]}.{parts[-1]}"] = t
        else:
            raise KeyError(k)
    return out


def clip_file(te) -> dict:
    """An HF-transformers CLIP state dict with ``text_model.`` prefixes, as clip_l / clip_g files have."""
    out = {}
    for k, v in te.state_dict().items():
        if k.endswith("position_ids"):
            continue
        out[k if k.startswith(("text_model.", "text_projection")) else "text_model." + k] = v
    return out


def t5_file(te) -> dict:
    return {k: v for k, v in te.state_dict().items() if k != "encoder.embed_tokens.weight"}


def save(sd: dict, path: Path, dtype=None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
               for k, v in sd.items()}, str(path))
    return path


def write_t5_tokenizer(pipe_tokenizer, text_encoders: Path) -> Path:
    folder = Path(text_encoders) / "t5-tokenizer"
    pipe_tokenizer.save_pretrained(str(folder))
    return folder


def write_flux_files(pipe, root: Path, name: str = "flux-tiny", *, components: bool = True,
                     all_in_one: str | None = None) -> dict[str, Path]:
    """``root``/models/<name>.safetensors (BFL transformer-only) and, with ``components``, the
    component files in ``root``/text_encoders and ``root``/vae; ``all_in_one`` also writes a
    ComfyUI-layout checkpoint of that name."""
    root = Path(root)
    bfl = flux_to_bfl(pipe.transformer.state_dict())
    files = {"transformer": save(bfl, root / "models" / f"{name}.safetensors")}
    clip, t5, vae = clip_file(pipe.text_encoder), t5_file(pipe.text_encoder_2), vae_to_ldm(pipe.vae.state_dict())
    if components:
        files["clip_l"] = save(clip, root / "text_encoders" / "clip_l.safetensors")
        files["t5xxl"] = save(t5, root / "text_encoders" / "t5xxl_fp16.safetensors")
        files["vae"] = save(vae, root / "vae" / f"{FLUX_VAE_NAME}.safetensors")
        write_t5_tokenizer(pipe.tokenizer_2, root / "text_encoders")
    if all_in_one:
        sd = {f"model.diffusion_model.{k}": v for k, v in bfl.items()}
        sd.update({f"text_encoders.clip_l.transformer.{k}": v for k, v in clip.items()})
        sd.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5.items()})
        sd.update({f"vae.{k}": v for k, v in vae.items()})
        files["all_in_one"] = save(sd, root / "models" / f"{all_in_one}.safetensors")
    return files


def sd3_to_stability(sd: dict) -> dict:
    """diffusers SD3Transformer2DModel keys -> Stability's MMDiT (``joint_blocks.*``) keys."""
    sd = dict(sd)
    out = {}

    def put(dst, src):
        out[dst] = sd.pop(src)

    def unswap(w):  # diffusers keeps (scale, shift); MMDiT (shift, scale)
        scale, shift = w.chunk(2, dim=0)
        return torch.cat([shift, scale])

    put("pos_embed", "pos_embed.pos_embed")
    for p in ("weight", "bias"):
        put(f"x_embedder.proj.{p}", f"pos_embed.proj.{p}")
        put(f"t_embedder.mlp.0.{p}", f"time_text_embed.timestep_embedder.linear_1.{p}")
        put(f"t_embedder.mlp.2.{p}", f"time_text_embed.timestep_embedder.linear_2.{p}")
        put(f"y_embedder.mlp.0.{p}", f"time_text_embed.text_embedder.linear_1.{p}")
        put(f"y_embedder.mlp.2.{p}", f"time_text_embed.text_embedder.linear_2.{p}")
        put(f"context_embedder.{p}", f"context_embedder.{p}")
        put(f"final_layer.linear.{p}", f"proj_out.{p}")
        out[f"final_layer.adaLN_modulation.1.{p}"] = unswap(sd.pop(f"norm_out.linear.{p}"))
    layers = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    for i in layers:
        b, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == layers[-1]
        for p in ("weight", "bias"):
            out[f"{x}attn.qkv.{p}"] = torch.cat([sd.pop(f"{b}attn.to_{n}.{p}") for n in "qkv"])
            out[f"{c}attn.qkv.{p}"] = torch.cat([sd.pop(f"{b}attn.add_{n}_proj.{p}") for n in "qkv"])
            put(f"{x}attn.proj.{p}", f"{b}attn.to_out.0.{p}")
            put(f"{x}adaLN_modulation.1.{p}", f"{b}norm1.linear.{p}")
            put(f"{x}mlp.fc1.{p}", f"{b}ff.net.0.proj.{p}")
            put(f"{x}mlp.fc2.{p}", f"{b}ff.net.2.{p}")
            if last:
                out[f"{c}adaLN_modulation.1.{p}"] = unswap(sd.pop(f"{b}norm1_context.linear.{p}"))
            else:
                put(f"{c}attn.proj.{p}", f"{b}attn.to_add_out.{p}")
                put(f"{c}adaLN_modulation.1.{p}", f"{b}norm1_context.linear.{p}")
                put(f"{c}mlp.fc1.{p}", f"{b}ff_context.net.0.proj.{p}")
                put(f"{c}mlp.fc2.{p}", f"{b}ff_context.net.2.{p}")
    assert not sd, sorted(sd)[:5]
    return out


def write_sd3_files(pipe, root: Path, name: str = "sd3-tiny", *, t5: bool = True,
                    all_in_one: str | None = None) -> dict[str, Path]:
    """``root``/models/<name>.safetensors (MMDiT transformer-only), clip_l / clip_g (/ t5xxl)
    component files and the VAE; ``all_in_one`` also writes an "incl_clips" checkpoint."""
    root = Path(root)
    mmdit = sd3_to_stability(pipe.transformer.state_dict())
    files = {"transformer": save(mmdit, root / "models" / f"{name}.safetensors")}
    clip_l, clip_g = clip_file(pipe.text_encoder), clip_file(pipe.text_encoder_2)
    vae = vae_to_ldm(pipe.vae.state_dict())
    files["clip_l"] = save(clip_l, root / "text_encoders" / "clip_l.safetensors")
    files["clip_g"] = save(clip_g, root / "text_encoders" / "clip_g.safetensors")
    files["vae"] = save(vae, root / "vae" / f"{SD3_VAE_NAME}.safetensors")
    if t5:
        files["t5xxl"] = save(t5_file(pipe.text_encoder_3), root / "text_encoders" / "t5xxl_fp16.safetensors")
        write_t5_tokenizer(pipe.tokenizer_3, root / "text_encoders")
    if all_in_one:
        sd = {f"model.diffusion_model.{k}": v for k, v in mmdit.items()}
        sd.update({f"text_encoders.clip_l.transformer.{k}": v for k, v in clip_l.items()})
        sd.update({f"text_encoders.clip_g.transformer.{k}": v for k, v in clip_g.items()})
        if t5:
            sd.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5_file(pipe.text_encoder_3).items()})
        sd.update({f"first_stage_model.{k}": v for k, v in vae.items()})
        files["all_in_one"] = save(sd, root / "models" / f"{all_in_one}.safetensors")
    return files


def fp8_copy(sd: dict, *, scaled: bool = False) -> dict:
    """Weights (2-D and up) as float8_e4m3fn, as fp8 checkpoints store them; ``scaled``: ComfyUI's
    "scaled fp8" (each weight divided by a per-tensor scale that maps its largest value to fp8's
    448, with ``<layer>.scale_weight`` and the ``scaled_fp8`` marker)."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim >= 2:
            if scaled:
                scale = (v.abs().max() / 448.0).clamp(min=1e-12).to(torch.float32)
                out[k] = (v / scale).to(torch.float8_e4m3fn)
                out[k[:-len("weight")] + "scale_weight"] = scale.reshape(())
            else:
                out[k] = v.to(torch.float8_e4m3fn)
        else:
            out[k] = v
    if scaled:
        out["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    return out


def write_gguf(sd: dict, path: Path, arch: str = "flux", qtype: str = "Q8_0", type_of=None) -> Path:
    """A city96-style GGUF transformer: BFL key names, 2-D weights quantized to ``qtype`` (or
    ``type_of(name)``, "F16" for none; legacy types with the gguf package's encoder, K-quants with
    tests/gguf_kquants.py); a weight whose rows the type's block does not divide (K-quants: 256)
    stays F16, as city96's patched llama-quantize leaves it, or F32 when it has at most 1024
    values, as city96's convert.py keeps small tensors; the rest (biases, norm scales) F32."""
    import gguf
    import numpy as np

    from .gguf_kquants import K_QUANTIZERS

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for k, v in sd.items():
        data = v.detach().to(torch.float32).contiguous().numpy()
        name = type_of(k) if type_of is not None else qtype
        kind = gguf.GGMLQuantizationType[name]
        if (k.endswith(".weight") and data.ndim == 2 and kind != gguf.GGMLQuantizationType.F16
                and data.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0] == 0):
            q = K_QUANTIZERS[name](data) if name in K_QUANTIZERS else gguf.quants.quantize(data, kind)
            writer.add_tensor(k, q, raw_dtype=kind)
        elif k.endswith(".weight") and data.ndim == 2 and data.size > 1024:
            writer.add_tensor(k, data.astype(np.float16))
        else:
            writer.add_tensor(k, data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


FLUX_UNQUANTIZED = ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")


def city96_flux_q4_k_m(name: str) -> str:
    """The block type city96's llama-quantize patch gives a Flux (BFL-named) tensor in a Q4_K_M
    file: the input, time / pooled-text / guidance embedders and the final layer unquantized (F16),
    the fused attention qkv in Q5_K, the rest Q4_K."""
    if name.startswith(FLUX_UNQUANTIZED):
        return "F16"
    return "Q5_K" if "attn.qkv.weight" in name else "Q4_K"


def wide_flux_transformer(seed: int = 0, guidance: bool = True):
    """Tiny Flux.1's transformer 256 channels wide (4 heads of 64; rotary axes 16/16/32, the
    split the converter reads for head size 64), so its attention and MLP rows fill K-quants'
    256-value super-blocks; text widths as tiny Flux's, so it runs with the same component files."""
    from diffusers import FluxTransformer2DModel

    from diffusionapi.demo import FLUX_T5, FLUX_TE

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=64, num_attention_heads=4, joint_attention_dim=FLUX_T5,
                                  pooled_projection_dim=FLUX_TE, axes_dims_rope=(16, 16, 32),
                                  guidance_embeds=guidance).eval()


# ---------------------------------------------------------------------------- Chroma

def chroma_to_bfl(sd: dict) -> dict:
    """diffusers ChromaTransformer2DModel keys -> lodestones' / ComfyUI's Chroma keys: Flux.1's
    BFL block names without the modulation layers (``img_mod``, ``txt_mod``, ``modulation``,
    the final adaLN), and the approximator as ``distilled_guidance_layer.{in_proj, layers.N.
    {in_layer, out_layer}, norms.N.scale, out_proj}``."""
    sd = dict(sd)
    out = {}

    def put(dst, src):
        out[dst] = sd.pop(src)

    g = "distilled_guidance_layer."
    for k in [k for k in sd if k.startswith(g)]:
        rest = k[len(g):]
        if rest.startswith("norms."):
            out[g + rest.replace(".weight", ".scale")] = sd.pop(k)
        else:
            out[g + rest.replace(".linear_1.", ".in_layer.").replace(".linear_2.", ".out_layer.")] = sd.pop(k)
    for p in ("weight", "bias"):
        put(f"txt_in.{p}", f"context_embedder.{p}")
        put(f"img_in.{p}", f"x_embedder.{p}")
        put(f"final_layer.linear.{p}", f"proj_out.{p}")
    _blocks_to_bfl(sd, out, modulation=False)
    assert not sd, sorted(sd)[:5]
    return out


def write_chroma_files(pipe, root: Path, name: str = "chroma-tiny", *, all_in_one: str | None = None) -> dict[str, Path]:
    """``root``/models/<name>.safetensors (Chroma transformer-only, lodestones' keys), the T5 and
    Flux VAE component files with the T5 tokenizer (Chroma has no CLIP-L); ``all_in_one`` also
    writes a ComfyUI-layout checkpoint (transformer, T5, VAE) of that name."""
    root = Path(root)
    bfl = chroma_to_bfl(pipe.transformer.state_dict())
    t5, vae = t5_file(pipe.text_encoder), vae_to_ldm(pipe.vae.state_dict())
    files = {"transformer": save(bfl, root / "models" / f"{name}.safetensors"),
             "t5xxl": save(t5, root / "text_encoders" / "t5xxl_fp16.safetensors"),
             "vae": save(vae, root / "vae" / f"{FLUX_VAE_NAME}.safetensors")}
    write_t5_tokenizer(pipe.tokenizer, root / "text_encoders")
    if all_in_one:
        sd = {f"model.diffusion_model.{k}": v for k, v in bfl.items()}
        sd.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5.items()})
        sd.update({f"vae.{k}": v for k, v in vae.items()})
        files["all_in_one"] = save(sd, root / "models" / f"{all_in_one}.safetensors")
    return files
