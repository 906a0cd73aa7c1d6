"""Textual-inversion vectors for jobs: read once per file version and kept (they are small).

The registry lists the files (``registry.embeddings``: name, family, vector count, read by
``fileinfo.read_embedding``); the resolver puts the ones a prompt may call into the plan, and
the engine loads their tensors here.
"""
from __future__ import annotations

import logging
import threading

from ..fileinfo import EmbeddingError, read_embedding
from ..vocabulary import EmbeddingEntry

log = logging.getLogger(__name__)


class EmbeddingTensors:
    """Loaded vectors by (path, size, mtime): a replaced file is read again."""

    def __init__(self):
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[tuple, dict | None, str | None]] = {}

    def load(self, entry: EmbeddingEntry) -> tuple[dict | None, str | None]:
        """({"": [n, w]} or {"clip_l": .., "clip_g": ..}, None), or (None, why it cannot be used)."""
        if entry.error:
            return None, entry.error
        try:
            st = entry.path.stat()
        except OSError as e:
            return None, f"{entry.path.name}: {e.strerror or e}"
        stamp = (st.st_size, st.st_mtime_ns)
        key = str(entry.path)
        with self._lock:
            hit = self._cache.get(key)
        if hit and hit[0] == stamp:
            return hit[1], hit[2]
        try:
            tensors, error = read_embedding(entry.path), None
        except EmbeddingError as e:
            tensors, error = None, str(e)
        with self._lock:
            self._cache[key] = (stamp, tensors, error)
        return tensors, error
