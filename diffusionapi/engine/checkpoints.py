"""Single-file checkpoints (.safetensors / .ckpt) loaded offline with ``from_single_file``.

diffusers needs a diffusers-layout config folder for the architecture; without one it goes
to the hub. We ship config-only folders for SD 1.5, SDXL and the SDXL refiner in
``diffusionapi/configs`` (plus CLIP's BPE tokenizer files, rebuilt from open_clip's MIT-licensed
vocabulary). A folder ``<checkpoint stem>.config/`` next to a checkpoint overrides them, for
architectures we do not ship (and for the tiny test checkpoints).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .. import __version__
from ..families import spec
from ..fileinfo import CheckpointError, ckpt_keys, single_file_unet_in_channels
from ..vocabulary import ModelEntry, sd15_loader_kwargs

__all__ = ["CheckpointError", "ckpt_keys", "load_single_file", "packaged_config", "sidecar_config"]

PACKAGED = Path(__file__).resolve().parents[1] / "configs"
TOKENIZER_FILES = ("vocab.json", "merges.txt")


def sidecar_config(path: Path) -> Path | None:
    folder = path.with_name(path.stem + ".config")
    return folder if (folder / "model_index.json").exists() else None


def packaged_config(family: str, unet_in_channels: int = 4) -> Path:
    """The shipped config folder for ``family``, assembled once with the tokenizer files; an
    inpainting checkpoint (9 UNet input channels) gets a copy whose UNet config says so."""
    name = family if unet_in_channels == 4 else f"{family}-in{unet_in_channels}"
    target = Path(tempfile.gettempdir()) / f"diffusionapi-configs-{__version__}" / name
    if (target / "model_index.json").exists():
        return target
    tmp = target.with_name(f"{name}.{id(target)}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(PACKAGED / family, tmp)
    for tok in tmp.glob("tokenizer*"):
        for f in TOKENIZER_FILES:
            shutil.copy(PACKAGED / "clip-tokenizer" / f, tok / f)
    if unet_in_channels != 4:
        import json

        unet_cfg = tmp / "unet" / "config.json"
        unet_cfg.write_text(json.dumps({**json.loads(unet_cfg.read_text()), "in_channels": unet_in_channels}, indent=2))
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_single_file(cls, entry: ModelEntry, dtype, shared=None):
    """``shared`` (engine/sharedparts.py): where a flow family's component files are built once."""
    if spec(entry.family).prediction == "flow":  # Flux.1 / SD 3.x: our size-generic converters
        from .convert_flow import load_flow_single_file

        return load_flow_single_file(entry, dtype, shared)
    config = sidecar_config(entry.path)
    if config is None:
        shipped = spec(entry.family).packaged_config
        if shipped is None:
            raise CheckpointError(f"{entry.path.name} is {spec(entry.family).label}, for which no config ships: put "
                                  f"its diffusers config folder (json/txt files) next to it as {entry.path.stem}.config/")
        config = packaged_config(shipped, single_file_unet_in_channels(entry.path))
    kwargs = dict(config=str(config), local_files_only=True, torch_dtype=dtype, **sd15_loader_kwargs(entry.family))
    if entry.path.suffix.lower() == ".ckpt":
        ckpt_keys(entry.path)  # refuse unsafe pickles before diffusers opens the file
    return cls.from_single_file(str(entry.path), **kwargs)
