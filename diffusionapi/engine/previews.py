"""Preview images of a job in progress: latents -> small RGB picture -> JPEG.

Two methods:

* ``approx``: a linear map of the 4 latent channels to RGB (plus a bias), applied to the
  sampler's current denoised estimate (x0). SD 1.5 and SDXL have published factors, fitted by
  least squares between latents and their decoded images (Kevin Turner's for SD 1.5, the
  later SDXL fit with bias); a model whose VAE differs can carry its own fit in
  ``<vae-approx dir>/<model name>.json`` (``{"factors": [[r, g, b] x channels], "bias": [r, g, b]}``,
  made with :func:`fit_latent_rgb`). Cost: one tiny matmul at latent resolution.
* ``taesd``: the "tiny autoencoder" decoder (madebyollin's TAESD / TAESDXL, and TAESD3 / TAEF1
  with 16 latent channels), installed in ``<vae-approx dir>/`` as a diffusers ``AutoencoderTiny``
  folder (``taesd/``, ``taesdxl/``, ``taesd3/``, ``taef1/``) or the original decoder file
  (``taesd_decoder.pth`` / ``.safetensors``, ``taesdxl_decoder.*``, ``taesd3_decoder.*``,
  ``taef1_decoder.*``). It decodes the same scaled (and, for the 16-channel VAEs, shifted) latents
  the sampler works on, at full resolution: the tiny decoders were trained on those, as ComfyUI's
  previews feed them (engine/vae_io.py keeps every family's latents unpacked, [b, C, h, w]).

The sampling thread only does the tensor part (on the GPU when there is one) and starts an
asynchronous copy to the CPU; :class:`PreviewSink` waits for that copy and encodes the JPEG on
its own thread, so previews never make the sampler wait for the GPU or for the encoder.
"""
from __future__ import annotations

import functools
import io
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from PIL import Image

if TYPE_CHECKING:
    import torch
# torch is imported where a preview is made, not here: an API node imports this module (through
# resolve's checks) and must not load torch (hundreds of MB and long garbage-collection pauses).

log = logging.getLogger(__name__)

PREVIEW_METHODS = ("approx", "taesd")
PREVIEW_MAX_SIDE = 256   # previews are thumbnails: the longer side, in pixels
PREVIEW_JPEG_QUALITY = 75


@dataclass(frozen=True)
class LatentRGB:
    """``rgb = latents(C) @ factors(C x 3) + bias``, giving values in [-1, 1]."""
    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def to_json(self) -> str:
        return json.dumps({"factors": [list(r) for r in self.factors], "bias": list(self.bias)})

    @classmethod
    def from_json(cls, text: str) -> "LatentRGB":
        data = json.loads(text)
        factors = tuple(tuple(float(v) for v in row) for row in data["factors"])
        if not factors or any(len(row) != 3 for row in factors):
            raise ValueError("factors must be a list of [r, g, b] rows, one per latent channel")
        bias = tuple(float(v) for v in data.get("bias", (0.0, 0.0, 0.0)))
        if len(bias) != 3:
            raise ValueError("bias must be [r, g, b]")
        return cls(factors, bias)  # type: ignore[arg-type]


# Published least-squares fits for the scaled latents (x0) of each family's VAE.
SD15_LATENT_RGB = LatentRGB(((0.3512, 0.2297, 0.3227),
                             (0.3250, 0.4974, 0.2350),
                             (-0.2829, 0.1762, 0.2721),
                             (-0.2120, -0.2616, -0.7177)))
SDXL_LATENT_RGB = LatentRGB(((0.3651, 0.4232, 0.4341),
                             (-0.2533, -0.0042, 0.1068),
                             (0.1076, 0.1111, -0.0362),
                             (-0.3165, -0.2492, -0.2188)),
                            (0.1084, -0.0175, -0.0011))
FAMILY_LATENT_RGB = {"sd15": SD15_LATENT_RGB, "sdxl": SDXL_LATENT_RGB, "sdxl-refiner": SDXL_LATENT_RGB}
# The tiny decoders' own names, by preview key (families/: SD 2 previews as SD 1.5; Flux.1 Kontext,
# Chroma and Z-Image use Flux.1's VAE and preview as flux1).
FAMILY_TAESD = {"sd15": "taesd", "sdxl": "taesdxl", "sdxl-refiner": "taesdxl", "sd3": "taesd3", "flux1": "taef1"}


def latent_rgb_for(family: str, model_name: str | None, vae_approx_dir: Path | None) -> LatentRGB:
    """The model's own fit when ``<dir>/<model>.json`` exists, else its family's published one."""
    if model_name and vae_approx_dir is not None:
        p = Path(vae_approx_dir) / f"{model_name}.json"
        if p.is_file():
            try:
                return LatentRGB.from_json(p.read_text())
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("ignoring %s (%s); using the %s factors", p, e, family)
    return FAMILY_LATENT_RGB.get(preview_key(family), SD15_LATENT_RGB)


def preview_key(family: str) -> str:
    """Which family's preview factors / TAESD a family uses (SD 2 shares SD 1.5's VAE)."""
    from ..families import BY_ID

    fam = BY_ID.get(str(family))
    return fam.preview if fam is not None else str(family)


def approx_rgb(latents: torch.Tensor, rgb: LatentRGB) -> torch.Tensor:
    """[1, C, h, w] latents -> [h, w, 3] uint8, computed where the latents are (no sync)."""
    import torch

    x = latents[0].float()
    f, b = _factor_tensors(rgb, x.device)
    out = torch.einsum("chw,cr->hwr", x, f) + b
    return ((out + 1) * 127.5).clamp(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=16)
def _factor_tensors(rgb: LatentRGB, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors and bias as tensors on ``device``, made once: building them from Python numbers
    at every step would be a blocking host-to-GPU copy, a sync that stalls the sampler's queue."""
    import torch

    return (torch.tensor(rgb.factors, dtype=torch.float32, device=device),  # C x 3
            torch.tensor(rgb.bias, dtype=torch.float32, device=device))


def fit_latent_rgb(decode: Callable[[torch.Tensor], torch.Tensor], channels: int = 4, size: int = 16,
                   samples: int = 8, seed: int = 0) -> LatentRGB:
    """Least-squares latent -> RGB factors for a VAE, as the published ones were made.

    ``decode`` maps scaled latents [n, C, h, w] to images [n, 3, 8h, 8w] in [-1, 1]; each
    decoded image is averaged over the 8x8 patch each latent pixel covers."""
    import torch

    g = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, channels, size, size, generator=g)
    with torch.no_grad():
        img = decode(z).float()
    img = torch.nn.functional.avg_pool2d(img, img.shape[-1] // size)
    x = z.permute(0, 2, 3, 1).reshape(-1, channels)
    x = torch.cat([x, torch.ones(len(x), 1)], 1)
    y = img.permute(0, 2, 3, 1).reshape(-1, 3)
    sol = torch.linalg.lstsq(x.double(), y.double()).solution.float()
    factors = tuple(tuple(float(v) for v in row) for row in sol[:channels])
    return LatentRGB(factors, tuple(float(v) for v in sol[channels]))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- TAESD

def find_taesd(vae_approx_dir: Path | None, family: str) -> Path | None:
    """The installed TAESD decoder for a family: a diffusers folder, else an original file."""
    if vae_approx_dir is None:
        return None
    name = FAMILY_TAESD.get(preview_key(family))
    if name is None:
        return None
    d = Path(vae_approx_dir)
    folder = d / name
    if (folder / "config.json").is_file():
        return folder
    for ext in (".safetensors", ".pth", ".pt"):
        f = d / f"{name}_decoder{ext}"
        if f.is_file():
            return f
    return None


def load_taesd(path: Path, device, dtype: torch.dtype | None = None):
    """An ``AutoencoderTiny`` from a diffusers folder, or one built around an original decoder file.

    The original file is a ``nn.Sequential`` whose index 0 is a parameter-free clamp; diffusers'
    ``DecoderTiny`` applies that clamp in ``forward`` and numbers its layers from the first conv,
    so original key ``N.rest`` is ``decoder.layers.(N-1).rest``."""
    import torch
    from diffusers import AutoencoderTiny

    dtype = dtype or torch.float32

    path = Path(path)
    if path.is_dir():
        vae = AutoencoderTiny.from_pretrained(path, torch_dtype=dtype)
    else:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        mapped = {}
        for k, v in sd.items():
            idx, _, rest = k.partition(".")
            if not idx.isdigit() or int(idx) < 1:
                raise ValueError(f"{path.name}: unexpected key {k!r} for a TAESD decoder")
            mapped[f"layers.{int(idx) - 1}.{rest}"] = v
        first = mapped.get("layers.0.weight")
        if first is None or first.ndim != 4:
            raise ValueError(f"{path.name} is not a TAESD decoder: no first convolution")
        # TAESD's published architecture is diffusers' default; TAESD3 / TAEF1 differ only in the
        # latent channels, which the first convolution's input says.
        vae = AutoencoderTiny(latent_channels=int(first.shape[1]))
        missing, unexpected = vae.decoder.load_state_dict(mapped, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path.name} is not a TAESD decoder: missing {missing[:3]}, unexpected {unexpected[:3]}")
        vae.encoder = None  # only the decoder is needed; the random encoder would waste memory
        vae = vae.to(dtype)
    return vae.to(device).eval()


def taesd_rgb(decoder, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents [1, C, h, w] -> [8h, 8w, 3] uint8 (TAESD works on the sampler's latents as is)."""
    import torch

    p = next(decoder.parameters())
    with torch.inference_mode():
        img = decoder.decode(latents.to(p.device, p.dtype), return_dict=False)[0]  # [-1, 1]
    return ((img[0].float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0)


# ---------------------------------------------------------------------------- JPEG

def preview_size(width: int, height: int, max_side: int = PREVIEW_MAX_SIDE) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_jpeg(rgb: "torch.Tensor | Image.Image", size: tuple[int, int] | None = None,
                quality: int = PREVIEW_JPEG_QUALITY) -> bytes:
    """[h, w, 3] uint8 (CPU) or a PIL image -> JPEG bytes, resized to ``size`` when given."""
    img = rgb if isinstance(rgb, Image.Image) else Image.fromarray(rgb.numpy())
    if size is not None and img.size != size:
        img = img.resize(size, Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ---------------------------------------------------------------------------- the per-job sink

@dataclass
class Preview:
    jpeg: bytes
    step: int
    total: int
    phase: str


class PreviewSink:
    """Takes denoised latents from the sampling thread every ``every`` steps and publishes JPEGs.

    ``offer`` costs the sampler a tiny kernel and an asynchronous copy; the wait for the copy and
    the JPEG encoding happen on this sink's thread. When the encoder falls behind, only the
    newest pending preview is kept (a preview is a view of "now", older ones are worthless).
    The thread starts with the first preview and ends after ``close`` or when idle for
    ``IDLE_SEC`` (a job that fails mid-way leaves nothing running).
    """
    IDLE_SEC = 2.0

    def __init__(self, method: str, every: int, to_rgb: Callable[[torch.Tensor], torch.Tensor],
                 size: tuple[int, int], publish: Callable[[Preview], None]):
        self.method = method
        self.every = max(1, int(every))
        self.to_rgb = to_rgb
        self.size = size
        self.publish = publish
        self._pending: tuple | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def wants(self, step: int, total: int) -> bool:
        return step % self.every == 0 or step == total

    def offer(self, denoised: torch.Tensor, step: int, total: int, phase: str) -> None:
        if not self.wants(step, total):
            return
        rgb = self.to_rgb(denoised)
        event = None
        if rgb.is_cuda:
            import torch

            host = torch.empty(rgb.shape, dtype=rgb.dtype, pin_memory=True)
            host.copy_(rgb, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            rgb = host
        elif rgb.device.type != "cpu":
            rgb = rgb.cpu()  # mps: no events to wait on; the copy is small
        else:
            rgb = rgb.clone()  # the sampler may reuse the tensor's storage
        with self._cond:
            self._pending = (rgb, event, step, total, phase)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="diffusionapi-previews", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._pending is None and not self._closed:
                    self._cond.wait(self.IDLE_SEC)
                if self._pending is None:
                    self._thread = None  # closed, or idle: a later offer starts a new thread
                    return
                rgb, event, step, total, phase = self._pending
                self._pending = None
            try:
                if event is not None:
                    event.synchronize()  # waits on this thread only
                self.publish(Preview(encode_jpeg(rgb, self.size), step, total, phase))
            except Exception:  # noqa: BLE001 - a preview must never fail a job
                log.exception("preview encoding failed")

    def close(self, timeout: float = 10) -> None:
        """Publish what is pending, then stop; called when the job's sampling is over."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify()
        if thread is not None:
            thread.join(timeout)
