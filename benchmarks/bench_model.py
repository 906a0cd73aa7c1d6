"""The "bench model": SD 1.5's architecture (4-level UNet with 2 layers per block, 12-layer
CLIP text encoder, 4-level VAE) at reduced width, random weights, built offline.
One 256x256 image with 10 steps takes about 1.5 s on 2 CPU cores."""
from __future__ import annotations

from pathlib import Path


def build_bench_pipeline(seed: int = 0, width: int = 192):
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusionapi.demo import SD15_SCHEDULER, VOCAB, _quiet, tiny_tokenizer

    _quiet()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(width // 3, 2 * width // 3, width, width), layers_per_block=2, cross_attention_dim=width,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=8, norm_num_groups=32, sample_size=32).eval()
    vae = AutoencoderKL(block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32,
                        layers_per_block=2).eval()
    te = CLIPTextModel(CLIPTextConfig(bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1,
                                      hidden_size=width, intermediate_size=4 * width, num_attention_heads=4,
                                      num_hidden_layers=12, vocab_size=VOCAB, max_position_embeddings=77)).eval()
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tiny_tokenizer(), unet=unet,
                                   scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def install_bench_model(target: Path, seed: int = 0) -> Path:
    target = Path(target)
    if not (target / "model_index.json").exists():
        build_bench_pipeline(seed).save_pretrained(target, safe_serialization=True)
    return target
