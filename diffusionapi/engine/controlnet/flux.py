"""Flux.1 ControlNets in the engine: diffusers' FluxControlNetModel (InstantX's, Shakker's union).

As FluxControlNetPipeline runs them: the control image (in [-1, 1]) is encoded by the model's
VAE and packed 2x2 like the latents; at each model evaluation the ControlNet sees the
transformer's own inputs (packed latents, timestep, guidance, text, positions) plus that image
and, for a union model, its control mode, and its block outputs are added inside the
transformer (``controlnet_block_samples`` / ``controlnet_single_block_samples``), times the
unit's weight (the pipeline's ``controlnet_conditioning_scale``). Several units add up (what
FluxMultiControlNetModel does).

A unit is on when its guidance window holds the step, counted as for SD (units.StepClock). The
ControlNet runs on every conditioning row, the negative prompt's too when CFG runs a negative
pass; "ControlNet is more important" leaves the negative rows without control (as on SD). The
soft injection of "My prompt is more important" is a per-UNet-block scale and has no Flux
counterpart: on Flux it is Balanced.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..flow import pack
from ..vae_io import encode as vae_encode
from .plans import ControlUnitPlan
from .request import FLUX_UNION_MODES, UNION_TYPES


@dataclass
class FluxUnit:
    unit: ControlUnitPlan
    model: torch.nn.Module
    cond: torch.Tensor        # the control image's latents, packed: [1, seq, 4c]
    mode: int | None = None   # union models: the control mode
    calls: int = 0            # evaluations it added its residuals to (the tests count them)


def flux_mode(unit: ControlUnitPlan, model) -> int | None:
    """A union unit's control mode (InstantX / Shakker numbering), from its control type."""
    if unit.union_type is None or not getattr(model.config, "num_mode", None):
        return None
    from ..plan import GenerationError

    mode = FLUX_UNION_MODES.get(UNION_TYPES[unit.union_type])
    if mode is None or mode >= model.config.num_mode:
        raise GenerationError(f"ControlNet {unit.entry.name!r} knows {model.config.num_mode} control modes; "
                              f"{UNION_TYPES[unit.union_type]!r} is not one of them")
    return mode


def control_latents(vae, hint: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) control map in [0, 1] -> packed latents (the VAE's mode, scaled and shifted)."""
    with torch.no_grad():
        z = vae_encode(vae, (hint * 2 - 1).to(vae.device, vae.dtype))
    return pack(z.float())


class FluxControl:
    """FluxDenoiser's ``control`` hook (engine/flow.py): the residual kwargs of the units on now."""

    def __init__(self, units: list[FluxUnit], clock):
        self.units = units
        self.clock = clock

    def __call__(self, inputs: dict, rows: int) -> dict:
        fraction = self.clock.fraction()
        x = inputs["hidden_states"]
        n, dev = x.shape[0], x.device
        blocks = singles = None
        for fu in self.units:
            u = fu.unit
            if not u.guidance_start <= fraction <= u.guidance_end:
                continue
            fu.calls += 1
            model = fu.model
            guidance = inputs["guidance"] if model.config.guidance_embeds else None
            if model.config.guidance_embeds and guidance is None:
                from ..plan import GenerationError

                raise GenerationError(f"ControlNet {u.entry.name!r} is guidance-distilled (for Flux.1 dev); the "
                                      "model takes no guidance")
            mode = None if fu.mode is None else torch.full((n, 1), fu.mode, device=dev, dtype=torch.long)
            b, s = model(hidden_states=x, controlnet_cond=fu.cond.to(dev, x.dtype).expand(n, -1, -1),
                         controlnet_mode=mode, conditioning_scale=1.0,
                         encoder_hidden_states=inputs["encoder_hidden_states"],
                         pooled_projections=inputs["pooled_projections"], timestep=inputs["timestep"],
                         img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"], guidance=guidance, return_dict=False)
            scale = torch.full((n, 1, 1), float(u.weight), device=dev, dtype=x.dtype)
            if u.control_mode == "ControlNet is more important" and rows > 1:
                scale[:n // rows] = 0  # the negative prompt's rows (first) run without control
            b = None if b is None else [r * scale for r in b]
            s = None if s is None else [r * scale for r in s]
            blocks = b if blocks is None else (blocks if b is None else [p + q for p, q in zip(blocks, b)])
            singles = s if singles is None else (singles if s is None else [p + q for p, q in zip(singles, s)])
        if blocks is None and singles is None:
            return {}
        return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": singles}
