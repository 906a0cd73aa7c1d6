"""`response_format: "url"`: result images kept for a while under an unguessable path.

OpenAI's URLs are public links valid for a limited time; so are these: the 256-bit token in the
path is the only credential (`GET /v1/images/results/<token>.<ext>` needs no API key, so any
client or browser that gets the URL can show it), and a file lives ``ttl`` seconds
(DIFFUSIONAPI_RESULTS_TTL_SEC, the time an unread result is kept). On the embedded backend the
files live in `<outputs>/openai-results/`; on the Celery backend in the cluster's Redis
(``JobBackend.shared_blobs``), so whichever API node a load balancer picks serves the URL.
"""
from __future__ import annotations

import re
import secrets
import time
from pathlib import Path

from ...files import write_atomic

PREFIX = "/v1/images/results/"
NAME = re.compile(r"^[A-Za-z0-9_-]{43}\.(png|jpeg|webp)$")


class ResultFiles:
    """``shared``: the backend's shared store (JobService.shared_blobs); None keeps files."""

    def __init__(self, root: Path, ttl_sec: float, shared=None):
        self.root, self.ttl, self.shared = Path(root), ttl_sec, shared
        self._swept = 0.0

    def put(self, data: bytes, fmt: str) -> str:
        """Keep ``data``; its file name (the URL's last segment)."""
        name = f"{secrets.token_urlsafe(32)}.{fmt}"
        if self.shared is not None:
            self.shared.put("openai-result:" + name, data, self.ttl)
            return name
        self.sweep()
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.root / name, data, fsync=False)
        return name

    def read(self, name: str) -> bytes | None:
        """The bytes of a live result; None for a malformed, unknown or expired name."""
        if not NAME.match(name):
            return None
        if self.shared is not None:
            return self.shared.get("openai-result:" + name)
        p = self._path(name)
        try:
            return p.read_bytes() if p is not None else None
        except OSError:
            return None

    def _path(self, name: str) -> Path | None:
        p = self.root / name
        try:
            if time.time() - p.stat().st_mtime > self.ttl:
                p.unlink(missing_ok=True)
                return None
        except OSError:
            return None
        return p

    def sweep(self) -> None:
        """Drop expired files (at most once a minute)."""
        now = time.time()
        if now - self._swept < 60 or not self.root.is_dir():
            return
        self._swept = now
        for p in self.root.iterdir():
            try:
                if now - p.stat().st_mtime > self.ttl:
                    p.unlink(missing_ok=True)
            except OSError:
                pass
