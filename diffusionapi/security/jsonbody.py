"""Request bodies read as JSON, safely, for both dialects.

Python's ``json`` accepts what no field of this API can use and what later code chokes on:
``NaN``/``Infinity`` and numbers that overflow to them (``1e400``), integers of hundreds of
digits (``10**400``: an OverflowError wherever a float meets it), strings holding a lone UTF-16
surrogate (``"\\ud800"``: the tokenizer fails in the worker), and nesting deep enough to exhaust
the recursion limit. :func:`parse` refuses each with a :class:`BodyError` that names the field,
before any model validation, so every such request is a 4xx and nothing is queued.

:class:`JSONBodyGuard` applies it to every JSON request body, native and ``/sdapi`` alike,
answering in the dialect's error shape; bodies that pass go on to the app unchanged.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

# Deeper than any request of this API (the deepest is an /sdapi script's argument list).
MAX_DEPTH = 64
# Integers beyond 64 bits fit no field (the largest is the seed, < 2**64).
MAX_INT = 2**64 - 1
_SURROGATE = re.compile("[\ud800-\udfff]")
# Bodies larger than this are parsed in a worker thread, not on the event loop.
THREAD_PARSE_BYTES = 64 * 1024


class BodyError(ValueError):
    def __init__(self, status: int, loc: list, message: str):
        self.status, self.loc, self.message = status, loc, message
        super().__init__(f"{field_name(loc)}: {message}")


def field_name(loc) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def parse(raw: bytes | str) -> Any:
    """The JSON value of ``raw``; BodyError for what no field can take (see the module doc).
    A body that is not JSON at all raises ``ValueError`` (``json.JSONDecodeError``, or
    ``UnicodeDecodeError``): the caller answers that as it always has."""
    try:
        value = json.loads(raw)  # NaN, Infinity and 1e400 become non-finite floats: check() names them
    except RecursionError:
        raise BodyError(400, [], f"JSON nested too deeply (at most {MAX_DEPTH} levels)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except ValueError as e:
        # int('9' * 5000): Python refuses to convert integers of more than 4300 digits.
        raise BodyError(422, [], f"a number is out of range ({e})") from None
    check(value)
    return value


def check(value: Any) -> None:
    """Walk a decoded value (iteratively: no recursion) and refuse what no field can take."""
    stack: list[tuple[Any, list]] = [(value, [])]
    while stack:
        v, loc = stack.pop()
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, str):
            m = _SURROGATE.search(v)
            if m:
                raise BodyError(422, loc, f"not valid Unicode: a lone surrogate (\\u{ord(m.group()):04x}) "
                                          "at character " + str(m.start()))
        elif isinstance(v, int):
            if abs(v) > MAX_INT:
                raise BodyError(422, loc, f"number out of range (at most {MAX_INT})")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise BodyError(422, loc, "not a finite number (NaN, Infinity, or beyond ±1.8e308)")
        elif isinstance(v, (list, dict)):
            if len(loc) >= MAX_DEPTH:
                raise BodyError(400, loc, f"JSON nested too deeply (at most {MAX_DEPTH} levels)")
            if isinstance(v, dict):
                for k, item in v.items():
                    if _SURROGATE.search(k):
                        raise BodyError(422, loc, "a key is not valid Unicode (a lone surrogate)")
                    stack.append((item, [*loc, k]))
            else:
                stack.extend((item, [*loc, i]) for i, item in enumerate(v))


def sdapi_error_body(message: str) -> dict:
    """A1111's error shape (as api/sdapi/routes.py answers), plus the native "status"."""
    return {"error": "HTTPException", "detail": message, "body": "", "errors": message, "status": "error"}


def native_error_body(e: BodyError) -> dict:
    return {"status": "error", "error": str(e), "detail": [{"loc": ["body", *e.loc], "msg": e.message}]}


_JSON_METHODS = (b"POST", b"PUT", b"PATCH")


class JSONBodyGuard:
    """ASGI middleware: every POST/PUT/PATCH body that is JSON (or any body under ``/sdapi``,
    which reads JSON whatever the Content-Type says) passes :func:`parse` before the app sees
    it. Sits inside the body-size guard, so the buffered body is already bounded. ``error_shape``
    (path, BodyError) -> the dialect's error body; by default A1111's under ``sdapi_prefix``, else
    the native one."""

    def __init__(self, app, sdapi_prefix: str = "/sdapi/", error_shape=None):
        self.app = app
        self.sdapi_prefix = sdapi_prefix
        self.error_shape = error_shape or self._default_shape

    def _default_shape(self, path: str, e: BodyError) -> dict:
        return sdapi_error_body(str(e)) if path.startswith(self.sdapi_prefix) else native_error_body(e)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method", "").encode() not in _JSON_METHODS:
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        sdapi = path.startswith(self.sdapi_prefix)
        ctype = b""
        for k, v in scope.get("headers") or ():
            if k == b"content-type":
                ctype = v.lower()
                break
        if not sdapi and ctype and b"json" not in ctype:
            return await self.app(scope, receive, send)
        chunks, more, disconnected = [], True, False
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                disconnected = True
                break
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        if body.strip() and not disconnected:
            try:
                if len(body) > THREAD_PARSE_BYTES:
                    from anyio import to_thread

                    await to_thread.run_sync(parse, body)
                else:
                    parse(body)
            except BodyError as e:
                return await _send_json(send, e.status, self.error_shape(path, e))
            except ValueError:
                pass  # not JSON (or not UTF-8): the route answers that as it always has
        sent = False

        async def replay():
            nonlocal sent
            if not sent and not disconnected:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
