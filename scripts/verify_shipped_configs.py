#!/usr/bin/env python3
"""One-off check of the shipped single-file configs at full size (needs ~8 GB RAM for sd15,
~30 GB for sdxl; minutes). Builds the real architecture from `diffusionapi/configs/<family>`
with random fp16 weights, writes it as an original-layout checkpoint (tests/checkpoint_factory.py),
loads it back through the service's single-file path (shipped config, offline) and compares
every tensor.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/verify_shipped_configs.py sd15 [sdxl] [sdxl-refiner]
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def build(family: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffusionapi.engine.checkpoints import PACKAGED

    def cfg(part):
        return json.loads((PACKAGED / family / part / "config.json").read_text())

    torch.set_default_dtype(torch.float16)
    parts = {"unet": UNet2DConditionModel.from_config(cfg("unet")), "vae": AutoencoderKL.from_config(cfg("vae"))}
    if (PACKAGED / family / "text_encoder").exists():
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**cfg("text_encoder")))
    if (PACKAGED / family / "text_encoder_2").exists():
        parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**cfg("text_encoder_2")))
    torch.set_default_dtype(torch.float32)
    return type("Parts", (), {**parts, "text_encoder": parts.get("text_encoder"),
                              "text_encoder_2": parts.get("text_encoder_2")})()


def main(families) -> int:
    from diffusionapi.engine.checkpoints import load_single_file
    from diffusionapi.engine.pipelines import _check_no_meta, _pipeline_class
    from diffusionapi.families import detect_checkpoint_keys
    from diffusionapi.fileinfo import read_safetensors_header
    from diffusionapi.vocabulary import ModelEntry
    from tests.checkpoint_factory import save_original_checkpoint

    ok = True
    for family in families:
        t0 = time.time()
        torch.manual_seed(0)
        parts = build(family)
        path = Path(tempfile.mkdtemp()) / f"{family}.safetensors"
        save_original_checkpoint(parts, path, with_config=False)
        del parts  # rebuilt from the same seed below: SDXL does not fit in memory twice over
        detected = detect_checkpoint_keys(set(read_safetensors_header(path)) - {"__metadata__"}).family
        entry = ModelEntry(family, family, path, detected, "single-file")
        pipe = load_single_file(_pipeline_class(family), entry, torch.float16)
        _check_no_meta(pipe, entry)
        torch.manual_seed(0)
        parts = build(family)
        bad = 0
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            mine = getattr(parts, name, None)
            if mine is None:
                continue
            theirs = getattr(pipe, name).state_dict()
            for k, v in mine.state_dict().items():
                if "position_ids" in k:
                    continue
                w = theirs.get(k)
                if w is None or not torch.equal(v, w.to(v.dtype).reshape(v.shape)):
                    bad += 1
                    if bad < 5:
                        print("  mismatch", name, k)
        print(f"{family}: detected {detected}, {bad} mismatching tensors, {time.time() - t0:.0f} s")
        ok &= bad == 0 and detected == family
        path.unlink()
        del pipe, parts
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["sd15"]))
