"""The engine's latents <-> a VAE's pixels, for each kind of VAE.

The samplers work on *scaled* latents [b, C, h, w] (unit variance, about): image VAEs
(AutoencoderKL) scale by ``scaling_factor`` after subtracting ``shift_factor``; Qwen-Image's
video-style VAE (AutoencoderKLQwenImage) normalises each channel by ``latents_mean`` /
``latents_std`` and works on [b, C, frames, h, w] (one frame here); Flux.2's VAE
(AutoencoderKLFlux2) normalises 2x2 patches of its 32 channels (128 values) by its batch-norm
running statistics, which the engine keeps unpatchified: [b, 32, h, w], each channel and patch
position normalised."""
from __future__ import annotations

import torch


def is_patch_norm_vae(vae) -> bool:
    return getattr(vae, "bn", None) is not None and getattr(vae.config, "batch_norm_eps", None) is not None


def patchify(z: torch.Tensor) -> torch.Tensor:
    """[b, c, h, w] -> [b, 4c, h/2, w/2], Flux.2's channel order (Flux2Pipeline._patchify_latents)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    b, c4, h, w = z.shape
    return z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


def _bn_mean_std(vae, like: torch.Tensor):
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def is_video_vae(vae) -> bool:
    return getattr(vae.config, "latents_mean", None) is not None and getattr(vae.config, "z_dim", None) is not None


def latent_channels(vae) -> int:
    cfg = vae.config
    return int(cfg.z_dim if is_video_vae(vae) else cfg.latent_channels)


def _mean_std(vae, like: torch.Tensor):
    shape = (1, -1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
    return mean, std


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents (in the VAE's device and type) -> images [b, 3, H, W] in [-1, 1]."""
    if is_patch_norm_vae(vae):
        mean, std = _bn_mean_std(vae, z)
        return vae.decode(unpatchify(patchify(z) * std + mean), return_dict=False)[0]
    if is_video_vae(vae):
        mean, std = _mean_std(vae, z)
        return vae.decode((z * std + mean).unsqueeze(2), return_dict=False)[0][:, :, 0]
    z = z / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        z = z + vae.config.shift_factor
    return vae.decode(z, return_dict=False)[0]


def encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Images [b, 3, H, W] in [-1, 1] -> scaled latents (the distribution's mode)."""
    if is_patch_norm_vae(vae):
        z = patchify(vae.encode(pixels, return_dict=False)[0].mode())
        mean, std = _bn_mean_std(vae, z)
        return unpatchify((z - mean) / std)
    if is_video_vae(vae):
        z = vae.encode(pixels.unsqueeze(2), return_dict=False)[0].mode()[:, :, 0]
        mean, std = _mean_std(vae, z)
        return (z - mean) / std
    z = vae.encode(pixels, return_dict=False)[0].mode()
    if getattr(vae.config, "shift_factor", None):
        z = z - vae.config.shift_factor
    return z * vae.config.scaling_factor
