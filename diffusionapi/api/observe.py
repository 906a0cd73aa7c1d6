"""The outermost HTTP layer: counts every request by route template and status
(``diffusionapi_http_requests_total``; 503/429 answers to POSTs also as rejected submits), logs
every 4xx with its reason at INFO, and names the caller for the job records (``logs.CALLER``).

Outermost, so it also sees the answers of the layers inside it (401 of the API key check,
413 of the body cap). Only error bodies are looked at, and only their first 4 KB.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time

from .. import metrics
from ..logs import CALLER

log = logging.getLogger("diffusionapi.http")

_REASON_BYTES = 4096


class ObserveMiddleware:
    def __init__(self, app, settings):
        self.app = app
        self.keys = {k: name for k, name in ((settings.admin_key, "admin"), (settings.api_key, "api-key")) if k}

    def _caller(self, scope) -> str:
        client = (scope.get("client") or ("?",))[0]
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        secret = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key")
        if secret:
            text = secret.decode("latin-1")
            # Which credential, never the credential: a configured key by its role, others by a hash prefix.
            who = self.keys.get(text) or "key:" + hashlib.sha256(secret).hexdigest()[:8]
            return f"{client} {who}"
        if auth[:6].lower() == b"basic ":
            try:
                import base64

                user = base64.b64decode(auth[6:].strip()).decode("utf-8", "replace").split(":", 1)[0]
                return f"{client} user:{user}"
            except ValueError:
                pass
        return str(client)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        token = CALLER.set(self._caller(scope))
        t0 = time.perf_counter()
        status = 500  # what the client gets when the app raises before answering
        body = bytearray()

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and 400 <= status < 500 and len(body) < _REASON_BYTES:
                body.extend(message.get("body", b"")[: _REASON_BYTES - len(body)])
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            route = scope.get("route")
            # The route's template, never the raw path: the label set stays bounded.
            name = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "?")
            metrics.HTTP.labels(method, name, str(status)).inc()
            metrics.HTTP_SECONDS.labels(method, name).observe(time.perf_counter() - t0)
            if method == "POST" and status in (429, 503):
                metrics.REJECTED.labels(name, str(status)).inc()
            if 400 <= status < 500:
                reason = _reason(bytes(body))
                log.info("%s %s -> %d: %s", method, scope.get("path"), status, reason,
                         extra={"event": "http_4xx", "method": method, "path": scope.get("path"), "route": name,
                                "status": status, "reason": reason, "caller": CALLER.get()})
            CALLER.reset(token)


def _reason(body: bytes) -> str:
    """The error message of an error body (``error``, FastAPI's ``detail``), else its start."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:300].decode("utf-8", "replace").strip() or "(no body)"
    if isinstance(data, dict):
        for key in ("error", "detail", "message"):
            if data.get(key):
                v = data[key]
                return v if isinstance(v, str) else json.dumps(v)[:500]
    return json.dumps(data)[:300]
