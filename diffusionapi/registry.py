"""What is installed: models (with labels), LoRAs and upscalers; request name -> path, safely.

Names are matched only against what a directory scan found, so a request can never
name a path: ``../x`` or ``/etc`` simply match nothing. Symlinks that point outside
their directory are skipped during the scan.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
import re
import threading
from pathlib import Path

from .components import ComponentIndex, ModelParts
from .families import Detected, detect_folder, detect_single_file, spec
from .fileinfo import (EMBEDDING_SUFFIXES, EmbeddingError, embedding_info, lora_family, read_model_header,
                       upscaler_problem)
from .vocabulary import (BUILTIN_LABELS, LATENT_UPSCALE_MODES, EmbeddingEntry, LoraEntry, ModelEntry, ModelFormat,
                         UpscalerEntry)

log = logging.getLogger(__name__)

SINGLE_FILE_EXTS = (".safetensors", ".ckpt", ".gguf")  # .gguf: quantized transformers (Flux.1, SD 3.x)
UPSCALER_EXTS = (".pth", ".safetensors", ".pt")


class UnknownName(LookupError):
    """A request named something that is not installed; the message lists choices."""


def normalise(name: str) -> str:
    """The seed's label matching: case-insensitive, '-', '_' and ' ' all alike."""
    return re.sub(r"[-_\s]+", " ", name).strip().casefold()


def derive_label(name: str) -> str:
    """A readable label for a model with none configured: models--Meina--MeinaMix_V11 -> MeinaMix V11."""
    base = name.split("--")[-1] if name.startswith("models--") else name
    return re.sub(r"[_\s]+", " ", base).strip() or name


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError):
        return False


class Registry:
    """Scans the configured directories; each listing is a fresh, cheap directory walk."""

    def __init__(self, settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._family_cache: dict[tuple[str, float], Detected | str] = {}
        self._upscaler_cache: dict[tuple[str, float, int], str | None] = {}
        self._embedding_cache: dict[tuple[str, int, int], EmbeddingEntry] = {}
        self.components = ComponentIndex(settings)  # text encoders and VAEs (components.py)

    # ------------------------------------------------------------------ labels
    def labels(self) -> dict[str, str]:
        path = Path(self.settings.model_labels)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("model labels file %s unreadable: %s", path, e)
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    # ------------------------------------------------------------------ models
    def _cached_family(self, path: Path, compute, stamp: Path | None = None):
        """compute(path), cached until ``stamp`` (default: path itself) changes."""
        key = (str(path), (stamp or path).stat().st_mtime)
        with self._lock:
            fam = self._family_cache.get(key)
        if fam is None:
            fam = compute(path)
            with self._lock:
                self._family_cache[key] = fam
        return fam

    def models(self, problems: dict[str, str] | None = None) -> list[ModelEntry]:
        """Every usable model; ``problems`` collects why the others are left out."""
        root = Path(self.settings.models_dir)
        if not root.is_dir():
            return []
        labels = self.labels()
        found: dict[str, ModelEntry] = {}

        def add(name, path, fmt, family_fn, stamp=None):
            if name in found:
                log.warning("model name %r found twice; keeping %s", name, found[name].path)
                return
            try:
                found_as: Detected = self._cached_family(path, family_fn, stamp)
                why_not = spec(found_as.family).runnable
                if fmt == ModelFormat.SINGLE_FILE and not why_not:
                    why_not = spec(found_as.family).single_files
                if why_not:
                    raise ValueError(f"{path.name}: {why_not}")
            except Exception as e:  # a broken model must not hide the others
                log.warning("skipping model %s: %s", path, e)
                if problems is not None:
                    problems[name] = str(e)
                return
            found[name] = ModelEntry(name, labels.get(name) or BUILTIN_LABELS.get(name) or derive_label(name),
                                     path, found_as.family, fmt, found_as.prediction, found_as.ztsnr)

        self._scan(root, root, add, set())
        return sorted(found.values(), key=lambda m: m.name.casefold())

    def _scan(self, folder: Path, root: Path, add, seen: set) -> None:
        """Diffusers and hub-cache folders are models as a whole; elsewhere, look for single files."""
        real = folder.resolve()
        if real in seen:  # a symlink loop inside the models dir
            return
        seen.add(real)
        for entry in sorted(folder.iterdir()):
            if not _inside(entry, root) or entry.name.startswith(".") or entry.name.endswith(".config"):
                continue  # "<checkpoint>.config/" folders are a single file's config, not a model
            if entry.is_dir():
                if (entry / "model_index.json").exists():
                    add(entry.name, entry, ModelFormat.DIFFUSERS, detect_folder, entry / "model_index.json")
                elif entry.name.startswith("models--"):
                    snap = self._hub_snapshot(entry)
                    if snap is not None and _inside(snap, root):
                        add(entry.name, snap, ModelFormat.HUB_CACHE, detect_folder, snap / "model_index.json")
                else:
                    self._scan(entry, root, add, seen)
            else:
                self._maybe_single_file(entry, root, add)

    def _maybe_single_file(self, f: Path, root: Path, add) -> None:
        if f.suffix.lower() in SINGLE_FILE_EXTS and f.is_file() and _inside(f, root):
            add(f.stem, f, ModelFormat.SINGLE_FILE, detect_single_file, _newest(f))

    @staticmethod
    def _hub_snapshot(folder: Path) -> Path | None:
        ref = folder / "refs" / "main"
        snaps = folder / "snapshots"
        if ref.is_file():
            snap = snaps / ref.read_text().strip()
            if (snap / "model_index.json").exists():
                return snap
        if snaps.is_dir():  # no refs/main: take the newest snapshot with an index
            cands = sorted((p for p in snaps.iterdir() if (p / "model_index.json").exists()),
                           key=lambda p: p.stat().st_mtime, reverse=True)
            if cands:
                return cands[0]
        return None

    def resolve_model(self, requested: str, *, models: list[ModelEntry] | None = None,
                      problems: dict[str, str] | None = None) -> ModelEntry:
        if models is None:
            problems = {}
            models = self.models(problems)
        by_name = {m.name: m for m in models}
        if requested in by_name:
            return by_name[requested]
        key = normalise(requested)
        for pick in (lambda m: normalise(m.label),
                     lambda m: normalise(m.name.split("--")[-1]) if m.name.startswith("models--") else None,
                     lambda m: normalise(m.name)):
            hits = [m for m in models if pick(m) == key]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise UnknownName(f"model {requested!r} is ambiguous; it matches: "
                                 f"{', '.join(m.name for m in hits)}")
        if problems and requested in problems:
            raise UnknownName(f"model {requested!r} is not usable: {problems[requested]}")
        raise UnknownName(_unknown("model", requested, [m.name for m in models] + [m.label for m in models]))

    def model_parts(self, model: ModelEntry) -> ModelParts:
        """What a Flux.1 / SD 3.x model file needs as component files, read from its header."""
        return ModelParts.of(model.family, read_model_header(model.path))

    # ------------------------------------------------------------------ LoRAs
    def loras(self) -> list[LoraEntry]:
        root = Path(self.settings.loras_dir)
        if not root.is_dir():
            return []
        out = []
        for f in sorted(root.rglob("*.safetensors")):
            if not f.is_file() or not _inside(f, root):
                continue
            name = f.relative_to(root).with_suffix("").as_posix()
            out.append(LoraEntry(name, f, self._cached_family(f, lora_family) if f.stat().st_size else None))
        return out

    # ------------------------------------------------------------------ embeddings
    def embeddings(self) -> list[EmbeddingEntry]:
        """Textual-inversion files; each is read once per version. A name found twice (in
        subfolders) is the first in path order, as a prompt word can call only one."""
        root = Path(self.settings.embeddings_dir)
        if not root.is_dir():
            return []
        out: dict[str, EmbeddingEntry] = {}
        for f in sorted(root.rglob("*")):
            if f.suffix.lower() not in EMBEDDING_SUFFIXES or not f.is_file() or not _inside(f, root):
                continue
            st = f.stat()
            if not st.st_size or f.stem in out:
                continue
            key = (str(f), st.st_size, st.st_mtime_ns)
            with self._lock:
                entry = self._embedding_cache.get(key)
            if entry is None:
                try:
                    entry = EmbeddingEntry(f.stem, f, *embedding_info(f))
                except EmbeddingError as e:
                    log.warning("embedding skipped: %s", e)
                    entry = EmbeddingEntry(f.stem, f, None, 0, str(e))
                with self._lock:
                    self._embedding_cache[key] = entry
            out[f.stem] = entry
        return list(out.values())

    def resolve_lora(self, requested: str, *, loras: list[LoraEntry] | None = None) -> LoraEntry:
        loras = self.loras() if loras is None else loras
        for entry in loras:
            if entry.name == requested:
                return entry
        key = normalise(requested.removesuffix(".safetensors"))
        hits = [e for e in loras if normalise(e.name) == key]
        if len(hits) == 1:
            return hits[0]
        raise UnknownName(_unknown("LoRA", requested, [e.name for e in loras]))

    # ------------------------------------------------------------------ upscalers
    def upscalers(self, problems: dict[str, str] | None = None) -> list[UpscalerEntry]:
        """Latent modes, then every file spandrel loads; ``problems`` collects why others are not listed."""
        out = [UpscalerEntry(n, None) for n in LATENT_UPSCALE_MODES]
        root = Path(self.settings.upscalers_dir)
        if not root.is_dir():
            return out
        for f in sorted(root.rglob("*")):
            if f.suffix.lower() not in UPSCALER_EXTS or not f.is_file() or not _inside(f, root):
                continue
            problem = self._upscaler_problem(f)
            if problem is None:
                out.append(UpscalerEntry(f.stem, f))
            else:
                log.warning("upscaler %s not listed: %s", f, problem)
                if problems is not None:
                    problems[f.stem] = problem
        return out

    def _upscaler_problem(self, f: Path) -> str | None:
        st = f.stat()
        key = (str(f), st.st_mtime, st.st_size)
        with self._lock:
            if key in self._upscaler_cache:
                return self._upscaler_cache[key]
        problem = upscaler_problem(f)
        with self._lock:
            self._upscaler_cache[key] = problem
        return problem

    def resolve_upscaler(self, requested: str) -> UpscalerEntry:
        problems: dict[str, str] = {}
        ups = self.upscalers(problems)
        if requested in problems:
            raise UnknownName(f"upscaler {requested!r} is not usable: {problems[requested]}")
        for u in ups:
            if u.name == requested:
                return u
        hits = [u for u in ups if normalise(u.name) == normalise(requested)]
        if len(hits) == 1:
            return hits[0]
        raise UnknownName(_unknown("upscaler", requested, [u.name for u in ups]))


def _newest(f: Path) -> Path:
    """What to watch for a single file's detection: its sidecar scheduler config (which can say
    v-prediction) when that changed after the file, else the file."""
    side = f.with_name(f.stem + ".config") / "scheduler" / "scheduler_config.json"
    try:
        return side if side.stat().st_mtime > f.stat().st_mtime else f
    except OSError:
        return f


def display_path(path: Path) -> str:
    """A path as the seed shows it: relative to the working directory when inside it."""
    try:
        return Path(os.path.relpath(path.resolve(), Path.cwd().resolve())).as_posix() \
            if _inside(path, Path.cwd()) else str(path)
    except ValueError:
        return str(path)


def _unknown(kind: str, requested: str, choices: list[str]) -> str:
    uniq = list(dict.fromkeys(choices))
    close = difflib.get_close_matches(requested, uniq, n=3, cutoff=0.5)
    msg = f"unknown {kind} {requested!r}"
    if close:
        msg += f"; did you mean: {', '.join(close)}"
    msg += f"; valid choices: {', '.join(uniq) if uniq else '(none installed)'}"
    return msg
