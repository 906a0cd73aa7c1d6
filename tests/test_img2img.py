"""img2img, inpainting, several images per job and /upscale, through HTTP on tiny models."""
from __future__ import annotations

import math

import pytest
import torch

from diffusionapi.engine import img2img as i2i
from diffusionapi.engine.kdiffusion import ModelSigmas


# ---------------------------------------------------------------------------- units

@pytest.mark.parametrize("steps, strength, expected", [
    (20, 0.75, 16), (20, 1.0, 20), (10, 0.5, 6), (4, 0.01, 1), (7, 0.33, 3), (30, 0.999, 30), (1, 0.5, 1),
])
def test_steps_run_are_a1111s_t_enc_plus_one(steps, strength, expected):
    # A1111 (img2img_fix_steps off): t_enc = int(min(strength, 0.999) * steps); sigmas[steps - t_enc - 1:]
    # of the steps+1 sigmas is the slice, i.e. t_enc + 1 intervals.
    sigmas = list(range(steps + 1))
    t_enc = int(min(strength, 0.999) * steps)
    assert len(sigmas[steps - t_enc - 1:]) - 1 == expected == i2i.img2img_steps(steps, strength)


class FakeCFG:
    """Stands in for the CFG denoiser: a fixed model output, converted as the real one does."""

    def __init__(self, vpred: bool):
        self.ms = ModelSigmas.from_scheduler_config({})
        self.vpred = vpred
        self.out = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))

    def model_output(self, x_in, t):
        return self.out

    def __call__(self, x, sigma):
        s = float(sigma)
        c_in = 1 / math.sqrt(s * s + 1)
        if self.vpred:
            return x * (1 / (s * s + 1)) - self.out * (s * c_in)
        return x - self.out * s


def implied_x0(out, x_in, sigma, vpred):
    c = 1 / math.sqrt(1 + sigma * sigma)
    if vpred:  # v = c * eps - sigma * c * x0 and x_vp = c * x0 + sigma * c * eps
        return c * x_in - sigma * c * out
    return x_in / c - sigma * out


@pytest.mark.parametrize("vpred", [False, True])
def test_masked_denoiser_keeps_the_init_outside_the_mask_in_both_forms(vpred):
    inner = FakeCFG(vpred)
    init = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    keep = torch.zeros(1, 1, 4, 4)
    keep[..., :2] = 1
    den = i2i.MaskedDenoiser(inner, init, keep)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3)) * 3
    sigma = torch.tensor(3.0)
    x0 = den(x, sigma)
    torch.testing.assert_close(x0[..., :2], init[..., :2])
    torch.testing.assert_close(x0[..., 2:], inner(x, sigma)[..., 2:])
    # The timestep form (eps or v at a timestep) implies the same x0.
    t = inner.ms.sigma_to_t(torch.tensor(3.0, dtype=torch.float64)).reshape(1)
    s = float(inner.ms.t_to_sigma(t)[0])
    x_in = x / math.sqrt(1 + s * s)
    out = den.model_output(x_in, t)
    got = implied_x0(out, x_in, s, vpred)
    torch.testing.assert_close(got[..., :2], init[..., :2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[..., 2:], implied_x0(inner.out, x_in, s, vpred)[..., 2:], atol=1e-4, rtol=1e-4)
    assert den.vpred is vpred  # everything else passes through


def test_concat_unet_adds_the_conditioning_to_both_cfg_halves():
    seen = {}

    class Unet:
        dtype = torch.float32

        def __call__(self, x, t, **kw):
            seen["x"] = x
            return (x[:, :4],)

    cond = torch.arange(2 * 5 * 2 * 2, dtype=torch.float32).reshape(2, 5, 2, 2)
    wrapped = i2i.ConcatUNet(Unet(), cond)
    x = torch.randn(4, 4, 2, 2)  # [uncond of 2 images; cond of 2 images]
    wrapped(x, torch.tensor([1.0]))
    assert seen["x"].shape == (4, 9, 2, 2)
    assert torch.equal(seen["x"][:2, 4:], cond) and torch.equal(seen["x"][2:, 4:], cond)
    assert wrapped.dtype == torch.float32
