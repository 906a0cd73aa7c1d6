"""Test utility: save a (tiny) diffusers pipeline as an original single-file checkpoint.

diffusers only converts original -> diffusers; this is the reverse mapping, written for the
CompVis (SD 1.x) and SGM (SDXL) key layouts, generic over the UNet/VAE sizes in the config.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET[head]}.{tail}"


def unet_to_original(sd: dict, cfg) -> dict:
    lpb = cfg.layers_per_block
    out = {}
    has_attn_up = [t.startswith("CrossAttn") for t in cfg.up_block_types]
    for k, v in sd.items():
        nk = None
        for a, b in (("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
                     ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
                     ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")):
            if k.startswith(a):
                nk = b + k[len(a):]
        if nk is None and (m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", k)):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            n = 1 + i * (lpb + 1) + j
            nk = f"input_blocks.{n}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
        elif nk is None and (m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k)):
            nk = f"input_blocks.{1 + int(m[1]) * (lpb + 1) + lpb}.0.op.{m[2]}"
        elif nk is None and (m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", k)):
            if m[1] == "attentions":
                nk = f"middle_block.1.{m[3]}"
            else:
                nk = f"middle_block.{0 if m[2] == '0' else 2}.{_resnet(m[3])}"
        elif nk is None and (m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", k)):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            n = i * (lpb + 1) + j
            nk = f"output_blocks.{n}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
        elif nk is None and (m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k)):
            i = int(m[1])
            nk = f"output_blocks.{i * (lpb + 1) + lpb}.{2 if has_attn_up[i] else 1}.conv.{m[2]}"
        if nk is None:
            raise KeyError(f"unmapped UNet key {k}")
        out["model.diffusion_model." + nk] = v
    return out


VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_original(sd: dict, n_blocks: int) -> dict:
    out = {}
    for k, v in sd.items():
        nk = k
        nk = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", nk)
        nk = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", nk)
        nk = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", nk)
        nk = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                    lambda m: f"decoder.up.{n_blocks - 1 - int(m[1])}.block.{m[2]}.", nk)
        nk = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                    lambda m: f"decoder.up.{n_blocks - 1 - int(m[1])}.upsample.", nk)
        nk = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.",
                    lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.", nk)
        if (m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)$", nk)):
            nk = f"{m[1]}.mid.attn_1.{VAE_ATTN[m[2]]}.{m[3]}"
            if m[3] == "weight" and v.dim() == 2:
                v = v[:, :, None, None]
        nk = nk.replace(".conv_shortcut.", ".nin_shortcut.")
        out["first_stage_model." + nk] = v
    return out


def _hf_text(sd: dict) -> dict:
    # transformers >= 5.6 drops "text_model." from CLIPTextModel state dicts; files always have it.
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
            for k, v in sd.items() if not k.endswith("position_ids")}


def clip_to_original(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in _hf_text(sd).items()}


def openclip_to_original(sd: dict, prefix: str) -> dict:
    sd = _hf_text(sd)
    out = {}
    qkv: dict = {}
    for k, v in sd.items():
        if k == "text_projection.weight":
            out[prefix + "text_projection"] = v.t().contiguous()
            continue
        k2 = k.removeprefix("text_model.")
        if k2 == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = v
        elif k2 == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = v
        elif k2.startswith("final_layer_norm."):
            out[prefix + "ln_final." + k2.split(".")[-1]] = v
        elif (m := re.match(r"encoder\.layers\.(\d+)\.(.*)\.(weight|bias)$", k2)):
            i, mod, kind = m[1], m[2], m[3]
            base = f"{prefix}transformer.resblocks.{i}."
            if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((base, kind), {})[mod[10]] = v
            else:
                name = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                        "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}[mod]
                out[f"{base}{name}.{kind}"] = v
        else:
            raise KeyError(f"unmapped text encoder key {k}")
    for (base, kind), parts in qkv.items():
        out[f"{base}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def save_original_checkpoint(pipe, target: Path, *, fmt: str = "safetensors", with_config: bool = True) -> Path:
    """``pipe`` as one original-layout checkpoint, plus its config folder ``<stem>.config/`` next to it."""
    sd = {}
    sd.update(unet_to_original(pipe.unet.state_dict(), pipe.unet.config))
    sd.update(vae_to_original(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
    te, te2 = getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)
    if te2 is None:
        sd.update(clip_to_original(te.state_dict(), "cond_stage_model.transformer."))
    elif te is None:  # refiner: OpenCLIP bigG alone
        sd.update(openclip_to_original(te2.state_dict(), "conditioner.embedders.0.model."))
    else:
        sd.update(clip_to_original(te.state_dict(), "conditioner.embedders.0.transformer."))
        sd.update(openclip_to_original(te2.state_dict(), "conditioner.embedders.1.model."))
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(target))
    else:
        torch.save({"state_dict": sd}, str(target))
    if with_config:
        tmp = target.with_name(target.stem + ".full")
        pipe.save_pretrained(tmp)
        cfg = target.with_name(target.stem + ".config")
        shutil.copytree(tmp, cfg, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
        shutil.rmtree(tmp)
    return target


def kohya_lora_to_sgm_names(sd: dict, unet_config) -> dict:
    """Rename a kohya LoRA's UNet keys from diffusers module names to SGM ones (input_blocks...),
    the layout civitai SDXL LoRAs use; text-encoder keys stay as they are."""
    out = {}
    for k, v in sd.items():
        head, _, tail = k.partition(".")
        if head.startswith("lora_unet_"):
            dotted = _diffusers_module_path(head[len("lora_unet_"):])
            original = next(iter(unet_to_original({dotted + ".weight": v}, unet_config)))
            head = "lora_unet_" + original[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
        out[f"{head}.{tail}"] = v
    return out


def _diffusers_module_path(flat: str) -> str:
    """'down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q' -> dotted diffusers path."""
    words = ("down_blocks", "up_blocks", "mid_block", "attentions", "transformer_blocks", "to_out", "to_q",
             "to_k", "to_v", "resnets")
    s = flat
    for w in words:
        s = s.replace(w, w.replace("_", "\0"))
    return s.replace("_", ".").replace("\0", "_")
