"""`response_format: "url"`: result images kept for a while under an unguessable path.

OpenAI's URLs are public links valid for a limited time; so are these: the 256-bit token in the
path is the only credential (`GET /v1/images/results/<token>.<ext>` needs no API key, so any
client or browser that gets the URL can show it), and a file lives ``ttl`` seconds
(DIFFUSIONAPI_RESULTS_TTL_SEC, the time an unread result is kept). The files live on the API
node that answered (`<outputs>/openai-results/`); behind a load balancer, route `/v1/images/results/`
to that node or ask for `b64_json`.
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
    def __init__(self, root: Path, ttl_sec: float):
        self.root, self.ttl = Path(root), ttl_sec
        self._swept = 0.0

    def put(self, data: bytes, fmt: str) -> str:
        """Keep ``data``; its file name (the URL's last segment)."""
        self.sweep()
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"{secrets.token_urlsafe(32)}.{fmt}"
        write_atomic(self.root / name, data, fsync=False)
        return name

    def path(self, name: str) -> Path | None:
        """The file of a live result; None for a malformed, unknown or expired name."""
        if not NAME.match(name):
            return None
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
