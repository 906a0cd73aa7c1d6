"""ControlNets of the transformer families: Flux.1 (diffusers' FluxControlNetModel: InstantX's,
Shakker's union) and SD 3.x (SD3ControlNetModel: InstantX's, Stability's SD 3.5 ones).

As FluxControlNetPipeline / StableDiffusion3ControlNetPipeline run them: the control image (in
[-1, 1]) is encoded by the model's VAE (Flux: packed 2x2 like the latents); at each model
evaluation the ControlNet sees the transformer's own inputs plus that image (and, for a Flux
union model, its control mode), and its block outputs are added inside the transformer
(Flux: ``controlnet_block_samples`` / ``controlnet_single_block_samples``; SD 3:
``block_controlnet_hidden_states``), times the unit's weight (the pipelines'
``controlnet_conditioning_scale``). Several units add up (what the Multi ControlNet models do).
SD 3 ControlNets made with ``force_zeros_for_pooled_projection`` (InstantX's) see a zero pooled
vector and latents without the VAE's shift; those without ``joint_attention_dim`` (SD 3.5's)
no text; those without their own position embedding (SD 3.5's) use the transformer's.

A unit is on when its guidance window holds the step, counted as for SD (units.StepClock). The
ControlNet runs on every conditioning row, the negative prompt's too when CFG runs a negative
pass (the SD 3 pipeline does the same); "ControlNet is more important" leaves the negative rows
without control (as on SD). The soft injection of "My prompt is more important" is a per-UNet-block
scale with no transformer counterpart: here it is Balanced.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..flow import pack
from .plans import ControlUnitPlan
from .request import FLUX_UNION_MODES, UNION_TYPES


@dataclass
class FlowUnit:
    unit: ControlUnitPlan
    model: torch.nn.Module
    cond: torch.Tensor        # the control image's latents (Flux: packed, [1, seq, 4c]; SD 3: [1, c, h, w])
    mode: int | None = None   # Flux union models: the control mode
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


def control_latents(z: torch.Tensor, vae, model) -> torch.Tensor:
    """The control map's latents as the engine encodes images (the VAE's mode, shifted and
    scaled) -> what the ControlNet takes."""
    z = z.float()
    if is_sd3(model):
        if model.config.force_zeros_for_pooled_projection:  # InstantX's: scaled, not shifted
            z = z + float(getattr(vae.config, "shift_factor", 0) or 0) * vae.config.scaling_factor
        return z
    return pack(z)


def is_sd3(model) -> bool:
    return hasattr(model.config, "force_zeros_for_pooled_projection")


def prepare_sd3(model, transformer):
    """An SD 3.5 ControlNet without its own position embedding takes the transformer's (as the pipeline does)."""
    if is_sd3(model) and model.config.use_pos_embed is False:
        model.pos_embed = model._get_pos_embed_from_transformer(transformer).to(model.device, model.dtype)
    return model


class FlowControl:
    """FluxDenoiser's and SD3Denoiser's ``control`` hook (engine/flow.py): the residual kwargs of
    the units on now."""

    def __init__(self, units: list[FlowUnit], clock):
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
            scale = torch.full((n, 1, 1), float(u.weight), device=dev, dtype=x.dtype)
            if u.control_mode == "ControlNet is more important" and rows > 1:
                scale[:n // rows] = 0  # the negative prompt's rows (first) run without control
            if is_sd3(model):
                b, s = self._sd3(fu, inputs, n), None  # (its residuals are [n, tokens, dim] too)
            else:
                b, s = self._flux(fu, inputs, n)
            b = None if b is None else [r * scale for r in b]
            s = None if s is None else [r * scale for r in s]
            blocks = b if blocks is None else (blocks if b is None else [p + q for p, q in zip(blocks, b)])
            singles = s if singles is None else (singles if s is None else [p + q for p, q in zip(singles, s)])
        if blocks is None and singles is None:
            return {}
        if self.sd3:
            return {"block_controlnet_hidden_states": blocks}
        return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": singles}

    @property
    def sd3(self) -> bool:
        return bool(self.units) and is_sd3(self.units[0].model)

    @staticmethod
    def _flux(fu: FlowUnit, inputs: dict, n: int):
        model, x = fu.model, inputs["hidden_states"]
        guidance = inputs["guidance"] if model.config.guidance_embeds else None
        if model.config.guidance_embeds and guidance is None:
            from ..plan import GenerationError

            raise GenerationError(f"ControlNet {fu.unit.entry.name!r} is guidance-distilled (for Flux.1 dev); the "
                                  "model takes no guidance")
        mode = None if fu.mode is None else torch.full((n, 1), fu.mode, device=x.device, dtype=torch.long)
        return model(hidden_states=x, controlnet_cond=fu.cond.to(x.device, x.dtype).expand(n, -1, -1),
                     controlnet_mode=mode, conditioning_scale=1.0,
                     encoder_hidden_states=inputs["encoder_hidden_states"],
                     pooled_projections=inputs["pooled_projections"], timestep=inputs["timestep"],
                     img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"], guidance=guidance, return_dict=False)

    @staticmethod
    def _sd3(fu: FlowUnit, inputs: dict, n: int):
        model, x = fu.model, inputs["hidden_states"]
        pooled = inputs["pooled_projections"]
        if model.config.force_zeros_for_pooled_projection:
            pooled = torch.zeros_like(pooled)
        text = inputs["encoder_hidden_states"] if model.config.joint_attention_dim is not None else None
        return model(hidden_states=x, controlnet_cond=fu.cond.to(x.device, x.dtype).expand(n, -1, -1, -1),
                     conditioning_scale=1.0, encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=inputs["timestep"], return_dict=False)[0]
