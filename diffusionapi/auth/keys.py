"""Named API keys: the keys file, and turning a request's credentials into a :class:`Caller`.

``DIFFUSIONAPI_API_KEYS_FILE`` (TOML, or JSON when the name ends in ``.json``)::

    [keys.alice]                  # the key's name: what GET /queue, /usage and the logs show
    hash = "sha256:9f86d0..."     # sha256 of the key: the file never holds a key itself
    role = "user"                 # or "admin": sees and cancels every job, reads any usage
    share = 1.0                   # weight in the round-robin between keys (2.0: twice the turns)
    max_priority = 0              # a request's `priority` is capped to this
    [keys.alice.limits]           # any of auth/caller.py's Limits; absent = unlimited
    max_queued = 10

``diffusionapi keys add|list|revoke`` (auth/cli.py) writes it. The file is read again when it
changes (checked on every request: one stat) and on SIGHUP, so a revoked key's next request is
refused without a restart. An unreadable file accepts no key from it (fail closed; the error is
logged) until it is fixed. Keys are random (``dapi-`` + 43 url-safe characters), so a fast hash
is enough; a presented key is hashed once and compared with every entry in constant time.

The single ``DIFFUSIONAPI_API_KEY`` and ``DIFFUSIONAPI_API_AUTH`` users keep working, as admins.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .caller import OPEN, Caller, Limits

log = logging.getLogger("diffusionapi.auth")

KEY_PREFIX = "dapi-"
LEGACY_KEY_NAME = "admin"  # the caller DIFFUSIONAPI_API_KEY stands for
_CREDENTIAL_HEADERS = (b"authorization", b"x-api-key")


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyEntry:
    caller: Caller
    digest: bytes  # sha256 of the key


def parse_keys(data: dict) -> dict[str, dict]:
    """The keys table of a loaded file (checked): name -> entry dict."""
    keys = data.get("keys", {})
    if not isinstance(keys, dict):
        raise ValueError("`keys` must be a table of name -> key entry")
    for name, entry in keys.items():
        if not isinstance(entry, dict):
            raise ValueError(f"keys.{name}: expected a table")
        if not str(entry.get("hash", "")).startswith("sha256:"):
            raise ValueError(f"keys.{name}.hash: expected 'sha256:<hex>' (the file holds hashes, never keys)")
        if entry.get("role", "user") not in ("admin", "user"):
            raise ValueError(f"keys.{name}.role: 'admin' or 'user'")
    return keys


def entry_caller(name: str, entry: dict) -> Caller:
    try:
        limits = Limits.from_dict(entry.get("limits"))
    except ValueError as e:
        raise ValueError(f"keys.{name}.limits: {e}") from None
    share = float(entry.get("share", 1.0))
    if not share > 0:
        raise ValueError(f"keys.{name}.share: must be > 0")
    return Caller(name=name, role=entry.get("role", "user"), limits=limits,
                  max_priority=int(entry.get("max_priority", 0)), share=share)


def read_file(path: Path) -> dict:
    raw = path.read_bytes()
    if path.suffix.lower() == ".json":
        data = json.loads(raw or b"{}")
    else:
        data = tomllib.loads(raw.decode())
    if not isinstance(data, dict):
        raise ValueError("expected a table/object at the top")
    return data


class KeysFile:
    """The keys file, read again when its stat changes (or on :meth:`reload`)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._sig: tuple | None = None
        self._entries: tuple[KeyEntry, ...] = ()
        self._lock = threading.Lock()
        self.reload(strict=True)

    def _stat(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def reload(self, strict: bool = False) -> None:
        """Read the file now. ``strict`` (start-up): an unreadable file raises; later it is logged
        and no key of it is accepted until it is fixed."""
        with self._lock:
            sig = self._stat()
            try:
                keys = parse_keys(read_file(self.path))
                entries = tuple(KeyEntry(entry_caller(name, e), bytes.fromhex(e["hash"][7:]))
                                for name, e in keys.items())
            except (OSError, ValueError, TypeError, tomllib.TOMLDecodeError) as e:
                if strict:
                    raise ValueError(f"DIFFUSIONAPI_API_KEYS_FILE {self.path}: {e}") from None
                log.error("keys file %s is unreadable (%s): no key of it is accepted until it is fixed",
                          self.path, e)
                entries = ()
            self._entries, self._sig = entries, sig

    def entries(self) -> tuple[KeyEntry, ...]:
        if self._stat() != self._sig:
            self.reload()
        return self._entries

    def find(self, key: bytes) -> Caller | None:
        digest = hashlib.sha256(key).digest()
        found = None
        for entry in self.entries():  # every entry compared, no early exit: constant time
            if hmac.compare_digest(digest, entry.digest):
                found = entry.caller
        return found


def parse_credentials(spec: str | None) -> dict[str, str]:
    """DIFFUSIONAPI_API_AUTH 'user:pass[,user2:pass2]' -> {user: pass}; the password may itself contain ':'."""
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


def _same(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


class Authenticator:
    """Credentials -> Caller, for every route of every dialect: ``Authorization: Bearer <key>``,
    ``X-API-Key: <key>``, or Basic with the key as password (A1111 and OpenAI clients); Basic
    ``user:password`` of DIFFUSIONAPI_API_AUTH."""

    def __init__(self, settings):
        path = getattr(settings, "api_keys_file", None)
        self.keys = KeysFile(path) if path else None
        self.key = settings.api_key.encode() if settings.api_key else None
        # The admin key (model management, api/models_admin.py) passes wherever a key does.
        admin_key = getattr(settings, "admin_key", None)
        self.admin_key = admin_key.encode() if admin_key else None
        self.credentials = {u: p.encode() for u, p in parse_credentials(getattr(settings, "api_auth", None)).items()}

    @property
    def enabled(self) -> bool:
        return self.keys is not None or self.key is not None or bool(self.credentials)

    def authenticate(self, headers) -> Caller | None:
        """``headers``: ASGI (name, value) byte pairs. None: refuse (401)."""
        if not self.enabled:
            return OPEN
        seen: dict[bytes, bytes] = {}
        for name, value in headers:
            if name in _CREDENTIAL_HEADERS:
                if name in seen:
                    return None  # sent twice: which copy counts is ambiguous; refused
                seen[name] = value
        auth = seen.get(b"authorization", b"")
        basic = _basic(auth)
        if auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        elif basic is not None:
            given = basic[1].encode()
        else:
            given = seen.get(b"x-api-key", b"")
        if not given:
            return None
        if self.keys is not None:
            caller = self.keys.find(given)
            if caller is not None:
                return caller
        if self.key is not None and _same(given, self.key):
            return Caller(name=LEGACY_KEY_NAME, role="admin")
        if self.admin_key is not None and _same(given, self.admin_key):
            return Caller(name=LEGACY_KEY_NAME, role="admin")
        if basic is not None:
            expected = self.credentials.get(basic[0])
            if _same(given, expected if expected is not None else b"\0" * 16) and expected is not None:
                return Caller(name=basic[0], role="admin")
        return None

    def reload(self) -> None:
        if self.keys is not None:
            self.keys.reload()
