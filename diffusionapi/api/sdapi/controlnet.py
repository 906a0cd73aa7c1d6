"""sd-webui-controlnet's API (version 3) over the native ControlNet support.

- ``/controlnet/version``, ``model_list``, ``module_list`` (with ``module_detail``), ``control_types``,
  ``settings`` and ``detect``, answered the way the extension answers them;
- ``alwayson_scripts.controlnet`` (the key in any case) turned into the native ``controlnets`` units
  (``controlnet_units``), with the extension's field names, aliases, defaults and legacy names.
"""
from __future__ import annotations

import base64
import io
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from ...engine.controlnet import preprocessors as pp
from ...engine.controlnet.files import annotators_dir
from ...engine.controlnet.request import (CONTROL_MODE_NAMES, HIRES_NAMES, RESIZE_MODE_NAMES, files_for)

router = APIRouter()

API_VERSION = 3
UNIT_COUNT = 3  # the extension's default control_net_unit_count
# Control types (the UI's radio buttons): tag -> words a model file name holds for it.
CONTROL_TYPES = {
    "Canny": ("canny",), "Depth": ("depth",), "NormalMap": ("normal",), "OpenPose": ("openpose", "pose"),
    "MLSD": ("mlsd",), "Lineart": ("lineart",), "SoftEdge": ("softedge", "hed", "pidi"), "Scribble": ("scribble",),
    "Segmentation": ("seg",), "Shuffle": ("shuffle",), "Tile": ("tile",), "Inpaint": ("inpaint",),
    "IP-Adapter": ("ip-adapter", "ip_adapter"), "Reference": (), "T2I-Adapter": ("t2iadapter", "t2i"),
}
_TAG_ALIASES = {"NormalMap": "Normal"}


def _error(status: int, field: str, message: str) -> JSONResponse:
    return JSONResponse({"status": "error", "error": f"{field}: {message}", "detail": message,
                         "errors": [{"loc": ["body", field], "msg": message}]}, status_code=status)


def _titles(request: Request) -> list[str]:
    from ...engine.controlnet.files import short_hash
    from ...engine.controlnet.request import ip_files_for

    settings = request.app.state.settings
    return [e.title for e in files_for(settings).entries() if e.error is None] + \
        [f"{e.name} [{short_hash(e.path)}]" for e in ip_files_for(settings).entries() if e.error is None]


@router.get("/controlnet/version")
async def version():
    return {"version": API_VERSION}


@router.get("/controlnet/model_list")
def model_list(request: Request, update: bool = True):
    return {"model_list": _titles(request)}


@router.get("/controlnet/module_list")
async def module_list(alias_names: bool = False):
    mods = list(pp.PREPROCESSORS.values())
    names = [p.label if alias_names else p.name for p in mods]
    detail = {(p.label if alias_names else p.name): {"model_free": p.name.startswith("reference"),
                                                     "sliders": p.sliders()} for p in mods}
    return {"module_list": names, "module_detail": detail}


@router.get("/controlnet/control_types")
def control_types(request: Request):
    titles = _titles(request)
    out = {"All": {"module_list": list(pp.PREPROCESSORS), "model_list": ["None", *titles],
                   "default_option": "none", "default_model": "None"}}
    for tag, words in CONTROL_TYPES.items():
        want = _TAG_ALIASES.get(tag, tag)
        modules = [p.name for p in pp.PREPROCESSORS.values() if want in p.tags and p.name != "none"]
        # the type's own module first (the extension orders by priority: canny before invert)
        modules.sort(key=lambda name: not any(w.replace("-", "_") in name for w in words + (want.lower(),)))
        models = [t for t in titles if any(w in t.lower() for w in words)]
        out[tag] = {"module_list": ["none", *modules], "model_list": ["None", *models],
                    "default_option": modules[0] if modules else "none",
                    "default_model": models[0] if models else "None"}
    return {"control_types": out}


@router.get("/controlnet/settings")
async def settings():
    return {"control_net_unit_count": UNIT_COUNT}


def _png_b64(arr) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@router.post("/controlnet/detect")
async def detect(request: Request):
    """Runs a preprocessor alone: ``{controlnet_module, controlnet_input_images: [b64], controlnet_processor_res,
    controlnet_threshold_a, controlnet_threshold_b, controlnet_masks}`` -> ``{info, images}``.
    (webuiapi sends the images as ``controlnet_images``; both names work.)"""
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        return _error(400, "body", "not JSON")
    if not isinstance(body, dict):
        return _error(422, "body", "expected a JSON object")
    module = body.get("controlnet_module", "none")
    p = pp.find(module)
    if p is None:
        return _error(422, "controlnet_module", f"unknown module {module!r}; GET /controlnet/module_list lists them")
    settings = request.app.state.settings
    why = pp.why_not_runnable(p, annotators_dir(settings))
    if why:
        return _error(422, "controlnet_module", why)
    if p.net is not None and settings.backend != "embedded":
        # An API node of a cluster runs no torch (docs/architecture.md); the network runs on the workers.
        return _error(422, "controlnet_module", f"module {p.name!r} runs a network, which this API node does not "
                                                "load; ask a job for the map instead (save_detected_map)")
    images = body.get("controlnet_input_images") or body.get("controlnet_images") or []
    if not isinstance(images, list) or not images:
        return _error(422, "controlnet_input_images", "no image given")
    masks = body.get("controlnet_masks") or []
    if p.uses_mask and len(masks) != len(images):
        return _error(422, "controlnet_masks", f"module {p.name!r} needs one mask per image")

    def run():
        from ...engine.controlnet.preprocessors import mask_array, to_array
        from ...imageinput import ImageInputError, decode_image

        out, poses = [], []
        for i, text in enumerate(images):
            try:
                im = decode_image(text, f"controlnet_input_images[{i}]", settings.max_hires_pixels)
                m = decode_image(masks[i], f"controlnet_masks[{i}]", settings.max_hires_pixels) \
                    if p.uses_mask else None
            except ImageInputError as e:
                return _error(e.status, e.field, e.message)
            arr = to_array(im)
            mask = mask_array(m, (arr.shape[1], arr.shape[0])) if m is not None else None
            try:
                if p.net == "openpose":  # the extension also answers the keypoints (OpenPose JSON) as "poses"
                    from ...engine.controlnet.annotators import openpose_with_pose

                    res = p.params(_num(body.get("controlnet_processor_res")), None, None)[0]
                    drawn, pose = openpose_with_pose(arr, res, annotators_dir(settings), settings.device)
                    out.append(_png_b64(drawn))
                    poses.append(pose)
                    continue
                out.append(_png_b64(pp.run(p, arr, _num(body.get("controlnet_processor_res")),
                                           _num(body.get("controlnet_threshold_a")),
                                           _num(body.get("controlnet_threshold_b")), mask,
                                           annotators=annotators_dir(settings), device=settings.device)))
            except pp.PreprocessorError as e:
                return _error(e.status, "controlnet_module", str(e))
        return {"info": "Success", "images": out, **({"poses": poses} if poses else {})}

    return await run_in_threadpool(run)


def _num(v) -> float | None:
    try:
        return float(v) if v is not None else None
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------- alwayson_scripts

class UnitError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _image_and_mask(unit: dict) -> tuple[Any, Any]:
    """The extension's image forms: a string, ``{image, mask}``, ``[image, mask]``, or a list of those
    (several inputs: the first is used here)."""
    image = unit.get("image")
    if image is None:
        image = unit.get("input_image")  # legacy name
    mask = unit.get("mask") if unit.get("mask") is not None else unit.get("mask_image")
    if isinstance(image, list) and image:
        first = image[0]
        if isinstance(first, (dict, list)):
            image = first
        elif len(image) == 2 and all(isinstance(x, str) for x in image):
            image, mask = image[0], mask or image[1]
        else:
            image = first
    if isinstance(image, list) and len(image) == 2:
        image, mask = image[0], mask or image[1]
    if isinstance(image, dict):
        mask = mask or image.get("mask")
        image = image.get("image")
    return image, mask


def _lookup(table: dict, value, default: str, field: str) -> str:
    if value is None or value == "":
        return default
    key = str(int(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) and \
        float(value).is_integer() else str(value).strip().casefold()
    if key not in table:
        raise UnitError(field, f"unknown value {value!r}; valid: {', '.join(sorted(set(table.values())))}")
    return table[key]


def controlnet_units(alwayson: dict | None, warnings: list[str], ip_adapters: list | None = None) -> list[dict]:
    """The native ``controlnets`` for an A1111 request's ``alwayson_scripts`` (empty when it has none);
    IP-Adapter units (module ``ip-adapter*``) go to ``ip_adapters`` when it is given."""
    if not isinstance(alwayson, dict):
        return []
    key = next((k for k in alwayson if str(k).strip().casefold() == "controlnet"), None)
    if key is None:
        return []
    script = alwayson[key]
    args = script.get("args", []) if isinstance(script, dict) else script if isinstance(script, list) else []
    units = []
    for i, unit in enumerate(args):
        where = f"alwayson_scripts.{key}.args[{i}]"
        if not isinstance(unit, dict):
            continue
        # The extension's unit defaults to disabled; Forge's to enabled (its units carry image_fg).
        if not unit.get("enabled", "image_fg" in unit):
            continue
        module = str(unit.get("module") or "none")
        model = unit.get("model")
        p = pp.find(module)
        if p is not None and p.name.startswith("reference"):
            warnings.append(f"{where}: module {module!r} is not supported; unit skipped")
            continue
        if model is None or str(model).strip() in ("", "None", "none"):
            raise UnitError(f"{where}.model", "an enabled unit needs a ControlNet model "
                                              "(GET /controlnet/model_list)")
        image, mask = _image_and_mask(unit)
        if module.strip().casefold().startswith("ip-adapter") and ip_adapters is not None:
            images = [x for x in (unit.get("image") if isinstance(unit.get("image"), list) else [image])
                      if isinstance(x, str)] or ([image] if isinstance(image, str) else [])
            images = [x.get("image") if isinstance(x, dict) else x for x in images]
            ip_adapters.append({"model": str(model), "images": images, "weight": unit.get("weight", 1.0),
                                "guidance_start": unit.get("guidance_start", 0.0),
                                "guidance_end": unit.get("guidance_end", unit.get("guidance", 1.0))})
            continue
        mode = unit.get("control_mode")
        if mode is None and unit.get("guessmode") is not None:  # API v1 clients
            mode = "ControlNet is more important" if unit.get("guessmode") else "Balanced"
        end = unit.get("guidance_end", unit.get("guidance", 1.0))
        native = {
            "model": str(model), "image": image if isinstance(image, str) else None,
            "mask": mask if isinstance(mask, str) else None, "preprocessor": module,
            "preprocessor_params": {"resolution": _num(unit.get("processor_res")),
                                    "threshold_a": _num(unit.get("threshold_a")),
                                    "threshold_b": _num(unit.get("threshold_b"))},
            "weight": unit.get("weight", 1.0),
            "guidance_start": unit.get("guidance_start", 0.0), "guidance_end": end,
            "control_mode": _lookup(CONTROL_MODE_NAMES, mode, "Balanced", f"{where}.control_mode"),
            "resize_mode": _lookup(RESIZE_MODE_NAMES, unit.get("resize_mode"), "Crop and Resize",
                                   f"{where}.resize_mode"),
            "pixel_perfect": bool(unit.get("pixel_perfect", False)),
            "hires": _lookup(HIRES_NAMES, unit.get("hr_option"), "both", f"{where}.hr_option"),
            "save_detected_map": bool(unit.get("save_detected_map", True)),
        }
        if unit.get("union_control_type") not in (None, ""):
            native["union_control_type"] = unit["union_control_type"]
        units.append(native)
    return units


def scripts_entry() -> str:
    """The name webuiapi and openOutpaint look for in ``/sdapi/v1/scripts``."""
    return "controlnet"
