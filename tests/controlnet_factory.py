"""Test utility: tiny random ControlNets built from the tiny UNets, saved in the layouts people download.

``ControlNetModel.from_unet`` copies the UNet's encoder and zero-initialises the output
convolutions (as training starts); a zero ControlNet changes nothing, so the zero convolutions get
seeded random weights here. ``save_ldm`` writes lllyasviel's original layout (``control_model.``
prefix, ``input_blocks`` / ``zero_convs`` / ``input_hint_block``), the reverse of diffusers' converter.
"""
from __future__ import annotations

import base64
import io
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.checkpoint_factory import unet_to_original


def png(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def control_image(size=64, seed=0) -> Image.Image:
    """Shapes with edges (a canny map has something to find)."""
    rng = np.random.default_rng(seed)
    a = np.full((size, size, 3), 255, np.uint8)
    for _ in range(4):
        x, y = rng.integers(0, size - 16, 2)
        a[y:y + 14, x:x + 14] = rng.integers(0, 200, 3)
    return Image.fromarray(a)


def tiny_controlnet(unet_dir: Path, seed: int = 0, scale: float = 0.3):
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(unet_dir))
    cn = ControlNetModel.from_unet(unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return cn.eval()


def controlnet_to_ldm(sd: dict, config) -> dict:
    out = {}
    rest = {}
    n_emb = len(config.conditioning_embedding_out_channels)
    last_hint = 2 * (2 * (n_emb - 1)) + 2  # conv_in, the blocks (each after a SiLU), conv_out
    for k, v in sd.items():
        if k.startswith("controlnet_cond_embedding.conv_in."):
            out["input_hint_block.0." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("controlnet_cond_embedding.conv_out."):
            out[f"input_hint_block.{last_hint}." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("controlnet_cond_embedding.blocks."):
            i, kind = k.split(".")[2], k.split(".")[3]
            out[f"input_hint_block.{2 * (int(i) + 1)}.{kind}"] = v
        elif k.startswith("controlnet_down_blocks."):
            i, kind = k.split(".")[1], k.split(".")[2]
            out[f"zero_convs.{i}.0.{kind}"] = v
        elif k.startswith("controlnet_mid_block."):
            out["middle_block_out.0." + k.rsplit(".", 1)[1]] = v
        else:
            rest[k] = v
    shim = types.SimpleNamespace(layers_per_block=config.layers_per_block, up_block_types=())
    for k, v in unet_to_original(rest, shim).items():
        out[k[len("model.diffusion_model."):]] = v
    return out


def save_ldm(cn, target: Path, *, prefix: str = "control_model.", fmt: str = "safetensors") -> Path:
    sd = {prefix + k: v.detach().contiguous() for k, v in controlnet_to_ldm(cn.state_dict(), cn.config).items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(target))
    else:
        torch.save(sd, str(target))
    return target


def save_diffusers_single_file(cn, target: Path) -> Path:
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in cn.state_dict().items()}, str(target))
    return target


def tiny_clip_vision(target: Path, projection_dim: int = 16, seed: int = 0) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=projection_dim)
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(str(target))
    return target


def tiny_ip_adapter(unet_dir: Path, target: Path, image_dim: int = 16, seed: int = 0, scale: float = 0.5) -> Path:
    """A plain IP-Adapter (4 image tokens) for the UNet in ``unet_dir``, in h94's .safetensors layout:
    ``image_proj.proj/norm`` and ``ip_adapter.<n>.to_k_ip/to_v_ip`` for the n-th attention processor
    (cross-attention ones are the odd n, as diffusers numbers them)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(str(unet_dir))
    cfg = unet.config
    cross = cfg.cross_attention_dim
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(shape, generator=g) * scale

    sd = {"image_proj.proj.weight": rnd(cross * 4, image_dim), "image_proj.proj.bias": rnd(cross * 4),
          "image_proj.norm.weight": 1 + rnd(cross), "image_proj.norm.bias": rnd(cross)}
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = cfg.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(cfg.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = cfg.block_out_channels[int(name[len("down_blocks.")])]
        sd[f"ip_adapter.{key}.to_k_ip.weight"] = rnd(hidden, cross)
        sd[f"ip_adapter.{key}.to_v_ip.weight"] = rnd(hidden, cross)
        key += 2
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(target))
    return target


def tiny_ip_adapter_plus(unet_dir: Path, target: Path, hidden_size: int = 32, tokens: int = 8, seed: int = 0,
                         scale: float = 0.3) -> Path:
    """An IP-Adapter Plus in h94's layout: the resampler (``latents``, ``proj_in``/``proj_out``/
    ``norm_out``, 4 layers of ``0.norm1/norm2/to_q/to_kv/to_out`` attention and ``1.0/1.1/1.3``
    feed-forward; 64-wide heads, one of them here) over the encoder's hidden states, and the
    plain adapter's ``ip_adapter.<n>.to_k_ip/to_v_ip``."""
    from safetensors.torch import load_file, save_file

    plain = target.with_name(target.stem + ".plain.tmp.safetensors")
    tiny_ip_adapter(unet_dir, plain, seed=seed, scale=scale)
    sd = {k: v for k, v in load_file(str(plain)).items() if k.startswith("ip_adapter.")}
    plain.unlink()
    cross = next(v for k, v in sd.items() if k.endswith("to_k_ip.weight")).shape[1]
    d = 64
    shapes = {"latents": (1, tokens, d), "proj_in.weight": (d, hidden_size), "proj_in.bias": (d,),
              "proj_out.weight": (cross, d), "proj_out.bias": (cross,)}
    for i in range(4):
        shapes.update({f"layers.{i}.0.to_q.weight": (64, d), f"layers.{i}.0.to_kv.weight": (128, d),
                       f"layers.{i}.0.to_out.weight": (d, 64), f"layers.{i}.1.1.weight": (4 * d, d),
                       f"layers.{i}.1.3.weight": (d, 4 * d)})
    proj = _random_state(shapes, seed + 1, scale)
    for norm, width in [(f"layers.{i}.0.norm{j}", d) for i in range(4) for j in (1, 2)] + \
            [(f"layers.{i}.1.0", d) for i in range(4)] + [("norm_out", cross)]:
        proj[f"{norm}.weight"], proj[f"{norm}.bias"] = torch.ones(width), torch.zeros(width)
    sd.update({"image_proj." + k: v for k, v in proj.items()})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(target))
    return target


# ---------------------------------------------------------------------------- annotator files

def _random_state(shapes: dict, seed: int, scale: float = 0.5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * scale for k, s in shapes.items()}


def tiny_hed_file(path: Path, widths=(4, 8, 8, 8, 8), seed: int = 0) -> None:
    """``ControlNetHED.pth`` in lllyasviel's layout (``norm``, ``block<n>.convs.<i>``,
    ``block<n>.projection``; 2, 2, 3, 3, 3 convolutions), at tiny widths (real: 64..512)."""
    shapes, cin = {"norm": (1, 3, 1, 1)}, 3
    for n, (c, layers) in enumerate(zip(widths, (2, 2, 3, 3, 3)), start=1):
        for i in range(layers):
            shapes[f"block{n}.convs.{i}.weight"] = (c, cin if i == 0 else c, 3, 3)
            shapes[f"block{n}.convs.{i}.bias"] = (c,)
        shapes[f"block{n}.projection.weight"], shapes[f"block{n}.projection.bias"] = (1, c, 1, 1), (1,)
        cin = c
    sd = _random_state(shapes, seed, 0.1)
    sd["norm"] = torch.full((1, 3, 1, 1), 127.0)  # the real file's pixel mean sits here
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)


def tiny_lineart_file(path: Path, ngf: int = 4, blocks: int = 1, seed: int = 0) -> None:
    """``sk_model.pth`` / ``sk_model2.pth`` in the informative-drawings generator's layout
    (``model0.1``, ``model1.0/3``, ``model2.<i>.conv_block.1/5``, ``model3.0/3`` transposed,
    ``model4.1``), at a tiny width (real: 64, 3 residual blocks)."""
    shapes = {"model0.1.weight": (ngf, 3, 7, 7), "model0.1.bias": (ngf,),
              "model1.0.weight": (2 * ngf, ngf, 3, 3), "model1.0.bias": (2 * ngf,),
              "model1.3.weight": (4 * ngf, 2 * ngf, 3, 3), "model1.3.bias": (4 * ngf,),
              "model3.0.weight": (4 * ngf, 2 * ngf, 3, 3), "model3.0.bias": (2 * ngf,),
              "model3.3.weight": (2 * ngf, ngf, 3, 3), "model3.3.bias": (ngf,),
              "model4.1.weight": (1, ngf, 7, 7), "model4.1.bias": (1,)}
    for i in range(blocks):
        for j in (1, 5):
            shapes[f"model2.{i}.conv_block.{j}.weight"] = (4 * ngf, 4 * ngf, 3, 3)
            shapes[f"model2.{i}.conv_block.{j}.bias"] = (4 * ngf,)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_random_state(shapes, seed, 0.3), path)


def tiny_anime_lineart_file(path: Path, ngf: int = 4, seed: int = 0) -> None:
    """``netG.pth`` in pix2pix's U-Net layout (``model.model.0`` / ``.3`` outermost, ``.1.model.1`` /
    ``.5`` a middle level, ``...3.model.1`` / ``.3`` the innermost), 3 levels here (the published: 8)."""
    outer, mid, inner = "model.model", "model.model.1.model", "model.model.1.model.3.model"
    shapes = {f"{outer}.0.weight": (ngf, 3, 4, 4), f"{outer}.0.bias": (ngf,),
              f"{outer}.3.weight": (2 * ngf, 1, 4, 4), f"{outer}.3.bias": (1,),
              f"{mid}.1.weight": (2 * ngf, ngf, 4, 4), f"{mid}.1.bias": (2 * ngf,),
              f"{mid}.5.weight": (4 * ngf, ngf, 4, 4), f"{mid}.5.bias": (ngf,),
              f"{inner}.1.weight": (2 * ngf, 2 * ngf, 4, 4), f"{inner}.1.bias": (2 * ngf,),
              f"{inner}.3.weight": (2 * ngf, 2 * ngf, 4, 4), f"{inner}.3.bias": (2 * ngf,)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module." + k: v for k, v in _random_state(shapes, seed, 0.3).items()}, path)  # (a DataParallel save)


def tiny_openpose_body_file(path: Path, width: int = 4, stages: int = 2, seed: int = 0) -> None:
    """``body_pose_model.pth`` in the published PyTorch port's flat names (VGG stem ``conv1_1`` ...
    ``conv4_4_CPM``; stage 1 ``conv5_<1..5>_CPM_L1/L2``; stages 2.. ``Mconv<1..7>_stage<s>_L1/L2``; 38
    affinity fields, 19 heatmaps), at a tiny width and with 2 stages (the published: 6)."""
    c = width
    stem = [("conv1_1", 3, c, 3), ("conv1_2", c, c, 3), ("conv2_1", c, c, 3), ("conv2_2", c, c, 3),
            ("conv3_1", c, c, 3), ("conv3_2", c, c, 3), ("conv3_3", c, c, 3), ("conv3_4", c, c, 3),
            ("conv4_1", c, c, 3), ("conv4_2", c, c, 3), ("conv4_3_CPM", c, c, 3), ("conv4_4_CPM", c, 2 * c, 3)]
    layers = list(stem)
    for branch, out in (("L1", 38), ("L2", 19)):
        layers += [(f"conv5_{i}_CPM_{branch}", 2 * c, 2 * c, 3) for i in (1, 2, 3)]
        layers += [(f"conv5_4_CPM_{branch}", 2 * c, 4 * c, 1), (f"conv5_5_CPM_{branch}", 4 * c, out, 1)]
        for s in range(2, stages + 1):
            layers += [(f"Mconv1_stage{s}_{branch}", 38 + 19 + 2 * c, 2 * c, 7)]
            layers += [(f"Mconv{i}_stage{s}_{branch}", 2 * c, 2 * c, 7) for i in (2, 3, 4, 5)]
            layers += [(f"Mconv6_stage{s}_{branch}", 2 * c, 2 * c, 1), (f"Mconv7_stage{s}_{branch}", 2 * c, out, 1)]
    shapes = {}
    for name, cin, cout, k in layers:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_random_state(shapes, seed, 0.2), path)


def tiny_depth_anything(folder: Path, seed: int = 0) -> None:
    """A transformers Depth Anything folder (as LiheYoung/depth-anything-*-hf is laid out), tiny:
    a 2-layer DINOv2 backbone at 28 px (patch 14). Random weights scaled up so the (ReLU-headed)
    depth varies with the input."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    torch.manual_seed(seed)
    backbone = Dinov2Config(image_size=28, patch_size=14, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=16, out_indices=[1, 2], reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=8, neck_hidden_sizes=[4, 8],
                                 reassemble_factors=[2, 1], fusion_hidden_size=8, head_hidden_size=4, patch_size=14)
    model = DepthAnythingForDepthEstimation(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (0.1 if p.ndim == 1 else 0.0))
    model.save_pretrained(str(folder))
    DPTImageProcessor(size={"height": 28, "width": 28}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      resample=3).save_pretrained(str(folder))


# ---------------------------------------------------------------------------- union ControlNets, Control-LoRAs

def tiny_union_controlnet(unet_dir: Path, seed: int = 0, scale: float = 0.3, num_control_type: int = 8):
    """An SDXL union ControlNet ("ProMax": 8 control types) copied from the tiny SDXL UNet, its
    control-type transformer at the UNet's first width (real: 320) with 2 heads."""
    from diffusers import ControlNetUnionModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(unet_dir))
    shape = ControlNetUnionModel.from_unet(unet, load_weights_from_unet=False).config
    c0 = unet.config.block_out_channels[0]
    torch.manual_seed(seed)
    cn = ControlNetUnionModel.from_config({**{k: v for k, v in dict(shape).items() if not k.startswith("_")},
                                          "num_trans_channel": c0, "num_proj_channel": c0,
                                          "num_trans_head": 2, "num_control_type": num_control_type})
    cn.conv_in.load_state_dict(unet.conv_in.state_dict())
    cn.time_embedding.load_state_dict(unet.time_embedding.state_dict())
    cn.down_blocks.load_state_dict(unet.down_blocks.state_dict(), strict=False)
    cn.mid_block.load_state_dict(unet.mid_block.state_dict(), strict=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out",
                                "spatial_ch_projs")):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return cn.eval()


def tiny_control_lora(unet_dir: Path, target: Path, expected: Path, seed: int = 0, rank: int = 2) -> None:
    """A Control-LoRA in Stability's layout (original names, ``lora_controlnet`` marker): each
    weight of the copied encoder as ``<name>.up`` / ``<name>.down`` (rank ``rank``), the rest in
    full. ``expected``: the ControlNet it means (UNet weight + up @ down), as an original-layout
    single file, computed here independently of the server's loader."""
    from safetensors.torch import save_file

    cn = tiny_controlnet(unet_dir, seed=seed)
    ldm = controlnet_to_ldm(cn.state_dict(), cn.config)
    g = torch.Generator().manual_seed(seed + 100)
    lora, full = {}, {}
    for k, v in ldm.items():
        v = v.detach()
        if k.endswith(".weight") and v.ndim >= 2 and k.startswith(("input_blocks.", "middle_block.", "time_embed.",
                                                                    "label_emb.")):
            up = torch.randn((v.shape[0], rank) + (1,) * (v.ndim - 2), generator=g) * 0.1
            down = torch.randn((rank,) + tuple(v.shape[1:]), generator=g) * 0.1
            lora[k[:-len(".weight")] + ".up"], lora[k[:-len(".weight")] + ".down"] = up, down
            full[k] = v + (up.flatten(1) @ down.flatten(1)).reshape(v.shape)
        else:
            lora[k] = full[k] = v
    lora["lora_controlnet"] = torch.zeros(0)
    for path, sd in ((target, lora), (expected, {"control_model." + k: v for k, v in full.items()})):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def save_t2i_adapter_original(adapter, target: Path) -> Path:
    """A diffusers full T2IAdapter in TencentARC's original layout (``conv_in``, ``body.<level *
    blocks + j>.block1/block2``, ``in_conv`` on a level's first block): the reverse of the loader's renaming."""
    blocks = adapter.config.num_res_blocks
    out = {}
    for k, v in adapter.state_dict().items():
        k = k[len("adapter."):]
        parts = k.split(".")
        if parts[0] == "body" and parts[2] == "resnets":
            k = f"body.{int(parts[1]) * blocks + int(parts[3])}." + ".".join(parts[4:])
        elif parts[0] == "body":  # in_conv
            k = f"body.{int(parts[1]) * blocks}." + ".".join(parts[2:])
        out[k] = v.detach().contiguous()
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, str(target))
    return target
