"""What the flow-model test modules (Flux.1, SD 3, the DiT families, the editing models, their
ControlNets) share: a model store in the layout make_settings reads, a live server on it, a LoRA
for a tiny transformer, reference images, and a finished job's pixels."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .conftest import LiveServer, make_settings

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # the LoRA targets most tiny transformers share


def new_store(tmp_path_factory, name: str) -> Path:
    """An empty store: models/, loras/ and upscalers/ folders and an empty labels file."""
    root = tmp_path_factory.mktemp(name)
    for folder in ("models", "loras", "upscalers"):
        (root / folder).mkdir()
    (root / "labels.json").write_text("{}")
    return root


def serve(store: Path, tmp_path_factory, work: str, default_model: str, **settings):
    """A LiveServer on ``store`` (its work folder a new ``work`` temp dir), for a module-scoped
    fixture to ``yield from``."""
    with LiveServer(make_settings(store, tmp_path_factory.mktemp(work), default_model=default_model,
                                  **settings)) as s:
        yield s


def save_lora(pipe, targets, path: Path, seed: int = 5) -> Path:
    """A diffusers-format LoRA (PEFT keys under ``transformer.``) on ``pipe``'s transformer, as
    diffusers' trainers write it; its B matrices random (PEFT starts them at zero: no effect)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    transformer = pipe.transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(str(path.parent), transformer_lora_layers=get_peft_model_state_dict(transformer),
                                 weight_name=path.name)
    return path


def px(r) -> np.ndarray:
    """A finished job's image, RGB as int16 (differences do not wrap)."""
    assert r["state"] == "done", r
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r["image"]))).convert("RGB")).astype(np.int16)


def assert_equals_diffusers(ours: np.ndarray, ref: np.ndarray) -> None:
    """A job's pixels (``px``) are a bare diffusers pipeline's image (its float output): within
    2/255 anywhere and 0.5/255 on average, what float rounding leaves."""
    ref = np.rint(ref * 255).astype(np.int16)
    assert np.abs(ours - ref).max() <= 2 and np.abs(ours - ref).mean() < 0.5


def b64_png(img: np.ndarray | Image.Image) -> str:
    im = img if isinstance(img, Image.Image) else Image.fromarray(img.astype(np.uint8))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def pattern(w: int, h: int, seed: int) -> np.ndarray:
    """A reference image with structure (smooth gradients plus noise), the same for a seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    return np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


def run_posted(server, path: str, body: dict) -> dict:
    """POSTs a job to ``path`` (/edit, /img2img) and waits for its end."""
    r = server.client.post(path, json=body)
    assert r.status_code == 200, r.text
    return server.wait(r.json()["job_id"])


def queued_count(server) -> int:
    return len(server.client.get("/queue").json()["jobs"])


class Recorder:
    """An engine observer that keeps what a run reported: each step's (step, total) and each
    preview, decoded."""

    def __init__(self):
        self.steps: list[tuple[int, int]] = []
        self.previews: list[np.ndarray] = []

    def step(self, phase, step, total):
        self.steps.append((step, total))

    def preview(self, jpeg, step, total):
        self.previews.append(np.asarray(Image.open(io.BytesIO(jpeg))).astype(np.int16))


def step_totals(server, kind: str, body: dict) -> set[int]:
    """The step counts a ``kind`` job (txt2img, img2img, edit) reported, run by the server's engine."""
    from diffusionapi.jobs.resolve import resolve_job

    job = resolve_job(kind, body, server.app.state.registry, server.settings)
    seen = Recorder()
    server.engine.generate(job.plan, lambda p, v: None, lambda: False, seen)
    return {total for _, total in seen.steps}


def approx_previews(server, body: dict) -> list[np.ndarray]:
    """The approximate previews (one every step) of a txt2img job, run by the server's engine."""
    from diffusionapi.engine.plan import PreviewPlan
    from diffusionapi.jobs.resolve import resolve_request
    from diffusionapi.schemas import Txt2ImgRequest

    plan = resolve_request(Txt2ImgRequest(**body), server.app.state.registry, server.settings)
    plan.preview = PreviewPlan("approx", 1)
    seen = Recorder()
    server.engine.generate(plan, lambda p, v: None, lambda: False, seen)
    return seen.previews


FLUX2_SHARPENED = ("to_q", "to_k", "add_q", "add_k", "to_out", "to_add_out", "modulation")


def sharpen(pipe, names=FLUX2_SHARPENED, factor: float = 4.0):
    """``pipe`` with its transformer's matrices whose names hold one of ``names`` scaled by
    ``factor``. At random init a tiny Flux.2's references and guidance move its image by well under
    1/255 (a comparison with diffusers within 2/255 could not tell them apart); scaled, by more."""
    import torch

    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if p.ndim > 1 and any(k in name for k in names):
                p.mul_(factor)
    return pipe
