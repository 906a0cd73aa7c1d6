"""The engine's latents <-> a VAE's pixels, for each kind of VAE.

The samplers work on *scaled* latents [b, C, h, w] (unit variance, about): image VAEs
(AutoencoderKL) scale by ``scaling_factor`` after subtracting ``shift_factor``; Qwen-Image's
video-style VAE (AutoencoderKLQwenImage) normalises each channel by ``latents_mean`` /
``latents_std`` and works on [b, C, frames, h, w] (one frame here)."""
from __future__ import annotations

import torch


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
    if is_video_vae(vae):
        mean, std = _mean_std(vae, z)
        return vae.decode((z * std + mean).unsqueeze(2), return_dict=False)[0][:, :, 0]
    z = z / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        z = z + vae.config.shift_factor
    return vae.decode(z, return_dict=False)[0]


def encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Images [b, 3, H, W] in [-1, 1] -> scaled latents (the distribution's mode)."""
    if is_video_vae(vae):
        z = vae.encode(pixels.unsqueeze(2), return_dict=False)[0].mode()[:, :, 0]
        mean, std = _mean_std(vae, z)
        return (z - mean) / std
    z = vae.encode(pixels, return_dict=False)[0].mode()
    if getattr(vae.config, "shift_factor", None):
        z = z - vae.config.shift_factor
    return z * vae.config.scaling_factor
