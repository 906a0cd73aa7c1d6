"""`/sdapi` credentials: the service's one check (``security/auth.py``), which the guard middleware
(``main.py``) applies to every route of both dialects. Kept as a name for the adapter's state and
for tests that call it with a plain header mapping."""
from __future__ import annotations

from collections.abc import Mapping

from ...security.auth import Access, parse_credentials

__all__ = ["SdapiAuth", "parse_credentials"]


class SdapiAuth(Access):
    def __init__(self, api_auth: str | None, api_key: str | None):
        super().__init__(api_key, api_auth)

    def allows(self, headers) -> bool:
        if isinstance(headers, Mapping):  # {"authorization": "..."}: one value per name
            headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        return super().allows(headers)
