"""sha256 of model and LoRA files, as A1111 puts them in the infotext ("Model hash", "Lora hashes").

Hashing a multi-GB checkpoint takes seconds, so digests are kept in memory and, when a cache
file is given, on disk (keyed by path, size and mtime), and computed once per file version.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path

from ..files import write_atomic

log = logging.getLogger(__name__)


class FileHashes:
    def __init__(self, cache_file: Path | None = None):
        self.cache_file = Path(cache_file) if cache_file else None
        self._lock = threading.Lock()
        self._digests: dict[str, str] = {}
        if self.cache_file and self.cache_file.exists():
            try:
                self._digests = dict(json.loads(self.cache_file.read_text()))
            except (OSError, ValueError) as e:
                log.warning("hash cache %s unreadable (%s); starting afresh", self.cache_file, e)

    @staticmethod
    def _key(path: Path) -> str:
        st = path.stat()
        return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"

    def sha256(self, path: Path) -> str:
        key = self._key(path)
        with self._lock:
            if key in self._digests:
                return self._digests[key]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        digest = h.hexdigest()
        with self._lock:
            self._digests[key] = digest
            if self.cache_file:
                try:
                    self.cache_file.parent.mkdir(parents=True, exist_ok=True)
                    write_atomic(self.cache_file, json.dumps(self._digests).encode(), fsync=False)
                except OSError as e:
                    log.warning("hash cache %s not written: %s", self.cache_file, e)
        return digest


_SHARED: dict[Path, FileHashes] = {}
_SHARED_LOCK = threading.Lock()


def hashes_in(queue_dir: Path) -> FileHashes:
    """The process's one FileHashes for a queue folder's cache file: the engine and a Celery
    worker's catalog share its digests (two instances would each rewrite the file without the
    other's entries, and a fresh one per rescan would hash every file again)."""
    cache = Path(queue_dir) / ".file-hashes.json"
    with _SHARED_LOCK:
        if cache not in _SHARED:
            _SHARED[cache] = FileHashes(cache)
        return _SHARED[cache]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf")


def model_sha256(path: Path, hashes: FileHashes) -> str | None:
    """A model's sha256 as A1111 clients see it: the file's own for a single file; for a diffusers
    or hub-cache folder (no single file to hash), a sha256 over the sorted list of its weight
    files' digests, stable while the weights are unchanged. None when the path is not here (a
    cluster API node holds no model files: it takes the hash its workers computed)."""
    path = Path(path)
    if path.is_file():
        return hashes.sha256(path)
    if not path.is_dir():
        return None
    import hashlib

    lines = [f"{f.relative_to(path).as_posix()}\t{hashes.sha256(f)}\n"
             for f in sorted(path.rglob("*")) if f.suffix.lower() in WEIGHT_SUFFIXES and f.is_file()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()
