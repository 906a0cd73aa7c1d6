"""ControlNet preprocessors ("modules" in A1111's extension): an input image -> the control map.

The ones that need no weights run here, on NumPy/OpenCV (written from their published
descriptions, names and slider ranges as sd-webui-controlnet lists them, so A1111 clients find
the same ``module`` names and ``module_detail``). The ones that need a network are listed with
the annotator file they load from ``stable_diffusion/annotators/``: without it, asking for one is
a 422 that names that file; with it, those this server implements (``net``: the networks of
``annotators.py``, which imports torch only when one runs) run, the others are a 422 that says so.

Every function takes and returns an RGB ``uint8`` array (H, W, 3); the mask, when a module uses
one, is (H, W) ``uint8`` with 255 = masked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .imageops import PreprocessorError, hwc3, resize_short_side  # noqa: F401 - the callers' names


@dataclass(frozen=True)
class Slider:
    label: str
    value: float
    minimum: float
    maximum: float
    step: float | None = None

    def detail(self) -> dict:
        d = {"name": self.label, "value": self.value, "min": self.minimum, "max": self.maximum}
        if self.step is not None:
            d["step"] = self.step
        return d


RESOLUTION = Slider("Resolution", 512, 64, 2048, 8)


@dataclass(frozen=True)
class Preprocessor:
    name: str                   # the module name clients send ("canny")
    label: str                  # the extension's display name (its alias)
    tags: tuple[str, ...] = ()  # control types it belongs to
    resolution: Slider | None = None
    slider_1: Slider | None = None
    slider_2: Slider | None = None
    run: Callable | None = None  # run(image, resolution, a, b, mask) -> image
    needs: tuple[str, ...] = ()  # annotator files a networked module loads ("name/": a folder)
    net: str | None = None       # the network that runs it (annotators.NETS), when implemented
    source: str = "lllyasviel/Annotators"  # where its files are published
    uses_mask: bool = False      # the control map carries a mask (inpaint)
    unsupported: str | None = None  # why this server cannot run it (not a missing file)
    aliases: tuple[str, ...] = field(default=())

    @property
    def model_free(self) -> bool:
        return self.run is not None

    def sliders(self) -> list[dict]:
        return [s.detail() for s in (self.resolution, self.slider_1, self.slider_2) if s is not None]

    def params(self, resolution: float | None, a: float | None, b: float | None) -> tuple[int, float, float]:
        """A1111's rule: a value out of its slider's range (or -1 / None) means the default."""
        def pick(v, s: Slider | None, fallback):
            if s is None:
                return fallback
            if v is None or v < s.minimum or v > s.maximum:
                return s.value
            return v
        return int(pick(resolution, self.resolution, 512)), float(pick(a, self.slider_1, 0.0)), \
            float(pick(b, self.slider_2, 0.0))


def _gray(img: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


# ---------------------------------------------------------------------------- the modules

def _none(img, res, a, b, mask):
    return img


def _invert(img, res, a, b, mask):
    return 255 - img


def _canny(img, res, a, b, mask):
    import cv2

    img = resize_short_side(img, res)
    return hwc3(cv2.Canny(img, a, b))


def _threshold(img, res, a, b, mask):
    img = resize_short_side(img, res)
    return hwc3(np.where(_gray(img) > a, 255, 0).astype(np.uint8))


def _blur(img, res, a, b, mask):
    import cv2

    img = resize_short_side(img, res)
    return cv2.GaussianBlur(img, (0, 0), a)


def _tile_resample(img, res, a, b, mask):
    """Tile: the image shrunk by the down-sampling rate (the ControlNet adds the detail back)."""
    import cv2

    if a <= 1.0:
        return img
    h, w = img.shape[:2]
    return cv2.resize(img, (max(1, int(w / a)), max(1, int(h / a))), interpolation=cv2.INTER_AREA)


def _color_grid(img, res, a, b, mask):
    """T2I colour adapter: the image averaged over a 64-pixel grid."""
    import cv2

    img = resize_short_side(img, res)
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(1, w // 64), max(1, h // 64)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def _shuffle(img, res, a, b, mask):
    """Content shuffle: the image warped by a smooth random flow field. Seeded (0), so the same
    input gives the same map (the extension draws a fresh field each time)."""
    import cv2

    img = resize_short_side(img, res)
    h, w = img.shape[:2]
    rng = np.random.default_rng(0)
    f = 256

    def field():
        noise = rng.uniform(0, 1, size=(h // f + 2, w // f + 2)).astype(np.float32)
        big = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)
        return big[f:f + h, f:f + w]

    x = (field() * float(w - 1)).astype(np.float32)
    y = (field() * float(h - 1)).astype(np.float32)
    return cv2.remap(img, x, y, cv2.INTER_CUBIC)


def _scribble_xdog(img, res, a, b, mask):
    """Scribble from an extended difference of Gaussians: where the wide blur exceeds the narrow
    one by more than the threshold (dark lines on a lighter surround) the map is white."""
    import cv2

    img = resize_short_side(img, res).astype(np.float32)
    g1 = cv2.GaussianBlur(img, (0, 0), 0.5)
    g2 = cv2.GaussianBlur(img, (0, 0), 5.0)
    dog = np.min(g2 - g1, axis=2)
    out = np.zeros(dog.shape, np.uint8)
    out[2 * dog > a] = 255
    return hwc3(out)


def _lineart_standard(img, res, a, b, mask):
    """Line art from a white background: how much darker each pixel is than its blurred
    surround, normalised by the median line strength."""
    import cv2

    img = resize_short_side(img, res).astype(np.float32)
    g = cv2.GaussianBlur(img, (0, 0), 6.0)
    intensity = np.min(g - img, axis=2).clip(0, 255)
    strong = intensity[intensity > 8]
    scale = max(16.0, float(np.median(strong))) if strong.size else 16.0
    return hwc3((intensity / scale * 127).clip(0, 255).astype(np.uint8))


def _inpaint(img, res, a, b, mask):
    """Inpainting ControlNets take the image with the masked part marked; the display map
    shows it black (the engine passes -1 there: engine/controlnet/units.py)."""
    if mask is None:
        return img
    out = img.copy()
    out[mask > 127] = 0
    return out


_C, _L = ("Canny",), ("Lineart",)
_BUILTIN = [
    Preprocessor("none", "none", ("Canny", "Depth", "Lineart", "Scribble", "Tile", "Inpaint", "Shuffle", "Normal",
                                  "OpenPose", "Segmentation", "SoftEdge", "MLSD", "T2I-Adapter", "IP-Adapter"),
                 run=_none),
    Preprocessor("invert", "invert (from white bg & black line)", ("Canny", "Lineart", "Scribble", "MLSD"), run=_invert),
    Preprocessor("canny", "canny", _C, RESOLUTION, Slider("Canny Low Threshold", 100, 1, 255, 1),
                 Slider("Canny High Threshold", 200, 1, 255, 1), run=_canny),
    Preprocessor("threshold", "threshold", ("Canny", "Scribble"), RESOLUTION,
                 Slider("Binarization Threshold", 127, 0, 255, 1), run=_threshold, aliases=("binary",)),
    Preprocessor("blur_gaussian", "blur_gaussian", ("Tile",), RESOLUTION, Slider("Sigma", 9.0, 0.01, 64.0, 0.01),
                 run=_blur, aliases=("blur",)),
    Preprocessor("tile_resample", "tile_resample", ("Tile",), None,
                 Slider("Down Sampling Rate", 1.0, 1.0, 8.0, 0.01), run=_tile_resample),
    Preprocessor("t2ia_color_grid", "t2ia_color_grid", ("T2I-Adapter",), RESOLUTION, run=_color_grid,
                 aliases=("color",)),
    Preprocessor("shuffle", "shuffle", ("Shuffle",), RESOLUTION, run=_shuffle),
    Preprocessor("scribble_xdog", "scribble_xdog", ("Scribble",), RESOLUTION, Slider("XDoG Threshold", 32, 1, 64, 1),
                 run=_scribble_xdog, aliases=("xdog",)),
    Preprocessor("lineart_standard", "lineart_standard (from white bg & black line)", _L, RESOLUTION,
                 run=_lineart_standard),
    Preprocessor("inpaint", "inpaint_global_harmonious", ("Inpaint",), run=_inpaint, uses_mask=True),
    Preprocessor("inpaint_only", "inpaint_only", ("Inpaint",), run=_inpaint, uses_mask=True),
]

# Modules that run a network: the files they load (lllyasviel/Annotators names, except the depth
# models, which are transformers folders), and the network of annotators.py that runs them.
_DEPTH_SRC = "a transformers depth-estimation folder: config.json, weights, preprocessor_config.json"
_NETWORKED = [
    ("depth_midas", "depth_midas", ("Depth",), ("dpt-hybrid-midas/",), "depth_midas",
     f"Intel/dpt-hybrid-midas, {_DEPTH_SRC}"),
    ("depth_zoe", "depth_zoe", ("Depth",), ("ZoeD_M12_N.pt",)),
    ("depth_leres", "depth_leres", ("Depth",), ("res101.pth",)),
    ("depth_anything", "depth_anything", ("Depth",), ("depth-anything/",), "depth_anything",
     f"LiheYoung/depth-anything-*-hf or depth-anything/Depth-Anything-V2-*-hf, {_DEPTH_SRC}"),
    ("normal_bae", "normal_bae", ("Normal",), ("scannet.pt",)),
    ("openpose", "openpose", ("OpenPose",), ("body_pose_model.pth",), "openpose"),
    ("openpose_face", "openpose_face", ("OpenPose",), ("body_pose_model.pth", "facenet.pth")),
    ("openpose_hand", "openpose_hand", ("OpenPose",), ("body_pose_model.pth", "hand_pose_model.pth")),
    ("openpose_full", "openpose_full", ("OpenPose",), ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")),
    ("dw_openpose_full", "dw_openpose_full", ("OpenPose",), ("yolox_l.onnx", "dw-ll_ucoco_384.onnx")),
    ("lineart_realistic", "lineart_realistic", _L, ("sk_model.pth",), "lineart_realistic"),
    ("lineart_coarse", "lineart_coarse", _L, ("sk_model2.pth",), "lineart_coarse"),
    ("lineart_anime", "lineart_anime", _L, ("netG.pth",), "lineart_anime"),
    ("softedge_hed", "softedge_hed", ("SoftEdge",), ("ControlNetHED.pth",), "softedge_hed"),
    ("softedge_pidinet", "softedge_pidinet", ("SoftEdge",), ("table5_pidinet.pth",)),
    ("scribble_hed", "scribble_hed", ("Scribble",), ("ControlNetHED.pth",), "scribble_hed"),
    ("scribble_pidinet", "scribble_pidinet", ("Scribble",), ("table5_pidinet.pth",)),
    ("mlsd", "mlsd", ("MLSD",), ("mlsd_large_512_fp32.pth",)),
    ("seg_ofade20k", "seg_ofade20k", ("Segmentation",), ("250_16_swin_l_oneformer_ade20k_160k.pth",)),
    ("seg_ufade20k", "seg_ufade20k", ("Segmentation",), ("upernet_global_small.pth",)),
    ("inpaint_only+lama", "inpaint_only+lama", ("Inpaint",), ("ControlNetLama.pth",)),
]
# Modules that are not an image transform at all: they change attention or feed an adapter.
_UNSUPPORTED = [
    ("reference_only", ("Reference",), "reference modules change the UNet's attention; not supported"),
    ("reference_adain", ("Reference",), "reference modules change the UNet's attention; not supported"),
    ("reference_adain+attn", ("Reference",), "reference modules change the UNet's attention; not supported"),
    ("ip-adapter_clip_sd15", ("IP-Adapter",), "an IP-Adapter module: use ip_adapters (A1111 units with this "
                                               "module are IP-Adapters)"),
    ("ip-adapter_clip_sdxl", ("IP-Adapter",), "an IP-Adapter module: use ip_adapters"),
    ("ip-adapter_clip_sdxl_plus_vith", ("IP-Adapter",), "an IP-Adapter module: use ip_adapters"),
    ("ip-adapter-auto", ("IP-Adapter",), "an IP-Adapter module: use ip_adapters"),
    ("clip_vision", ("Revision",), "CLIP-vision modules are not supported by this server"),
]

PREPROCESSORS: dict[str, Preprocessor] = {p.name: p for p in _BUILTIN}
for _name, _label, _tags, _files, *_how in _NETWORKED:
    PREPROCESSORS[_name] = Preprocessor(_name, _label, _tags, RESOLUTION, needs=_files,
                                        net=_how[0] if _how else None,
                                        source=_how[1] if len(_how) > 1 else "lllyasviel/Annotators")
for _name, _tags, _why in _UNSUPPORTED:
    PREPROCESSORS[_name] = Preprocessor(_name, _name, _tags, unsupported=_why)

_LOOKUP: dict[str, str] = {}
for _p in PREPROCESSORS.values():
    for _key in (_p.name, _p.label, *_p.aliases):
        _LOOKUP.setdefault(_key.casefold(), _p.name)
_LOOKUP["none"] = "none"


def find(name: str | None) -> Preprocessor | None:
    """A module by name, display label or alias, any case (None and "" mean "none")."""
    if name is None or not str(name).strip():
        return PREPROCESSORS["none"]
    key = _LOOKUP.get(str(name).strip().casefold())
    return PREPROCESSORS[key] if key else None


def why_not_runnable(p: Preprocessor, annotators_dir: Path) -> str | None:
    """None when ``p`` runs here; else the reason (naming the file to add, where that is it)."""
    if p.unsupported:
        return f"module {p.name!r}: {p.unsupported}"
    if p.run is not None:
        return None
    missing = [f for f in p.needs if not _installed(Path(annotators_dir) / f, folder=f.endswith("/"))]
    if missing:
        what = "folder" if all(f.endswith("/") for f in missing) else "file"
        return (f"module {p.name!r} needs the annotator {what}{'s' if len(missing) > 1 else ''} "
                f"{', '.join(missing)} in {annotators_dir}/ (from {p.source}); add "
                f"{'them' if len(missing) > 1 else 'it'}, or send a ready control map with module \"none\"")
    if p.net is None:
        return (f"module {p.name!r}: its annotator files are installed, but this server cannot run that network "
                "yet; send a ready control map with module \"none\"")
    return None


def _installed(path: Path, *, folder: bool) -> bool:
    return (path / "config.json").is_file() if folder else path.is_file()


def run(p: Preprocessor, image: np.ndarray, resolution: float | None = None, a: float | None = None,
        b: float | None = None, mask: np.ndarray | None = None, *, annotators: Path | None = None,
        device=None) -> np.ndarray:
    """The control map of ``image`` (RGB uint8); raises PreprocessorError if ``p`` cannot run.
    ``annotators``: the folder a networked module loads its files from; ``device``: where it runs
    (a torch device or a setting such as "cpu", "auto")."""
    res, a_, b_ = p.params(resolution, a, b)
    if p.run is not None:
        return np.ascontiguousarray(hwc3(p.run(hwc3(image), res, a_, b_, mask)))
    if p.net is None or annotators is None:
        raise PreprocessorError(f"module {p.name!r} cannot run here")
    from . import annotators as nets

    return np.ascontiguousarray(hwc3(nets.run(p.net, hwc3(image), res, a_, b_, mask, Path(annotators), device)))


def to_array(im: Image.Image) -> np.ndarray:
    return hwc3(np.asarray(im.convert("RGBA" if "A" in im.getbands() else "RGB")))


def mask_array(im: Image.Image | None, size: tuple[int, int] | None = None) -> np.ndarray | None:
    if im is None:
        return None
    if "A" in im.getbands() and im.mode != "LA":
        # a mask painted as transparency: the alpha marks it
        m = np.asarray(im.getchannel("A"))
        if m.min() == 255:
            m = np.asarray(im.convert("L"))
    else:
        m = np.asarray(im.convert("L"))
    if size is not None and (m.shape[1], m.shape[0]) != size:
        m = np.asarray(Image.fromarray(m).resize(size, Image.NEAREST))
    return np.where(m > 127, 255, 0).astype(np.uint8)



def pixel_perfect_resolution(image_hw: tuple[int, int], target_hw: tuple[int, int], resize_mode: str) -> int:
    """A1111's "pixel perfect": the preprocessor resolution at which the map needs no rescaling
    for the generation size (resize-and-fill fits inside; the other modes cover)."""
    raw_h, raw_w = image_hw
    k0, k1 = target_hw[0] / raw_h, target_hw[1] / raw_w
    k = min(k0, k1) if resize_mode == "Resize and Fill" else max(k0, k1)
    return int(round(k * min(raw_h, raw_w)))
