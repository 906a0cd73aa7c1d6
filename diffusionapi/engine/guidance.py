"""Ways of combining the guided and unguided model outputs, shared by the UNet and flow denoisers."""
from __future__ import annotations

import torch


def rescale_cfg(guided: torch.Tensor, uncond: torch.Tensor, conds, weights, phi: float) -> torch.Tensor:
    """CFG rescale (Lin et al. 2023, eq. 15-16), as diffusers' ``guidance_rescale`` does it on the
    model output: the guided output scaled to the per-image standard deviation of the unguided
    positive one (cfg 1), mixed back by phi. It keeps v-prediction / zero-SNR models from
    over-exposing at usual CFG scales."""
    positive = uncond
    for weight, cond in zip(weights, conds):
        positive = positive + (cond - uncond) * weight
    dims = tuple(range(1, guided.dim()))
    std_pos = positive.std(dim=dims, keepdim=True)
    std_cfg = guided.std(dim=dims, keepdim=True).clamp(min=1e-12)
    return phi * (guided * (std_pos / std_cfg)) + (1 - phi) * guided
