"""img2img and inpainting inside the engine: init latents, latent masks, inpainting models.

A1111's behaviour (its ``StableDiffusionProcessingImg2Img`` and the k-diffusion
``sample_img2img``), re-implemented over this project's schedules:

* the schedule is the ``steps``-step one, entered ``t_enc = int(min(strength, 0.999) * steps)``
  steps before its end, so ``t_enc + 1`` sampler steps run (``img2img_fix_steps`` off), from
  the init latents plus the job's seeded noise at that sigma;
* with a mask, the denoised estimate keeps the init latents outside the (rounded, latent
  resolution) mask at every model evaluation, the final latents are blended the same way, and
  the decoded image is composited over the original outside the pixel mask;
* inpainting checkpoints (a UNet with 9 input channels: 4 latent + 1 mask + 4 masked-image
  latents, SD 1.5 and SDXL alike) get that extra conditioning concatenated to every input;
  without a mask (txt2img, plain img2img) the mask is all ones over an encoded blank image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .. import imageinput

LATENT_CHANNELS = 4
INPAINT_EXTRA_CHANNELS = 5  # mask + masked-image latents


def img2img_steps(steps: int, denoising_strength: float) -> int:
    """How many steps of a ``steps``-step schedule img2img runs: A1111's ``t_enc + 1``."""
    t_enc = int(min(denoising_strength, 0.999) * steps)
    return t_enc + 1


def prepare_input(init, width: int, height: int) -> imageinput.Prepared:
    """The plan's init image (and mask) resized / cropped for a width x height generation."""
    return imageinput.prepare(init.image, width, height, resize_mode=init.resize_mode, mask=init.mask,
                              mask_blur=init.mask_blur, inpainting_fill=init.inpainting_fill,
                              inpaint_full_res=init.inpaint_full_res,
                              inpaint_full_res_padding=init.inpaint_full_res_padding,
                              inpainting_mask_invert=init.inpainting_mask_invert)


def infotext_params(init, prepared: imageinput.Prepared | None) -> dict:
    """The img2img items of A1111's infotext."""
    params: dict = {"Denoising strength": init.denoising_strength}
    if init.resize_mode:
        params["Resize mode"] = imageinput.RESIZE_MODES[init.resize_mode]
    if init.mask is not None:
        if init.mask_blur:
            params["Mask blur"] = init.mask_blur
        if init.inpainting_mask_invert:
            params["Mask mode"] = "Inpaint not masked"
        if prepared is not None:
            params.update(prepared.info())
        if init.inpaint_full_res and prepared is not None and prepared.full_res:
            params["Masked area padding"] = init.inpaint_full_res_padding
    return params


def is_inpainting_unet(unet) -> bool:
    return int(unet.config.in_channels) == LATENT_CHANNELS + INPAINT_EXTRA_CHANNELS


@dataclass
class InitLatents:
    """One init image (and mask) at latent resolution, for a batch of ``n`` images."""
    latents: torch.Tensor               # [1, 4, h, w]
    keep: torch.Tensor | None = None    # [1, 1, h, w]: 1 where the init latents stay (outside the mask)

    @property
    def repaint(self) -> torch.Tensor | None:
        return None if self.keep is None else 1 - self.keep


def encode_init(encode: Callable[[Image.Image], torch.Tensor], prepared: imageinput.Prepared,
                device) -> InitLatents:
    """VAE-encode the prepared init image; resize mode 3 interpolates the latents to size."""
    z = encode(prepared.image)
    lh, lw = prepared.height // 8, prepared.width // 8
    if tuple(z.shape[-2:]) != (lh, lw):
        z = torch.nn.functional.interpolate(z, size=(lh, lw), mode="bilinear")
    keep = None
    if prepared.mask is not None:
        repaint = torch.from_numpy(imageinput.latent_mask(prepared.mask, lw, lh))
        keep = (1 - repaint)[None, None].to(device, z.dtype)
    return InitLatents(z, keep)


def fill_latents(init: InitLatents, fill: int, noise: torch.Tensor) -> torch.Tensor:
    """The init latents of a batch with A1111's latent fills inside the mask: 2 "latent noise"
    (the image's own seeded noise, the same draw the sampler starts from), 3 "latent nothing"."""
    z = init.latents.expand(noise.shape[0], -1, -1, -1)
    if init.keep is None or fill not in (2, 3):
        return z
    if fill == 2:
        return z * init.keep + noise * init.repaint
    return z * init.keep


def inpainting_conditioning(encode: Callable[[Image.Image], torch.Tensor], prepared: imageinput.Prepared | None,
                            width: int, height: int, device) -> torch.Tensor:
    """[1, 5, h/8, w/8]: the rounded mask and the latents of the image with the masked part
    blanked; no prepared image or no mask: all-ones mask over a blank (mid-grey) image."""
    lh, lw = height // 8, width // 8
    if prepared is None or prepared.mask is None:
        masked = Image.new("RGB", (width, height), (128, 128, 128))
        mask_small = torch.ones(1, 1, lh, lw)
    else:
        m = np.rint(np.asarray(prepared.mask.convert("L"), dtype=np.float32) / 255.0)
        src = np.asarray(prepared.conditioning_image().convert("RGB"), dtype=np.float32)
        # Blank = 0 in the VAE's [-1, 1] range, i.e. mid-grey.
        blanked = src * (1 - m[..., None]) + 127.5 * m[..., None]
        masked = Image.fromarray(np.clip(np.rint(blanked), 0, 255).astype(np.uint8))
        mask_small = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=(lh, lw), mode="nearest")
    z = encode(masked)
    return torch.cat([mask_small.to(z.device, z.dtype), z], dim=1).to(device)


class ConcatUNet:
    """The UNet with the inpainting conditioning concatenated to every input along channels
    (the same conditioning for the unconditional and the conditional half of CFG)."""

    def __init__(self, unet, conditioning: torch.Tensor):
        self.unet = unet
        self.conditioning = conditioning

    def __getattr__(self, name):
        return getattr(self.unet, name)

    def __call__(self, x, t, **kwargs):
        c = self.conditioning.to(x.device, x.dtype)
        c = c.repeat(x.shape[0] // c.shape[0], 1, 1, 1)
        return self.unet(torch.cat([x, c], dim=1), t, **kwargs)


class MaskedDenoiser:
    """A CFG denoiser whose estimate keeps the init latents outside the mask (A1111 blends the
    denoised latents after CFG at every evaluation). As a k-diffusion denoiser it blends x0;
    as a model output (timestep samplers) it returns the eps (or v) that implies that x0."""

    def __init__(self, inner, init_latents: torch.Tensor, keep: torch.Tensor):
        self.inner = inner
        self.init = init_latents
        self.keep = keep

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x0 = self.inner(x, sigma)
        keep = self.keep.to(x0.device, x0.dtype)
        return x0 * (1 - keep) + self.init.to(x0.device, x0.dtype) * keep

    def model_output(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.inner.model_output(x_in, t)
        sigma = float(self.inner.ms.t_to_sigma(t.reshape(-1)[:1].to(torch.float64).cpu())[0])
        c = 1 / math.sqrt(1 + sigma * sigma)
        init = self.init.to(out.device, out.dtype)
        x_ve = x_in.to(out.dtype) / c
        eps_keep = (x_ve - init) / sigma
        target = eps_keep if not self.inner.vpred else c * eps_keep - sigma * c * init
        keep = self.keep.to(out.device, out.dtype)
        return out * (1 - keep) + target * keep
