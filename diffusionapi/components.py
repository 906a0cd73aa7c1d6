"""Component files: the separate text encoders and VAEs that transformer-only model files need
(and A1111-style VAE files for the UNet families), as Forge and ComfyUI users store them.

    stable_diffusion/text_encoders/   clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors, ...
    stable_diffusion/text_encoders/t5-tokenizer/   the T5 tokenizer (spiece.model or tokenizer.json)
    stable_diffusion/vae/             ae.safetensors (Flux), sd3 VAE, A1111 VAEs for SD 1.5 / SDXL

(``text_encoders_dir`` / ``vae_dir`` settings; by default those folders next to ``models_dir``.)

A component's *kind* is read from its tensors, never its name: CLIP text encoders (HF
transformers' CLIPTextModel keys), T5 encoders (T5EncoderModel keys), VAEs (LDM/BFL keys or
diffusers keys). CLIP-L and CLIP-G are told apart by their width (768 and 1280 in every
published file); only for other widths (the tiny test models) does the file name decide
(``clip_g`` in it means CLIP-G, otherwise CLIP-L).

Which components a model file needs is read from its transformer's tensor shapes (``needs``):
Flux.1 takes a CLIP-L as wide as its pooled projection and a T5 as wide as its text input; SD
3.x a CLIP-L and a CLIP-G whose projections add up to its pooled projection and (optionally) a
T5; Chroma a T5 as wide as its text input (no CLIP); all a 16-channel VAE. ``choose`` picks
them: the ones named in a request, else the only compatible file of each kind; a missing or
ambiguous part is a ``ComponentError`` that says which file to add where, or which names to
choose from; a kind the family does not take is one too.

Only ``.safetensors`` files are components: nothing here unpickles anything. No torch either:
the API nodes resolve components at submit (jobs/resolve.py) from the safetensors headers.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from .config import stable_diffusion_dir
from .fileinfo import read_safetensors_header

TEXT_ENCODER, VAE = "text_encoder", "vae"
CLIP_L, CLIP_G, T5XXL = "clip_l", "clip_g", "t5xxl"
KIND_LABELS = {CLIP_L: "CLIP-L text encoder", CLIP_G: "CLIP-G text encoder", T5XXL: "T5-XXL text encoder",
               VAE: "VAE"}
# The file a user downloads for each kind (Forge's and ComfyUI's names), for the 422s.
USUAL_FILES = {CLIP_L: "clip_l.safetensors", CLIP_G: "clip_g.safetensors",
               T5XXL: "t5xxl_fp16.safetensors (or t5xxl_fp8_e4m3fn.safetensors)", VAE: "ae.safetensors"}
FLOW_FAMILIES_VAE = ("flux1", "sd3")
# Families that run on another family's component files (Flux.1 Fill: Flux.1's CLIP-L, T5 and ae;
# Chroma: Flux.1's T5 and ae, without the CLIP-L, see ``needs``).
COMPONENTS_OF = {"flux1-fill": "flux1", "chroma": "flux1"}


def component_family(family: str) -> str:
    """The family whose component files ``family`` uses (listed under that family in /modules)."""
    return COMPONENTS_OF.get(str(family), str(family))
UNET_FAMILIES_VAE = ("sd15", "sd2", "sdxl")
T5_TOKENIZER_FOLDER = "t5-tokenizer"
T5_TOKENIZER_FILES = ("spiece.model", "tokenizer.json")

# Prefixes under which all-in-one files and exports keep each part (ComfyUI's checkpoint layout:
# text_encoders.<kind>.transformer.*, vae.* or first_stage_model.*).
INSIDE_PREFIXES = {CLIP_L: ("text_encoders.clip_l.transformer.", "text_encoders.clip_l."),
                   CLIP_G: ("text_encoders.clip_g.transformer.", "text_encoders.clip_g."),
                   T5XXL: ("text_encoders.t5xxl.transformer.", "text_encoders.t5xxl."),
                   VAE: ("vae.", "first_stage_model.")}


class ComponentError(ValueError):
    """A component that is missing, ambiguous, of the wrong kind, or unreadable (the message says which)."""


def text_encoders_dir(settings) -> Path:
    return stable_diffusion_dir(settings, "text_encoders_dir", "text_encoders")


def vae_dir(settings) -> Path:
    return stable_diffusion_dir(settings, "vae_dir", "vae")


@dataclass(frozen=True)
class ComponentFile:
    name: str                  # path under its folder without the suffix: "clip_l", "flux/ae"
    path: Path
    kind: str                  # clip_l | clip_g | t5xxl | vae
    families: tuple[str, ...]  # which model families it can serve
    width: int                 # text encoders: hidden width; VAEs: latent channels
    projection: int = 0        # CLIP: text projection width (its hidden width when it has none)
    storage: str = ""          # the weights' stored type as safetensors names it ("F16", "BF16", "F8_E4M3")

    @property
    def role(self) -> str:
        return VAE if self.kind == VAE else TEXT_ENCODER


# ---------------------------------------------------------------------------- reading headers

def _shape(header: dict, key: str) -> list[int] | None:
    entry = header.get(key)
    return list(entry["shape"]) if isinstance(entry, dict) and "shape" in entry else None


def _find_suffix(keys, suffix: str) -> str | None:
    for k in keys:
        if k == suffix or k.endswith("." + suffix):
            return k
    return None


def _storage(header: dict) -> str:
    counts: dict[str, int] = {}
    for k, v in header.items():
        if k != "__metadata__" and isinstance(v, dict) and k.endswith("weight"):
            counts[v.get("dtype", "")] = counts.get(v.get("dtype", ""), 0) + 1
    return max(counts, key=counts.get) if counts else ""


def part_header(header: dict, kind: str) -> dict:
    """The entries of an all-in-one file's part ``kind``, prefixes removed ({} when absent)."""
    for prefix in INSIDE_PREFIXES[kind]:
        part = {k[len(prefix):]: v for k, v in header.items() if k.startswith(prefix)}
        if part:
            return part
    return {}


def classify(header: dict, name_hint: str = "") -> tuple[str, tuple[str, ...], int, int]:
    """(kind, families, width, projection) of a component's tensors; ComponentError if none fits."""
    keys = [k for k in header if k != "__metadata__"]
    tok = _find_suffix(keys, "embeddings.token_embedding.weight")
    if tok is not None:
        width = _shape(header, tok)[1]
        proj_key = _find_suffix(keys, "text_projection.weight")
        projection = _shape(header, proj_key)[0] if proj_key else width
        if width == 768:
            kind = CLIP_L
        elif width == 1280:
            kind = CLIP_G
        else:  # only non-published widths (tiny test encoders) fall back to the name
            kind = CLIP_G if re.search(r"clip[-_ ]?g", name_hint, re.I) else CLIP_L
        families = ("flux1", "sd3") if kind == CLIP_L else ("sd3",)
        return kind, families, width, projection
    q = _find_suffix(keys, "encoder.block.0.layer.0.SelfAttention.q.weight")
    if q is not None:
        return T5XXL, ("flux1", "sd3"), _shape(header, q)[1], 0
    conv = _find_suffix(keys, "decoder.conv_in.weight")
    if conv is not None and _find_suffix(keys, "encoder.conv_in.weight") is not None:
        latent = _shape(header, conv)[1]
        return VAE, (FLOW_FAMILIES_VAE if latent == 16 else UNET_FAMILIES_VAE if latent == 4 else ()), latent, 0
    raise ComponentError("not a text encoder (CLIP / T5) or VAE: no known tensor names")


def read_component(path: Path, name: str) -> ComponentFile:
    try:
        header = read_safetensors_header(path)
    except (OSError, ValueError) as e:
        raise ComponentError(f"{path.name}: unreadable ({e})") from None
    kind, families, width, projection = classify(header, path.name)
    return ComponentFile(name, path, kind, families, width, projection, _storage(header))


class ComponentIndex:
    """Scans the component folders; headers are read once per file version."""

    def __init__(self, settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, int, int], ComponentFile | str] = {}

    def folders(self) -> dict[str, Path]:
        return {TEXT_ENCODER: text_encoders_dir(self.settings), VAE: vae_dir(self.settings)}

    def files(self, problems: dict[str, str] | None = None) -> list[ComponentFile]:
        out: list[ComponentFile] = []
        for role, root in self.folders().items():
            if not root.is_dir():
                continue
            for f in sorted(root.rglob("*.safetensors")):
                if not f.is_file() or not _inside(f, root):
                    continue
                name = f.relative_to(root).with_suffix("").as_posix()
                found = self._read(f, name)
                if isinstance(found, str):
                    if problems is not None:
                        problems[name] = found
                elif found.role != role:
                    if problems is not None:
                        problems[name] = f"{f.name} is a {KIND_LABELS[found.kind]} but lies in {root}"
                else:
                    out.append(found)
        return out

    def _read(self, f: Path, name: str) -> ComponentFile | str:
        st = f.stat()
        key = (str(f), st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._cache.get(key)
        if hit is None:
            try:
                hit = read_component(f, name)
            except ComponentError as e:
                hit = f"{f.name}: {e}"
            with self._lock:
                self._cache[key] = hit
        return hit

    def t5_tokenizer(self) -> Path | None:
        """The T5 tokenizer folder (published T5 files carry no tokenizer, and nothing is downloaded)."""
        folder = text_encoders_dir(self.settings) / T5_TOKENIZER_FOLDER
        return folder if any((folder / n).is_file() for n in T5_TOKENIZER_FILES) else None


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError):
        return False


def match_name(requested: str, files: list[ComponentFile]) -> ComponentFile | None:
    """A requested module: its name, its file name, or a full path (Forge sends full paths) --
    matched by file name only, so a request never names a path of its own."""
    req = str(requested).replace("\\", "/")
    for c in files:
        if req == c.name:
            return c
    base = req.rsplit("/", 1)[-1]
    stem = base[:-len(".safetensors")] if base.lower().endswith(".safetensors") else base
    hits = [c for c in files if c.path.name == base or c.path.stem == stem]
    return hits[0] if len(hits) == 1 else None


# ---------------------------------------------------------------------------- what a model needs

@dataclass(frozen=True)
class Need:
    kind: str
    width: int | None = None          # required width (None: any)
    optional: bool = False
    projection_sum: int | None = None  # SD 3: CLIP-L + CLIP-G projections add up to this

    def fits(self, c: ComponentFile) -> bool:
        if c.kind != self.kind:
            return False
        return self.width is None or c.width == self.width


def _strip(header: dict) -> dict:
    prefix = "model.diffusion_model."
    if any(k.startswith(prefix) for k in header):
        return {k[len(prefix):]: v for k, v in header.items() if k.startswith(prefix)}
    return header


def needs(family: str, header: dict) -> list[Need]:
    """The components a model file of ``family`` needs, with the widths its transformer expects."""
    t = _strip(header)
    if family == "chroma":  # T5 alone: no CLIP, no pooled projection
        joint = _shape(t, "txt_in.weight") or _shape(t, "context_embedder.weight")
        return [Need(T5XXL, joint[1] if joint else None), Need(VAE, 16)]
    family = component_family(family)
    if family == "flux1":
        pooled = _shape(t, "vector_in.in_layer.weight") or _shape(t, "time_text_embed.text_embedder.linear_1.weight")
        joint = _shape(t, "txt_in.weight") or _shape(t, "context_embedder.weight")
        return [Need(CLIP_L, pooled[1] if pooled else None), Need(T5XXL, joint[1] if joint else None),
                Need(VAE, 16)]
    if family == "sd3":
        pooled = _shape(t, "y_embedder.mlp.0.weight") or _shape(t, "time_text_embed.text_embedder.linear_1.weight")
        joint = _shape(t, "context_embedder.weight")
        return [Need(CLIP_L, None, projection_sum=pooled[1] if pooled else None),
                Need(CLIP_G, None, projection_sum=pooled[1] if pooled else None),
                Need(T5XXL, joint[1] if joint else None, optional=True), Need(VAE, 16)]
    return []


def inside(header: dict) -> set[str]:
    """Which parts an all-in-one file carries."""
    return {kind for kind in INSIDE_PREFIXES if part_header(header, kind)}


def where(kind: str, settings) -> Path:
    return vae_dir(settings) if kind == VAE else text_encoders_dir(settings)


def unknown_module(requested: str, installed: list[ComponentFile], problems: dict[str, str] | None) -> ComponentError:
    """Why ``requested`` names no usable component: a file that is there but unreadable or of no
    known kind says so; else the valid choices."""
    base = str(requested).replace("\\", "/").rsplit("/", 1)[-1]
    stem = base[:-len(".safetensors")] if base.lower().endswith(".safetensors") else base
    for name, why in (problems or {}).items():
        if requested == name or name.rsplit("/", 1)[-1] == stem:
            return ComponentError(f"module {requested!r} cannot be used: {why}")
    choices = ", ".join(sorted(x.name for x in installed)) or "(none installed)"
    return ComponentError(f"unknown module {requested!r}; valid choices: {choices}")


@dataclass(frozen=True)
class ModelParts:
    """What a model file needs and what it carries itself (read from its header; a cluster's
    API node gets it from the worker's catalog)."""
    needs: tuple[Need, ...]
    inside: frozenset[str]
    problem: str | None = None   # why the file cannot run (a layout not read)

    @classmethod
    def of(cls, family: str, header: dict) -> "ModelParts":
        t = _strip(header)
        layout = component_family(family)  # (Chroma's layouts are Flux.1's)
        diffusers_layout = (any(k.startswith("single_transformer_blocks.") for k in t) if layout == "flux1" else
                            layout == "sd3" and "pos_embed.pos_embed" in t)
        problem = (f"diffusers-layout {family} single files are not read: use the original (BFL / Stability) "
                   "layout file, or the model as a diffusers folder") if diffusers_layout else None
        return cls(tuple(needs(family, header)), frozenset(inside(header)), problem)

    def to_json(self) -> dict:
        return {"needs": [[n.kind, n.width, n.optional, n.projection_sum] for n in self.needs],
                "inside": sorted(self.inside), "problem": self.problem}

    @classmethod
    def from_json(cls, data: dict) -> "ModelParts":
        return cls(tuple(Need(*n) for n in data.get("needs", [])), frozenset(data.get("inside", [])),
                   data.get("problem"))


def choose(family: str, model_file: str, parts: ModelParts, installed: list[ComponentFile], named: list[str],
           settings, problems: dict[str, str] | None = None) -> list[ComponentFile]:
    """The component files to run ``model_file`` with: those ``named`` (each must fit), the only
    compatible one for each part the file lacks, nothing for an optional part with none installed."""
    own_family, family = family, component_family(family)
    wanted = [n for n in parts.needs if n.kind not in parts.inside]
    carried = parts.inside
    picked: dict[str, ComponentFile] = {}
    for requested in named:
        c = match_name(requested, installed)
        if c is None:
            raise unknown_module(requested, installed, problems)
        need = next((n for n in wanted if n.kind == c.kind), None)
        if need is None or family not in c.families:
            fits = [x.name for x in installed if any(n.fits(x) for n in wanted) and family in x.families]
            why = (f"{model_file} carries its own {KIND_LABELS[c.kind]}" if c.kind in carried
                   else f"{own_family} takes no {KIND_LABELS[c.kind]}" if family in c.families
                   else f"{c.path.name} is a {KIND_LABELS[c.kind]} for {', '.join(c.families) or 'no known family'}")
            raise ComponentError(f"module {requested!r} does not fit {model_file} ({own_family}): {why}; "
                                 f"valid choices: {', '.join(fits) or '(none installed)'}")
        if not need.fits(c):
            raise ComponentError(f"module {requested!r} ({c.path.name}) is {c.width} wide; {model_file} needs a "
                                 f"{KIND_LABELS[c.kind]} {need.width} wide")
        picked[c.kind] = c
    for need in wanted:
        if need.kind in picked:
            continue
        fits = [c for c in installed if need.fits(c) and family in c.families]
        if len(fits) == 1:
            picked[need.kind] = fits[0]
        elif len(fits) > 1:
            raise ComponentError(f"{model_file} needs a {KIND_LABELS[need.kind]} and several are installed: "
                                 f"name one in modules; valid choices: {', '.join(c.name for c in fits)}")
        elif not need.optional:
            width = f" ({need.width} wide)" if need.width else ""
            raise ComponentError(f"{model_file} needs a {KIND_LABELS[need.kind]}{width}: add "
                                 f"{USUAL_FILES[need.kind]} to {where(need.kind, settings)}/")
    clips = [picked.get(k) for k in (CLIP_L, CLIP_G)]
    total = next((n.projection_sum for n in wanted if n.projection_sum), None)
    if total and all(clips) and clips[0].projection + clips[1].projection != total:
        raise ComponentError(f"{clips[0].path.name} and {clips[1].path.name} project to "
                             f"{clips[0].projection} + {clips[1].projection}; {model_file} needs {total} together")
    return [picked[n.kind] for n in wanted if n.kind in picked]


def choose_vae(family: str, model_name: str, installed: list[ComponentFile], named: list[str],
               problems: dict[str, str] | None = None) -> ComponentFile:
    """A VAE file in place of a model's own (A1111's ``sd_vae``): the only module named, a VAE of
    a family that fits (its latent channels)."""
    family = component_family(family)
    vaes = [c for c in installed if c.kind == VAE and family in c.families]
    if len(named) != 1:
        raise ComponentError(f"{model_name!r} carries its own text encoders and VAE: name at most one VAE to "
                             f"replace its VAE; valid choices: {', '.join(c.name for c in vaes) or '(none installed)'}")
    c = match_name(named[0], installed)
    if c is None and problems:
        raise unknown_module(named[0], installed, problems)
    if c is None or c.kind != VAE or family not in c.families:
        why = "unknown module" if c is None else \
            f"module {named[0]!r} is a {KIND_LABELS[c.kind]}" + (f" for {', '.join(c.families)}" if c.kind == VAE else "")
        choices = ", ".join(x.name for x in vaes) or "(none installed)"
        raise ComponentError(f"{why} {named[0]!r}; valid choices: {choices}" if c is None else
                             f"{why}, not a VAE for {model_name!r} ({family}); valid choices: {choices}")
    return c
