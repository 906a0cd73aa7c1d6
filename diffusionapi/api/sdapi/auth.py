"""Who may call `/sdapi`: A1111's `--api-auth` (HTTP Basic) and this service's API key.

With neither configured the Authorization header is ignored: SillyTavern always sends
`Basic <base64 of "undefined">` and Open WebUI `Basic ` with nothing after it. A1111 clients can
only send Basic credentials, so the API key is also accepted as a Basic password (any user name),
besides `Authorization: Bearer <key>` and `X-API-Key`.
"""
from __future__ import annotations

import base64
import binascii
import hmac

from fastapi import HTTPException, Request

from ...auth.keys import parse_credentials  # noqa: F401 - one parser of DIFFUSIONAPI_API_AUTH


def _basic(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return (user, password) if sep else None


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class SdapiAuth:
    def __init__(self, api_auth: str | None, api_key: str | None):
        self.credentials = parse_credentials(api_auth)
        self.key = api_key or None

    @property
    def enabled(self) -> bool:
        return bool(self.credentials) or self.key is not None

    def allows(self, headers) -> bool:
        if not self.enabled:
            return True
        auth = headers.get("authorization", "")
        if self.key is not None:
            bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if _same(bearer or headers.get("x-api-key", ""), self.key):
                return True
        basic = _basic(auth)
        if basic is None:
            return False
        user, password = basic
        if self.key is not None and _same(password, self.key):
            return True
        expected = self.credentials.get(user)
        return expected is not None and _same(password, expected)

    async def __call__(self, request: Request) -> None:
        if not self.allows(request.headers):
            raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})
