"""The ``controlnets`` field of native requests: its wire type, and resolving it into unit plans.

Everything a unit names is checked at submit — model file (installed, usable, the model's
family), module (known, runnable here: a networked one without its file is a 422 naming the
file), images (decoded and size-checked), ranges — so a bad unit is a 4xx naming its field and
nothing is queued. The worker resolves the stored request again, as for every job.
"""
from __future__ import annotations

import threading
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .files import ControlNetFiles, annotators_dir, controlnet_dir

CONTROL_MODE_NAMES = {
    "balanced": "Balanced", "0": "Balanced",
    "my prompt is more important": "My prompt is more important", "prompt": "My prompt is more important",
    "1": "My prompt is more important",
    "controlnet is more important": "ControlNet is more important", "controlnet": "ControlNet is more important",
    "2": "ControlNet is more important",
}
RESIZE_MODE_NAMES = {
    "just resize": "Just Resize", "resize": "Just Resize", "0": "Just Resize", "3": "Just Resize",
    "crop and resize": "Crop and Resize", "inner fit (scale to fit)": "Crop and Resize",
    "scale to fit (inner fit)": "Crop and Resize", "1": "Crop and Resize",
    "resize and fill": "Resize and Fill", "outer fit (shrink to fit)": "Resize and Fill",
    "envelope (outer fit)": "Resize and Fill", "2": "Resize and Fill",
}
HIRES_NAMES = {"both": "both", "low": "low", "low res only": "low", "high": "high", "high res only": "high"}
# Union ControlNets (SDXL "union" / "ProMax"): the control types they were trained on, by index, and
# the preprocessor control types (tags) that mean each one.
UNION_TYPES = ("OpenPose", "Depth", "Soft Edge", "Canny / Lineart / MLSD", "Normal Map", "Segmentation", "Tile",
               "Inpaint")
UNION_TYPE_OF_TAG = {"OpenPose": 0, "Depth": 1, "SoftEdge": 2, "Scribble": 2, "Canny": 3, "Lineart": 3, "MLSD": 3,
                     "Normal": 4, "Segmentation": 5, "Tile": 6, "Inpaint": 7}
# Flux.1 union ControlNets (InstantX / Shakker, FluxControlNetModel with num_mode) number their
# modes canny 0, tile 1, depth 2, blur 3, pose 4, gray 5, low quality 6; the types above that have one.
FLUX_UNION_MODES = {"Canny / Lineart / MLSD": 0, "Tile": 1, "Depth": 2, "OpenPose": 4}
UNION_TYPE_NAMES = {**{n.casefold(): n for n in UNION_TYPES}, **{str(i): n for i, n in enumerate(UNION_TYPES)},
                    **{t.casefold(): UNION_TYPES[i] for t, i in UNION_TYPE_OF_TAG.items()},
                    "hard edge": "Canny / Lineart / MLSD", "softedge": "Soft Edge", "normal": "Normal Map",
                    "segment": "Segmentation", "repaint": "Inpaint", "unknown": None}


def _choice(table: dict, what: str):
    def check(v):
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ValueError(f"{what} must be a name or 0, 1, 2; valid choices: "
                             f"{', '.join(sorted(set(table.values())))}")
        key = str(int(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() \
            else str(v).strip().casefold()
        if key not in table:
            raise ValueError(f"unknown {what} {v!r}; valid choices: {', '.join(sorted(set(table.values())))}")
        return table[key]
    return check


class PreprocessorParams(BaseModel):
    """The module's sliders (A1111's processor_res, threshold_a, threshold_b); out of range = default."""
    model_config = ConfigDict(extra="forbid")
    resolution: float | None = Field(None, description="processor resolution (the shorter side), -1: default")
    threshold_a: float | None = None
    threshold_b: float | None = None


class ControlNetUnitRequest(BaseModel):
    """One ControlNet unit (README "ControlNet")."""
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=512, description="a file in the controlnet folder (GET /controlnets)")
    image: str | None = Field(None, description="base64 or data URL; img2img: defaults to init_image")
    mask: str | None = Field(None, description="white = masked (inpaint modules); img2img: defaults to mask")
    preprocessor: str = Field("none", max_length=128, description="a module of GET /preprocessors")
    preprocessor_params: PreprocessorParams = Field(default_factory=PreprocessorParams)
    weight: float = Field(1.0, ge=0.0, le=2.0)
    guidance_start: float = Field(0.0, ge=0.0, le=1.0)
    guidance_end: float = Field(1.0, ge=0.0, le=1.0)
    # A name, or the extension's numbers (the schema says both, so a number is not "invalid data").
    control_mode: str | int = Field("Balanced", description="Balanced | My prompt is more important | "
                                                      "ControlNet is more important (or 0, 1, 2)")
    resize_mode: str | int = Field("Crop and Resize", description="Just Resize | Crop and Resize | Resize and Fill "
                                                            "(or 0, 1, 2)")
    pixel_perfect: bool = False
    hires: str = Field("both", description="both | low | high: which passes of a hires job it guides")
    save_detected_map: bool = Field(False, description="return the detected map after the images")
    union_control_type: str | int | None = Field(
        None, description="union ControlNets: the control type (" + ", ".join(UNION_TYPES) + ", or 0-7); "
                          "default: the preprocessor's")

    @field_validator("union_control_type", mode="before")
    @classmethod
    def _union(cls, v):
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ValueError(f"union control type must be a name or 0-7; valid choices: {', '.join(UNION_TYPES)}")
        key = str(v).strip().casefold()
        if key not in UNION_TYPE_NAMES:
            raise ValueError(f"unknown union control type {v!r}; valid choices: {', '.join(UNION_TYPES)}")
        return UNION_TYPE_NAMES[key]

    @field_validator("control_mode", mode="before")
    @classmethod
    def _mode(cls, v):
        return _choice(CONTROL_MODE_NAMES, "control mode")(v)

    @field_validator("resize_mode", mode="before")
    @classmethod
    def _resize(cls, v):
        return _choice(RESIZE_MODE_NAMES, "resize mode")(v)

    @field_validator("hires", mode="before")
    @classmethod
    def _hires(cls, v):
        return _choice(HIRES_NAMES, "hires option")(v)

    @field_validator("image", "mask", mode="before")
    @classmethod
    def _empty_is_none(cls, v):
        return None if isinstance(v, str) and not v.strip() else v

    @model_validator(mode="after")
    def _window(self) -> "ControlNetUnitRequest":
        if self.guidance_start > self.guidance_end:
            raise ValueError(f"guidance_start ({self.guidance_start}) must not be after guidance_end "
                             f"({self.guidance_end})")
        return self


class IPAdapterUnitRequest(BaseModel):
    """One IP-Adapter (README "ControlNet", docs/controlnet.md): reference images as extra prompt tokens."""
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=512, description="a file in the ipadapter folder")
    images: list[str] = Field(min_length=1, max_length=4, description="base64 or data URLs")
    weight: float = Field(1.0, ge=0.0, le=2.0)
    guidance_start: float = Field(0.0, ge=0.0, le=1.0)
    guidance_end: float = Field(1.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _window(self) -> "IPAdapterUnitRequest":
        if self.guidance_start > self.guidance_end:
            raise ValueError(f"guidance_start ({self.guidance_start}) must not be after guidance_end "
                             f"({self.guidance_end})")
        return self


_FILES: dict[str, ControlNetFiles] = {}
_FILES_LOCK = threading.Lock()


def files_for(settings) -> ControlNetFiles:
    """One scanner per folder (it caches what each file is per file version)."""
    key = str(controlnet_dir(settings))
    with _FILES_LOCK:
        f = _FILES.get(key)
        if f is None:
            f = _FILES[key] = ControlNetFiles(settings)
        return f


def input_image(text: str, field: str, settings):
    """A unit's image decoded and checked like every request image (format, truncation, size)."""
    from ...errors import RequestError
    from ...imageinput import ImageInputError, decode_image

    try:
        return decode_image(text, field, settings.max_hires_pixels)
    except ImageInputError as e:
        raise RequestError(e.field, e.message, e.status) from None


_IP_FILES: dict[str, object] = {}


def ip_files_for(settings):
    from .ipadapter import IPAdapterFiles, ipadapter_dir

    key = str(ipadapter_dir(settings))
    with _FILES_LOCK:
        f = _IP_FILES.get(key)
        if f is None:
            f = _IP_FILES[key] = IPAdapterFiles(settings)
        return f


def resolve_ip_adapters(units: list[IPAdapterUnitRequest], model, settings):
    """(plans, echo list, record list) or a RequestError naming the field."""
    from ...errors import RequestError
    from ...imageinput import describe
    from ...vocabulary import FAMILY_LABELS
    from .ipadapter import clip_vision_dir, ipadapter_dir, model_cross_dim
    from .plans import IPAdapterPlan

    files = ip_files_for(settings)
    plans, echo, record = [], [], []
    for i, u in enumerate(units):
        where = f"ip_adapters.{i}"
        entry = files.resolve(u.model)
        if entry is None:
            names = [e.name for e in files.entries() if e.error is None]
            raise RequestError(f"{where}.model", f"unknown IP-Adapter {u.model!r}; installed in "
                                                 f"{ipadapter_dir(settings)}: {', '.join(names) or 'none'}")
        if entry.error:
            raise RequestError(f"{where}.model", f"IP-Adapter {entry.name!r} cannot be used: {entry.error}")
        width = model_cross_dim(model)
        if entry.cross_dim != width:
            theirs = FAMILY_LABELS.get(entry.family, entry.family) if entry.family else \
                f"a model with {entry.cross_dim}-wide cross-attention"
            raise RequestError(f"{where}.model", f"IP-Adapter {entry.name!r} is for {theirs}, but model "
                                                 f"{model.name!r} is {FAMILY_LABELS.get(model.family, model.family)} "
                                                 f"({width}-wide cross-attention)")
        encoder = files.encoder_for(entry)
        if encoder is None:
            raise RequestError(f"{where}.model", f"IP-Adapter {entry.name!r} needs a CLIP image encoder with "
                                                 f"{'hidden_size' if entry.variant == 'plus' else 'projection_dim'} "
                                                 f"{entry.image_dim} in {clip_vision_dir(settings)}/ "
                                                 "(a CLIPVisionModelWithProjection folder: config.json + weights)")
        images = tuple(input_image(text, f"{where}.images.{k}", settings) for k, text in enumerate(u.images))
        plans.append(IPAdapterPlan(entry, encoder, images, u.weight, u.guidance_start, u.guidance_end))
        full = {**u.model_dump(mode="json"), "model": entry.name}
        record.append(full)
        echo.append({**full, "images": [describe(im) for im in images]})
    return tuple(plans), echo, record


def txt2img_inpaint_init(units):
    """txt2img with an ``inpaint_only`` unit that has an image and a mask: the extension keeps the
    unmasked part of that image; here it becomes the job's init image (strength 1, mask unblurred), so
    the img2img machinery keeps those pixels exactly. None when no unit asks for it."""
    from ..plan import InitImagePlan

    for u in units:
        if u.module == "inpaint_only" and u.image is not None and u.mask is not None:
            mode = {"Just Resize": 0, "Crop and Resize": 1, "Resize and Fill": 2}[u.resize_mode]
            return InitImagePlan(u.image, 1.0, mode, u.mask, mask_blur=0, inpainting_fill=1)
    return None


def resolve_units(units: list[ControlNetUnitRequest], model, settings, *, has_init: bool):
    """(unit plans, echo list (images described), record list (images kept)) or a RequestError."""
    from ...errors import RequestError
    from ...imageinput import describe
    from ...vocabulary import FAMILY_LABELS
    from . import preprocessors
    from .plans import ControlUnitPlan

    files = files_for(settings)
    plans, echo, record = [], [], []
    for i, u in enumerate(units):
        where = f"controlnets.{i}"
        entry = files.resolve(u.model)
        if entry is None:
            names = [e.name for e in files.entries() if e.error is None]
            raise RequestError(f"{where}.model", f"unknown ControlNet {u.model!r}; installed in "
                                                 f"{controlnet_dir(settings)}: {', '.join(names) or 'none'}")
        if entry.error:
            raise RequestError(f"{where}.model", f"ControlNet {entry.name!r} cannot be used: {entry.error}")
        if entry.family != model.family:
            theirs = FAMILY_LABELS.get(entry.family, entry.family or "an unknown family")
            ours = FAMILY_LABELS.get(model.family, model.family)
            raise RequestError(f"{where}.model", f"ControlNet {entry.name!r} is for {theirs}, but model "
                                                 f"{model.name!r} is {ours}; use a ControlNet of the model's family")
        p = preprocessors.find(u.preprocessor)
        if p is None:
            runnable = [q.name for q in preprocessors.PREPROCESSORS.values() if q.model_free]
            raise RequestError(f"{where}.preprocessor", f"unknown preprocessor {u.preprocessor!r}; built in: "
                                                        f"{', '.join(runnable)} (GET /preprocessors lists all)")
        why = preprocessors.why_not_runnable(p, annotators_dir(settings))
        if why:
            raise RequestError(f"{where}.preprocessor", why)
        image = input_image(u.image, f"{where}.image", settings) if u.image else None
        if image is None and not has_init:
            raise RequestError(f"{where}.image", "a ControlNet unit needs an image (only img2img can default "
                                                 "to its init_image)")
        mask = input_image(u.mask, f"{where}.mask", settings) if u.mask else None
        if mask is not None and image is not None and mask.size != image.size:
            raise RequestError(f"{where}.mask", f"mask is {mask.width}x{mask.height} but the unit's image is "
                                                f"{image.width}x{image.height}; they must be the same size")
        union_type = None
        if entry.kind == "controlnet-union":
            name = u.union_control_type
            if name is None and p.name != "none" and p.tags and p.tags[0] in UNION_TYPE_OF_TAG:
                name = UNION_TYPES[UNION_TYPE_OF_TAG[p.tags[0]]]
            if name is None:
                raise RequestError(f"{where}.union_control_type", f"ControlNet {entry.name!r} is a union model: "
                                   f"say which control type the image is ({', '.join(UNION_TYPES)}), or use a "
                                   "preprocessor of that type")
            if entry.family == "flux1" and name not in FLUX_UNION_MODES:
                raise RequestError(f"{where}.union_control_type", f"ControlNet {entry.name!r} is a Flux union model; "
                                   f"control type {name!r} is not one of its modes; valid choices: "
                                   f"{', '.join(FLUX_UNION_MODES)}")
            union_type = UNION_TYPES.index(name)
        pp = u.preprocessor_params
        plans.append(ControlUnitPlan(union_type=union_type,
            entry=entry, module=p.name, image=image, mask=mask, weight=u.weight, guidance_start=u.guidance_start,
            guidance_end=u.guidance_end, control_mode=u.control_mode, resize_mode=u.resize_mode,
            processor_res=pp.resolution, threshold_a=pp.threshold_a, threshold_b=pp.threshold_b,
            pixel_perfect=u.pixel_perfect, hires=u.hires, save_detected_map=u.save_detected_map))
        full: dict[str, Any] = {**u.model_dump(mode="json"), "model": entry.name, "preprocessor": p.name}
        record.append(full)
        echo.append({**full, "image": describe(image) if image is not None else None,
                     "mask": describe(mask) if mask is not None else None})
    return tuple(plans), echo, record
