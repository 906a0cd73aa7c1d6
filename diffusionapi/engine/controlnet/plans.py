"""What a job's ControlNet and IP-Adapter units are, as plain data (no torch: API nodes build these)."""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from . import preprocessors
from .files import ControlNetEntry

CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
HIRES_OPTIONS = ("both", "low", "high")


@dataclass(frozen=True)
class ControlUnitPlan:
    entry: ControlNetEntry
    module: str                      # preprocessor name (preprocessors.PREPROCESSORS)
    image: Image.Image | None        # None: the img2img init image
    mask: Image.Image | None = None  # white = masked (inpaint modules); None: the img2img mask, if any
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = "Balanced"
    resize_mode: str = "Crop and Resize"
    processor_res: float | None = None
    threshold_a: float | None = None
    threshold_b: float | None = None
    pixel_perfect: bool = False
    hires: str = "both"              # both | low | high: the passes of a hires job it guides
    save_detected_map: bool = False
    union_type: int | None = None    # union ControlNets: the control type's index (request.UNION_TYPES)

    def infotext(self) -> str:
        """The extension's serialisation ("Module: canny, Model: name [hash], Weight: 1.0, ...")."""
        p = preprocessors.PREPROCESSORS[self.module]
        res, a, b = p.params(self.processor_res, self.threshold_a, self.threshold_b)
        fields = [("Module", self.module), ("Model", self.entry.title), ("Weight", float(self.weight)),
                  ("Resize Mode", self.resize_mode), ("Processor Res", res if p.resolution else -1),
                  ("Threshold A", a if p.slider_1 else -1.0), ("Threshold B", b if p.slider_2 else -1.0),
                  ("Guidance Start", float(self.guidance_start)), ("Guidance End", float(self.guidance_end)),
                  ("Pixel Perfect", bool(self.pixel_perfect)), ("Control Mode", self.control_mode)]
        return ", ".join(f"{k}: {v}" for k, v in fields)


@dataclass(frozen=True)
class IPAdapterPlan:
    entry: object                  # ipadapter.IPAdapterEntry
    encoder: object                # ipadapter.EncoderEntry
    images: tuple                  # PIL images
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0

    def infotext(self) -> str:
        return (f"Model: {self.entry.name}, Weight: {float(self.weight)}, Guidance Start: "
                f"{float(self.guidance_start)}, Guidance End: {float(self.guidance_end)}")


def infotext_params(units, ip_adapters=()) -> dict:
    out = {f"ControlNet {i}": u.infotext() for i, u in enumerate(units)}
    out.update({f"IP-Adapter {i}": u.infotext() for i, u in enumerate(ip_adapters)})
    return out


