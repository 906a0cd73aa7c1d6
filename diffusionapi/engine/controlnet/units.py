"""ControlNet units in the engine: control maps, and the UNet wrapper that adds the residuals.

A unit's residuals are added at a model evaluation when its guidance window holds the sampling
step, counted as sd-webui-controlnet counts it: A1111's ``state.sampling_step`` is 0 when
sampling starts and becomes ``i`` after step ``i`` (the samplers' callback), so the evaluations
of step ``i`` see ``max(i - 1, 0)``; the unit is on when ``start <= that / stage steps <= end``
(both bounds inclusive). The stage's steps are what A1111 launches: ``steps`` for txt2img, the
``t_enc + 1`` steps of an img2img or hires pass.

Control modes, as the extension means them:
- "Balanced": the residuals go to the conditional and the unconditional rows alike;
- "My prompt is more important": soft injection — residual ``i`` of 13 scaled by ``0.825 ** (12 - i)``
  (SDXL ControlNets: the first 10 of those 13 factors);
- "ControlNet is more important": soft injection, and the residuals only on the conditional rows
  (the unconditional pass runs without control, so CFG pushes towards the control).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from . import preprocessors
from .plans import ControlUnitPlan, IPAdapterPlan, infotext_params  # noqa: F401 - the engine imports them here
from .files import annotators_dir
from .preprocessors import mask_array, to_array

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- control maps

def detect(unit: ControlUnitPlan, image: Image.Image, mask: Image.Image | None, width: int, height: int,
           annotators=None, device=None):
    """(detected map RGB uint8, mask uint8 at the map's size or None) for a generation of width x height.
    ``annotators``, ``device``: the folder and device of a networked module (preprocessors.run)."""
    p = preprocessors.PREPROCESSORS[unit.module]
    arr = to_array(image)
    m = mask_array(mask, (arr.shape[1], arr.shape[0])) if p.uses_mask else None
    res = unit.processor_res
    if unit.pixel_perfect and p.resolution is not None:
        res = preprocessors.pixel_perfect_resolution(arr.shape[:2], (height, width), unit.resize_mode)
    try:
        out = preprocessors.run(p, arr, res, unit.threshold_a, unit.threshold_b, m, annotators=annotators,
                                device=device)
    except preprocessors.PreprocessorError as e:  # (a file changed since submit): the job fails naming it
        from ..plan import GenerationError

        raise GenerationError(f"ControlNet unit {unit.entry.name!r}, module {unit.module!r}: {e}") from e
    if m is not None and (m.shape[1], m.shape[0]) != (out.shape[1], out.shape[0]):
        m = mask_array(Image.fromarray(m), (out.shape[1], out.shape[0]))
    return out, m


def fit(arr: np.ndarray, width: int, height: int, resize_mode: str, *, nearest: bool = False) -> np.ndarray:
    """The map at the generation size: "Just Resize" stretches, "Crop and Resize" covers and crops
    the centre, "Resize and Fill" fits inside and fills the rest with the median border colour."""
    import cv2

    h, w = arr.shape[:2]
    # A binary map (edges, thresholds) stays binary: resized, then cut at a quarter of white so
    # that one-pixel edges survive shrinking.
    binary = not nearest and arr.dtype == np.uint8 and np.isin(arr, (0, 255)).all()

    def scaled(nw, nh):
        if (nw, nh) == (w, h):
            return arr
        interp = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if nw * nh < w * h else cv2.INTER_CUBIC)
        out = cv2.resize(arr, (max(1, nw), max(1, nh)), interpolation=interp)
        return np.where(out > 63, 255, 0).astype(np.uint8) if binary else out

    if resize_mode == "Just Resize":
        return scaled(width, height)
    if resize_mode == "Resize and Fill":
        k = min(width / w, height / h)
        nw, nh = int(round(w * k)), int(round(h * k))
        small = scaled(nw, nh)
        borders = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]], axis=0)
        fill = np.median(borders, axis=0).astype(arr.dtype)
        out = np.empty((height, width) + arr.shape[2:], arr.dtype)
        out[...] = fill
        y, x = (height - small.shape[0]) // 2, (width - small.shape[1]) // 2
        out[y:y + small.shape[0], x:x + small.shape[1]] = small[:height, :width]
        return out
    k = max(width / w, height / h)  # Crop and Resize
    big = scaled(int(round(w * k)), int(round(h * k)))
    y, x = (big.shape[0] - height) // 2, (big.shape[1] - width) // 2
    return big[y:y + height, x:x + width]


def control_tensor(detected: np.ndarray, mask: np.ndarray | None, width: int, height: int,
                   resize_mode: str) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1]; an inpainting map has -1 where the mask is (the ControlNet
    inpaint protocol: ``image * (1 - mask) - mask``)."""
    arr = fit(detected, width, height, resize_mode).astype(np.float32) / 255.0
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).unsqueeze(0)
    if mask is not None:
        m = torch.from_numpy(fit(mask, width, height, resize_mode, nearest=True).astype(np.float32) / 255.0)
        m = (m > 0.5).float()[None, None]
        t = t * (1 - m) - m
    return t


# ---------------------------------------------------------------------------- the UNet wrapper

class StepClock:
    """A1111's ``state.sampling_step`` / ``sampling_steps`` for one stage (see the module doc)."""

    def __init__(self, total: int | None = None):
        self.step = 0
        self.total = total

    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0


def soft_scales(weight: float, n: int, adapter: bool = False) -> list[float]:
    """The extension's soft injection: per-residual factors (T2I-Adapters: its four feature factors)."""
    if adapter:
        return [weight * f for f in (0.25, 0.62, 0.825, 1.0)[:n]] + [weight] * max(n - 4, 0)
    factors = [0.825 ** float(12 - i) for i in range(13)]
    return [weight * f for f in factors[:n]] if n <= 13 else [weight] * n


@dataclass
class ActiveUnit:
    unit: ControlUnitPlan
    model: torch.nn.Module
    hint: torch.Tensor         # (1, 3, H, W) on the device
    calls: int = 0             # evaluations it added residuals to (the tests count them)
    features: list | None = None  # a T2I-Adapter's features: they do not depend on the step, made once

    @property
    def is_adapter(self) -> bool:
        return self.unit.entry.kind == "t2i-adapter"


class ControlledUNet:
    """The UNet (or a wrapper of it) with the units' residuals added; the CFG denoiser calls it
    once per model evaluation with the unconditional rows first (``rows_per_image`` rows per image)."""

    def __init__(self, unet, units: list[ActiveUnit], clock: StepClock, rows_per_image: int, ip=None):
        self.unet = unet
        self.units = units
        self.clock = clock
        self.rows_per_image = rows_per_image
        self.ip = ip  # (InstalledAdapters, [IPAdapterPlan], [(cond, uncond or None) embeds]) or None

    def __getattr__(self, name):
        return getattr(self.unet, name)

    def __call__(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None, **kwargs):
        down = mid = intra = None
        fraction = self.clock.fraction()
        for au in self.units:
            u = au.unit
            if not u.guidance_start <= fraction <= u.guidance_end:
                continue
            au.calls += 1
            if au.is_adapter:
                if au.features is None:
                    au.features = list(au.model(au.hint.to(x.device, au.model.dtype)))
                res = [f.to(x.dtype).expand(x.shape[0], -1, -1, -1) for f in au.features]
            else:
                hint = au.hint.to(x.device, x.dtype).expand(x.shape[0], -1, -1, -1)
                if u.union_type is not None:  # a union ControlNet: the control type picks its task embedding
                    kinds = torch.zeros(x.shape[0], au.model.config.num_control_type, device=x.device, dtype=x.dtype)
                    kinds[:, u.union_type] = 1
                    d, m = au.model(x[:, :4], t, encoder_hidden_states=encoder_hidden_states, controlnet_cond=[hint],
                                    control_type=kinds, control_type_idx=[u.union_type], conditioning_scale=1.0,
                                    added_cond_kwargs=added_cond_kwargs, return_dict=False)
                else:
                    d, m = au.model(x[:, :4], t, encoder_hidden_states=encoder_hidden_states, controlnet_cond=hint,
                                    conditioning_scale=1.0, added_cond_kwargs=added_cond_kwargs, return_dict=False)
                res = list(d) + [m]
            if u.control_mode == "Balanced":
                scales = [u.weight] * len(res)
            else:
                scales = soft_scales(u.weight, len(res), au.is_adapter)
            rows = None
            if u.control_mode == "ControlNet is more important":
                b = max(x.shape[0] // self.rows_per_image, 1)
                rows = torch.ones(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype)
                rows[:b] = 0  # the unconditional rows run without control
            res = [r * s if rows is None else r * s * rows for r, s in zip(res, scales)]
            if au.is_adapter:
                intra = res if intra is None else [a + b_ for a, b_ in zip(intra, res)]
            elif down is None:
                down, mid = res[:-1], res[-1]
            else:
                down = [a + b_ for a, b_ in zip(down, res[:-1])]
                mid = mid + res[-1]
        extra = {}
        if self.ip is not None:
            installed, plans, embeds = self.ip
            installed.set_scales([p.weight if p.guidance_start <= fraction <= p.guidance_end else 0.0
                                  for p in plans])
            b = max(x.shape[0] // self.rows_per_image, 1)
            rows = []
            for e, u in embeds:  # unconditional rows: a zero embedding (plain), a black image's (plus)
                e = e.to(x.device, x.dtype)
                r = e.expand(x.shape[0], *e.shape[1:]).clone()
                r[:b] = 0 if u is None else u.to(x.device, x.dtype)
                rows.append(r)
            added_cond_kwargs = {**(added_cond_kwargs or {}), "image_embeds": rows}
        if down is not None:
            extra.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        if intra is not None:  # the UNet pops from this list: a fresh one per call
            extra["down_intrablock_additional_residuals"] = list(intra)
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                         **kwargs, **extra)


class ControlState:
    """A job's units: detected maps (once per job) and the wrappers of its stages."""

    def __init__(self, engine, plan):
        from .loading import ControlNetCache

        self.engine = engine
        self.plan = plan
        cache = getattr(engine, "controlnets", None)
        if cache is None:
            cache = engine.controlnets = ControlNetCache()
        self.cache = cache
        self.maps: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.stages: list[ControlledUNet] = []
        self.installed = None   # the job's IP-Adapter layers in the base UNet
        self.ip_embeds = None
        init = plan.init
        settings = getattr(engine, "settings", None)
        annotators = annotators_dir(settings) if settings is not None else None
        for u in plan.controlnets:
            image = u.image if u.image is not None else (init.image if init is not None else None)
            mask = u.mask if u.mask is not None else (init.mask if init is not None else None)
            if image is None:  # resolve refuses this; a plan built by hand may still hold it
                raise ValueError(f"ControlNet unit {u.entry.name!r} has no image")
            self.maps.append(detect(u, image, mask, plan.width, plan.height, annotators,
                                    getattr(engine, "device", None)))

    def _ip(self, loaded):
        """The job's IP-Adapters, put into ``loaded``'s UNet once (taken out by ``close``)."""
        from ..plan import GenerationError
        from .ipadapter import EncoderCache, InstalledAdapters, image_embeds, load_adapter_state

        plans = [p for p in self.plan.ip_adapters if p.weight != 0]
        if not plans:
            return None
        if self.installed is None:
            try:
                encoders = getattr(self.engine, "ip_encoders", None)
                if encoders is None:
                    encoders = self.engine.ip_encoders = EncoderCache()
                unet = loaded.pipe.unet
                embeds = []
                for p in plans:
                    enc = encoders.get(p.encoder, self.engine.device, unet.dtype)
                    embeds.append(image_embeds(enc, p.images, self.engine.device, p.entry.variant))
                self.installed = InstalledAdapters(unet, [load_adapter_state(p.entry.path) for p in plans])
                self.ip_embeds = embeds
            except GenerationError:
                raise
            except Exception as e:  # noqa: BLE001 - name the file, fail the job
                raise GenerationError(f"IP-Adapter could not be used: "
                                      f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
        return self.installed, plans, self.ip_embeds

    def close(self) -> None:
        if self.installed is not None:
            self.installed.remove()
            self.installed = None

    def detected_maps(self) -> list[tuple[str, Image.Image]]:
        """The maps asked for, at the generation size as the ControlNet saw them (A1111 returns these)."""
        w, h = self.plan.width, self.plan.height
        return [(f"ControlNet {i}", Image.fromarray(np.ascontiguousarray(fit(m, w, h, u.resize_mode))))
                for i, ((m, _), u) in enumerate(zip(self.maps, self.plan.controlnets)) if u.save_detected_map]

    def wrap(self, loaded, den, stage: str, width: int, height: int):
        """``den`` with its UNet controlled for ``stage`` ("low": first pass, "high": hires pass)."""
        if getattr(loaded, "is_flow", False):
            return self._wrap_flow(loaded, den, stage, width, height)
        active = []
        for u, detected, mask in self._stage_units(stage):
            try:
                model = self.cache.get(u.entry, loaded.pipe.unet, self.engine.device)
            except Exception as e:  # noqa: BLE001 - name the file, fail the job
                from ..plan import GenerationError

                raise GenerationError(f"ControlNet {u.entry.name!r} could not be loaded: "
                                      f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
            types = getattr(model.config, "num_control_type", None) if u.union_type is not None else None
            if types is not None and u.union_type >= types:
                from ..plan import GenerationError

                raise GenerationError(f"ControlNet {u.entry.name!r} knows {types} control types; control type "
                                      f"{u.union_type} is not one of them")
            hint = control_tensor(detected, mask, width, height, u.resize_mode).to(self.engine.device)
            active.append(ActiveUnit(u, model, hint))
        ip = self._ip(loaded) if self.plan.ip_adapters else None
        if not active and ip is None:
            return den
        if den.clock is None:
            den.clock = StepClock()
        rows = 1 + len(getattr(den.cond, "weights", ()))
        wrapped = ControlledUNet(den.unet, active, den.clock, rows, ip)
        den.unet = wrapped
        self.stages.append(wrapped)
        return den

    def _stage_units(self, stage: str):
        """(unit, detected map, mask) of the units that guide ``stage``."""
        for u, (detected, mask) in zip(self.plan.controlnets, self.maps):
            if u.weight == 0 or (stage == "low" and u.hires == "high" and self.plan.hires) \
                    or (stage == "high" and u.hires == "low"):
                continue
            yield u, detected, mask

    def _wrap_flow(self, loaded, den, stage: str, width: int, height: int):
        """A Flux.1 or SD 3.x denoiser with its ControlNets (engine/controlnet/transformer.py) on its
        ``control`` hook."""
        from ..plan import GenerationError
        from .transformer import FlowControl, FlowUnit, control_latents, flux_mode, prepare_sd3

        if not hasattr(den, "control"):  # (resolve refuses units for other flow families)
            raise GenerationError(f"ControlNets do not run on {loaded.family}")
        transformer = loaded.pipe.transformer
        units = []
        for u, detected, _ in self._stage_units(stage):
            try:
                model = self.cache.get(u.entry, transformer, self.engine.device)
            except Exception as e:  # noqa: BLE001 - name the file, fail the job
                raise GenerationError(f"ControlNet {u.entry.name!r} could not be loaded: "
                                      f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
            # The map at the generation size, encoded as the engine encodes any image (its VAE, offload,
            # tiling). (An inpainting map's mask is the SD inpaint ControlNet's protocol: not used here.)
            z = self.engine._encode(loaded, Image.fromarray(np.ascontiguousarray(fit(detected, width, height,
                                                                                     u.resize_mode))))
            model = prepare_sd3(model, transformer)
            units.append(FlowUnit(u, model, control_latents(z, loaded.pipe.vae, model), flux_mode(u, model)))
        if not units:
            return den
        if den.clock is None:
            den.clock = StepClock()
        den.control = FlowControl(units, den.clock)
        self.stages.append(den.control)
        return den
