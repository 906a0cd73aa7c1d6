"""Who may call the API: one check for every route of both dialects (native and `/sdapi`).

Credentials, when any is configured (``DIFFUSIONAPI_API_KEY``, ``DIFFUSIONAPI_API_AUTH``):

* ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``;
* HTTP Basic (A1111's ``--api-auth``): a configured ``user:password``, or the API key as the
  password with any user name (A1111 clients can only send Basic credentials).

Secrets are compared in constant time. A credential header sent more than once is refused, never
read one way here and another way elsewhere (proxies and frameworks disagree on which copy wins).
With nothing configured every request passes and the ``Authorization`` header is ignored
(SillyTavern always sends ``Basic <base64 of "undefined">``).
"""
from __future__ import annotations

import base64
import binascii
import hmac

_CREDENTIAL_HEADERS = (b"authorization", b"x-api-key")


def parse_credentials(spec: str | None) -> dict[str, str]:
    """'user:pass[,user2:pass2]' -> {user: pass}; the password may itself contain ':'."""
    creds: dict[str, str] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise ValueError("DIFFUSIONAPI_API_AUTH: expected user:password[,user2:password2] (no empty password)")
        creds[user] = password
    return creds


def _basic(value: bytes) -> tuple[str, str] | None:
    scheme, _, rest = value.partition(b" ")
    if scheme.lower() != b"basic" or not rest.strip():
        return None
    try:
        user, sep, password = base64.b64decode(rest.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return (user, password) if sep else None


def _same(a: str | bytes, b: str | bytes) -> bool:
    a = a.encode() if isinstance(a, str) else a
    b = b.encode() if isinstance(b, str) else b
    return hmac.compare_digest(a, b)


class Access:
    """The one credential check (see the module doc); ``allows`` takes ASGI headers."""

    def __init__(self, api_key: str | None, api_auth: str | None = None):
        self.key = api_key or None
        self.credentials = parse_credentials(api_auth)

    @property
    def enabled(self) -> bool:
        return self.key is not None or bool(self.credentials)

    def allows(self, headers) -> bool:
        """``headers``: ASGI's list of (lower-case name, value) byte pairs."""
        if not self.enabled:
            return True
        seen: dict[bytes, bytes] = {}
        for name, value in headers:
            if name in _CREDENTIAL_HEADERS:
                if name in seen:
                    return False  # sent twice: ambiguous, refused
                seen[name] = value
        auth = seen.get(b"authorization", b"")
        if self.key is not None:
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else seen.get(b"x-api-key")
            if given is not None and _same(given, self.key):
                return True
        basic = _basic(auth)
        if basic is None:
            return False
        user, password = basic
        if self.key is not None and _same(password, self.key):
            return True
        expected = self.credentials.get(user)
        # Compare against something even for an unknown user: the time does not tell which users exist.
        return _same(password, expected if expected is not None else "\0" * 16) and expected is not None
