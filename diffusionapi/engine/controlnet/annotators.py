"""The networked preprocessors: annotator networks loaded from ``stable_diffusion/annotators/``.

Each network is built here from its published architecture, sized from the file's own tensors
(so a full-size file and a tiny test one load the same way), and loaded with
``torch.load(weights_only=True)``; depth models are transformers folders loaded from the local
path only. Nothing is downloaded: a file that is not in the folder is a 422 at submit
(``preprocessors.why_not_runnable``).

- HED (``ControlNetHED.pth``, lllyasviel's Apache-2.0 re-implementation of HED): five VGG-style
  blocks, each with a 1x1 side projection; the edge map is the sigmoid of the projections' mean
  at full size. ``softedge_hed`` is that map, ``scribble_hed`` thins it (directional non-maximum
  suppression), blurs and binarises it.
- Line art (``sk_model.pth`` / ``sk_model2.pth``, the "informative drawings" generator: 7x7 stem,
  two stride-2 convolutions, residual blocks, two transposed convolutions, 7x7 head, sigmoid;
  instance norm without parameters). It draws dark lines on white; the map is inverted (white lines
  on black) as the extension inverts it.
- Anime line art (``netG.pth``, pix2pix's U-Net generator: nested stride-2 levels with skip
  concatenation, instance norm without parameters, tanh), fed in [-1, 1] at a multiple of its
  total downscale; inverted like the other line art.
- OpenPose body (``body_pose_model.pth``): ``openpose.py``.
- Depth (``depth_anything`` / ``depth_midas``): a transformers depth-estimation folder
  (``config.json``, weights, ``preprocessor_config.json``: Depth Anything v1/v2, DPT); its
  relative inverse depth, normalised to 0-255 (near is white), as the extension's depth maps are.

Models are cached per file version and device (a few at most).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .imageops import PreprocessorError, hwc3, resize_short_side

_CACHE: "OrderedDict[tuple, object]" = OrderedDict()
_CACHE_SIZE = 3
_LOCK = threading.Lock()


def _device(device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    from ..pipelines import pick_device

    return pick_device(device or "cpu")


def _state_dict(path: Path) -> dict:
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}


def _cached(kind: str, path: Path, device: torch.device, build):
    """The model of ``path`` on ``device``, built once per file version (``build(path)`` -> module)."""
    try:
        stamp = path.stat().st_mtime_ns
    except OSError as e:
        raise PreprocessorError(f"annotator {path.name}: {e.strerror or e}") from None
    key = (kind, str(path), stamp, str(device))
    with _LOCK:
        model = _CACHE.get(key)
        if model is not None:
            _CACHE.move_to_end(key)
            return model
        try:
            model = build(path)
        except PreprocessorError:
            raise
        except Exception as e:  # noqa: BLE001 - a file that is not what its name says: name it
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PreprocessorError(f"annotator {path.name} could not be loaded: {first}") from e
        model = model.to(device).eval()
        _CACHE[key] = model
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
        return model


def _pad_to(img: np.ndarray, multiple: int) -> tuple[np.ndarray, int, int]:
    """``img`` edge-padded to a multiple of ``multiple`` on both sides; (padded, h, w) to crop back."""
    h, w = img.shape[:2]
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="edge")
    return img, h, w


def _to_tensor(img: np.ndarray, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.float32)).div(scale).permute(2, 0, 1)[None].to(device)


# ---------------------------------------------------------------------------- HED

class _HEDBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(layers)])
        self.projection = nn.Conv2d(cout, 1, 1)

    def forward(self, h, down: bool):
        if down:
            h = F.max_pool2d(h, kernel_size=2, stride=2)
        for conv in self.convs:
            h = F.relu(conv(h))
        return h, self.projection(h)


class HED(nn.Module):
    """HED's five blocks (layers and widths read from the state dict)."""

    def __init__(self, sd: dict):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.n = 0
        while f"block{self.n + 1}.projection.weight" in sd:
            n = self.n + 1
            layers = sum(1 for k in sd if k.startswith(f"block{n}.convs.") and k.endswith(".weight"))
            cout, cin = sd[f"block{n}.convs.0.weight"].shape[:2]
            setattr(self, f"block{n}", _HEDBlock(cin, cout, layers))
            self.n = n
        if self.n == 0:
            raise ValueError("no HED blocks (block1.projection.weight) in the file")

    def forward(self, x):
        h, sides = x - self.norm, []
        for n in range(1, self.n + 1):
            h, side = getattr(self, f"block{n}")(h, down=n > 1)
            sides.append(side)
        return sides


def _load_hed(path: Path) -> nn.Module:
    sd = _state_dict(path)
    model = HED(sd)
    model.load_state_dict(sd, strict=True)
    return model


def _nms(x: np.ndarray, threshold: float, sigma: float) -> np.ndarray:
    """Thin soft edges: keep a pixel that is the maximum along one of the four directions (of the
    blurred map) and above ``threshold``."""
    import cv2

    x = cv2.GaussianBlur(x.astype(np.float32), (0, 0), sigma)
    kernels = [np.array(k, np.uint8) for k in ([[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
                                               [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])]
    y = np.zeros_like(x)
    for k in kernels:
        np.putmask(y, cv2.dilate(x, kernel=k) == x, x)
    out = np.zeros(y.shape, np.uint8)
    out[y > threshold] = 255
    return out


def hed_edges(img: np.ndarray, folder: Path, device) -> np.ndarray:
    """The soft edge map (H, W) uint8 of an RGB image at its own size."""
    import cv2

    dev = _device(device)
    model = _cached("hed", folder / "ControlNetHED.pth", dev, _load_hed)
    h, w = img.shape[:2]
    with torch.inference_mode():
        sides = model(_to_tensor(img, dev))
    maps = [cv2.resize(s[0, 0].float().cpu().numpy(), (w, h), interpolation=cv2.INTER_LINEAR) for s in sides]
    edge = 0.5 * (1.0 + np.tanh(0.5 * np.mean(np.stack(maps, axis=2), axis=2)))  # the sigmoid, without overflow
    return (edge * 255.0).clip(0, 255).astype(np.uint8)


def softedge_hed(img, res, a, b, mask, folder, device):
    return hwc3(hed_edges(resize_short_side(img, res), folder, device))


def scribble_hed(img, res, a, b, mask, folder, device):
    import cv2

    edges = _nms(hed_edges(resize_short_side(img, res), folder, device), 127, 3.0)
    edges = cv2.GaussianBlur(edges, (0, 0), 3.0)
    return hwc3(np.where(edges > 4, 255, 0).astype(np.uint8))


# ---------------------------------------------------------------------------- line art

class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv_block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c),
                                        nn.ReLU(inplace=True), nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3),
                                        nn.InstanceNorm2d(c))

    def forward(self, x):
        return x + self.conv_block(x)


class LineartGenerator(nn.Module):
    """The informative-drawings generator (widths and residual blocks read from the state dict)."""

    def __init__(self, sd: dict):
        super().__init__()
        ngf, cin = sd["model0.1.weight"].shape[:2]
        cout = sd["model4.1.weight"].shape[0]
        blocks = sum(1 for k in sd if k.startswith("model2.") and k.endswith(".conv_block.1.weight"))
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(cin, ngf, 7), nn.InstanceNorm2d(ngf),
                                    nn.ReLU(inplace=True))
        self.model1 = nn.Sequential(nn.Conv2d(ngf, ngf * 2, 3, stride=2, padding=1), nn.InstanceNorm2d(ngf * 2),
                                    nn.ReLU(inplace=True), nn.Conv2d(ngf * 2, ngf * 4, 3, stride=2, padding=1),
                                    nn.InstanceNorm2d(ngf * 4), nn.ReLU(inplace=True))
        self.model2 = nn.Sequential(*[_Residual(ngf * 4) for _ in range(blocks)])
        self.model3 = nn.Sequential(
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(ngf * 2),
            nn.ReLU(inplace=True), nn.ConvTranspose2d(ngf * 2, ngf, 3, stride=2, padding=1, output_padding=1),
            nn.InstanceNorm2d(ngf), nn.ReLU(inplace=True))
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(ngf, cout, 7), nn.Sigmoid())

    def forward(self, x):
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))


def _load_lineart(path: Path) -> nn.Module:
    sd = _state_dict(path)
    model = LineartGenerator(sd)
    model.load_state_dict(sd, strict=True)
    return model


def _lineart(img, res, folder: Path, file: str, device) -> np.ndarray:
    dev = _device(device)
    model = _cached("lineart", folder / file, dev, _load_lineart)
    padded, h, w = _pad_to(resize_short_side(img, res), 8)
    with torch.inference_mode():
        line = model(_to_tensor(padded, dev, 255.0))[0, 0].float().cpu().numpy()[:h, :w]
    drawn = (line * 255.0).clip(0, 255).astype(np.uint8)
    return hwc3(255 - drawn)  # the generator draws dark lines on white; the map is white on black


def lineart_realistic(img, res, a, b, mask, folder, device):
    return _lineart(img, res, folder, "sk_model.pth", device)


def lineart_coarse(img, res, a, b, mask, folder, device):
    return _lineart(img, res, folder, "sk_model2.pth", device)


# ---------------------------------------------------------------------------- anime line art

class _UnetSkipBlock(nn.Module):
    """One level of pix2pix's U-Net generator (the anime line-art network, ``netG.pth``): down
    (leaky ReLU, stride-2 4x4 conv, instance norm), the inner level, up (ReLU, transposed conv,
    instance norm); its input is concatenated to its output. Widths are read from the state dict."""

    def __init__(self, sd: dict, prefix: str, outermost: bool = False):
        super().__init__()
        self.outermost = outermost

        def conv(key, transposed=False):
            w = sd[f"{key}.weight"]
            cls = nn.ConvTranspose2d if transposed else nn.Conv2d
            cin, cout = (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])
            return cls(cin, cout, 4, stride=2, padding=1, bias=f"{key}.bias" in sd), cout

        if outermost:      # down conv, inner level, ReLU, up conv, tanh
            down, _ = conv(f"{prefix}.0")
            up, _ = conv(f"{prefix}.3", transposed=True)
            layers = [down, _UnetSkipBlock(sd, f"{prefix}.1.model"), nn.ReLU(True), up, nn.Tanh()]
        elif f"{prefix}.5.weight" in sd:  # a middle level
            down, c = conv(f"{prefix}.1")
            up, cu = conv(f"{prefix}.5", transposed=True)
            # (in place, as pix2pix has it: the skip connection carries the leaky-ReLU'd input)
            layers = [nn.LeakyReLU(0.2, True), down, nn.InstanceNorm2d(c), _UnetSkipBlock(sd, f"{prefix}.3.model"),
                      nn.ReLU(True), up, nn.InstanceNorm2d(cu)]
        else:              # the innermost level
            down, _ = conv(f"{prefix}.1")
            up, cu = conv(f"{prefix}.3", transposed=True)
            layers = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True), up, nn.InstanceNorm2d(cu)]
        self.model = nn.Sequential(*layers)

    @property
    def depth(self) -> int:
        inner = next((m for m in self.model if isinstance(m, _UnetSkipBlock)), None)
        return 1 + (inner.depth if inner is not None else 0)

    def forward(self, x):
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


class AnimeLineartGenerator(nn.Module):
    def __init__(self, sd: dict):
        super().__init__()
        self.model = _UnetSkipBlock(sd, "model.model", outermost=True)

    def forward(self, x):
        return self.model(x)


def _load_anime(path: Path) -> nn.Module:
    sd = _state_dict(path)
    model = AnimeLineartGenerator(sd)
    model.load_state_dict(sd, strict=True)
    return model


def lineart_anime(img, res, a, b, mask, folder, device):
    """Resized up to a multiple of the U-Net's total downscale (256 for the published 8 levels),
    fed in [-1, 1]; the drawing (dark on white) back at the input's size, inverted."""
    import cv2

    dev = _device(device)
    model = _cached("lineart_anime", folder / "netG.pth", dev, _load_anime)
    img = resize_short_side(img, res)
    h, w = img.shape[:2]
    m = 2 ** model.model.depth
    hn, wn = m * int(np.ceil(h / m)), m * int(np.ceil(w / m))
    feed = cv2.resize(img, (wn, hn), interpolation=cv2.INTER_CUBIC)
    with torch.inference_mode():
        line = model(_to_tensor(feed, dev, 127.5) - 1.0)[0, 0].float().cpu().numpy() * 127.5 + 127.5
    line = cv2.resize(line, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)
    return hwc3(255 - line)


# ---------------------------------------------------------------------------- depth

def _load_depth(folder: Path):
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    model = AutoModelForDepthEstimation.from_pretrained(str(folder), local_files_only=True).float()
    processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    return _DepthModel(model, processor)


class _DepthModel:
    def __init__(self, model, processor):
        self.model, self.processor = model, processor

    def to(self, device):
        self.model = self.model.to(device)
        return self

    def eval(self):
        self.model.eval()
        return self


def depth(img: np.ndarray, res, folder: Path, device) -> np.ndarray:
    """Relative inverse depth of a transformers depth model, normalised to 0-255 (near = white)."""
    dev = _device(device)
    m = _cached("depth", folder, dev, _load_depth)
    img = resize_short_side(img, res)
    h, w = img.shape[:2]
    inputs = m.processor(images=img, return_tensors="pt")
    with torch.inference_mode():
        pred = m.model(pixel_values=inputs["pixel_values"].to(dev, torch.float32)).predicted_depth
    pred = F.interpolate(pred.reshape(1, 1, *pred.shape[-2:]).float(), size=(h, w), mode="bicubic",
                         align_corners=False)[0, 0].cpu().numpy()
    pred = pred - pred.min()
    top = pred.max()
    pred = pred / top if top > 0 else pred
    return hwc3((pred * 255.0).clip(0, 255).astype(np.uint8))


def depth_anything(img, res, a, b, mask, folder, device):
    return depth(img, res, folder / "depth-anything", device)


def depth_midas(img, res, a, b, mask, folder, device):
    return depth(img, res, folder / "dpt-hybrid-midas", device)


def openpose_with_pose(img: np.ndarray, res: int, folder: Path, device) -> tuple[np.ndarray, dict]:
    """(the pose map, its OpenPose JSON) of the body model in ``body_pose_model.pth`` (openpose.py)."""
    from .openpose import build_body_model, detect_body

    dev = _device(device)
    model = _cached("openpose", Path(folder) / "body_pose_model.pth", dev, lambda p: build_body_model(_state_dict(p)))
    return detect_body(img, res, model, dev)


def openpose(img, res, a, b, mask, folder, device):
    return openpose_with_pose(img, res, folder, device)[0]


NETS = {"openpose": openpose, "softedge_hed": softedge_hed, "scribble_hed": scribble_hed, "lineart_realistic": lineart_realistic,
        "lineart_coarse": lineart_coarse, "lineart_anime": lineart_anime, "depth_anything": depth_anything, "depth_midas": depth_midas}


def run(name: str, img: np.ndarray, res: int, a: float, b: float, mask, folder: Path, device) -> np.ndarray:
    return NETS[name](img, res, a, b, mask, Path(folder), device)
