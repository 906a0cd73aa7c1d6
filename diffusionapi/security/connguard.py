"""Connection limits for uvicorn, below ASGI: what a client can hold before a request even exists.

uvicorn bounds the time an *idle kept-alive* connection stays open, but not the time a request
takes to arrive: a client that opens a connection and sends nothing, or one header byte every
few seconds (slowloris), holds a socket and a file descriptor forever, and ~20,000 of them from
one client exhaust the process's descriptors, so every new connection fails — before any auth
check could run. These protocol classes add, per connection:

* a **header deadline**: the request line and headers must be complete within
  ``header_timeout_sec`` of the connection opening (or of the request's first byte, on a kept-alive
  connection); else ``408`` and the connection is closed;
* a **body deadline**: the whole request within ``body_timeout_sec`` of its first byte;
* a **per-client cap**: at most ``max_connections_per_client`` open connections per client address
  (0: no cap — behind a reverse proxy every client has the proxy's address);
* a **total cap**: at most ``max_connections`` (0: half the process's open-file limit); beyond
  either cap a new connection gets ``503`` and is closed at once, so its descriptor is freed.

Use: ``uvicorn --http diffusionapi.security.connguard:GuardedAuto`` (``init.sh`` does), or
``uvicorn.Config(app, http=guarded_protocol(base, limits))``. Limits come from
``config.Settings`` (``DIFFUSIONAPI_HEADER_TIMEOUT_SEC`` etc.) unless given.
"""
from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass

log = logging.getLogger("diffusionapi.connections")

def _response(status: str, text: str) -> bytes:
    body = text.encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


TIMEOUT_408 = _response("408 Request Timeout", "the request took too long to arrive\n")
BUSY_503 = _response("503 Service Unavailable", "too many connections\n")


@dataclass(frozen=True)
class Limits:
    header_timeout_sec: float = 10.0
    body_timeout_sec: float = 60.0
    max_connections: int = 0            # 0: half the open-file limit
    max_connections_per_client: int = 64  # 0: no cap

    @classmethod
    def from_settings(cls, settings) -> "Limits":
        return cls(settings.header_timeout_sec, settings.body_timeout_sec, settings.max_connections,
                   settings.max_connections_per_client)

    def total_cap(self) -> int:
        if self.max_connections > 0:
            return self.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return max(64, (soft if soft != resource.RLIM_INFINITY else 65536) // 2)


class _Tracker:
    """Open connections of one server, in total and per client address."""

    def __init__(self):
        self.total = 0
        self.per_client: dict[str, int] = {}

    def add(self, client: str) -> None:
        self.total += 1
        self.per_client[client] = self.per_client.get(client, 0) + 1

    def remove(self, client: str) -> None:
        self.total -= 1
        n = self.per_client.get(client, 1) - 1
        if n <= 0:
            self.per_client.pop(client, None)
        else:
            self.per_client[client] = n


def _tracker(server_state) -> _Tracker:
    tracker = getattr(server_state, "_diffusionapi_connections", None)
    if tracker is None:
        tracker = _Tracker()
        server_state._diffusionapi_connections = tracker
    return tracker


class _GuardMixin:
    """Shared by the httptools and h11 variants; ``_limits`` is set on the concrete class."""

    _limits: Limits | None = None
    _cap: int | None = None

    @classmethod
    def limits(cls) -> Limits:
        if cls._limits is None:  # the uvicorn CLI: read the settings once, on first use
            from ..config import get_settings

            cls._limits = Limits.from_settings(get_settings())
        if cls._cap is None:
            cls._cap = cls._limits.total_cap()
        return cls._limits

    def _guard_start(self, transport) -> bool:
        limits = self.limits()
        self._deadline: asyncio.TimerHandle | None = None
        self._counted = False
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        tracker = self._tracker = _tracker(self.server_state)
        over = tracker.total >= self._cap or (
            limits.max_connections_per_client > 0
            and tracker.per_client.get(self._peer, 0) >= limits.max_connections_per_client)
        if over:
            log.warning("refusing a connection from %s: %d open from it, %d in all", self._peer,
                        tracker.per_client.get(self._peer, 0), tracker.total)
            transport.write(BUSY_503)
            transport.close()
            return False
        tracker.add(self._peer)
        self._counted = True
        self._arm(limits.header_timeout_sec)
        return True

    def _arm(self, seconds: float) -> None:
        self._disarm()
        if seconds > 0:
            self._deadline = self.loop.call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        deadline = getattr(self, "_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        log.info("closing a connection from %s: its request did not arrive in time", self._peer)
        if not self._response_started():
            self.transport.write(TIMEOUT_408)
        self.transport.close()

    def _response_started(self) -> bool:
        cycle = getattr(self, "cycle", None)
        return cycle is not None and getattr(cycle, "response_started", False)

    def _guard_end(self) -> None:
        self._disarm()
        if getattr(self, "_counted", False):
            self._counted = False
            self._tracker.remove(self._peer)


def guarded_protocol(base: type, limits: Limits | None = None) -> type:
    """``base`` (uvicorn's HttpToolsProtocol or H11Protocol) with the deadlines and caps."""
    name = f"Guarded{base.__name__}"
    if base.__name__ == "HttpToolsProtocol":
        class Guarded(_GuardMixin, base):
            def connection_made(self, transport):
                super().connection_made(transport)
                self._request_began = self.loop.time()
                if not self._guard_start(transport):
                    self.connections.discard(self)

            def connection_lost(self, exc):
                self._guard_end()
                super().connection_lost(exc)

            def on_message_begin(self):
                super().on_message_begin()
                if self._deadline is None:  # a new request on a kept-alive connection
                    self._request_began = self.loop.time()
                    self._arm(self.limits().header_timeout_sec)

            def on_headers_complete(self):
                super().on_headers_complete()
                left = self.limits().body_timeout_sec - (self.loop.time() - self._request_began)
                self._arm(max(left, 0.001))

            def on_message_complete(self):
                self._disarm()  # the request is in: the app may take as long as it needs
                super().on_message_complete()
    else:
        import h11

        class Guarded(_GuardMixin, base):
            def connection_made(self, transport):
                super().connection_made(transport)
                self._request_began = self.loop.time()
                self._phase = "headers"
                if not self._guard_start(transport):
                    self.connections.discard(self)

            def connection_lost(self, exc):
                self._guard_end()
                super().connection_lost(exc)

            def data_received(self, data):
                if self._deadline is None and self.conn.their_state in (h11.IDLE, h11.DONE):
                    # the first bytes of a new request on a kept-alive connection
                    self._request_began, self._phase = self.loop.time(), "headers"
                    self._arm(self.limits().header_timeout_sec)
                super().data_received(data)
                state = self.conn.their_state
                if state is h11.SEND_BODY and self._phase == "headers":
                    self._phase = "body"
                    left = self.limits().body_timeout_sec - (self.loop.time() - self._request_began)
                    self._arm(max(left, 0.001))
                elif state is not h11.IDLE and state is not h11.SEND_BODY:
                    self._disarm()  # the request is in (or the connection is ending)
                    self._phase = "done"

    Guarded.__name__ = Guarded.__qualname__ = name
    Guarded._limits = limits
    Guarded._cap = limits.total_cap() if limits is not None else None
    return Guarded


def _httptools():
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    return HttpToolsProtocol


def _h11():
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return H11Protocol


def __getattr__(name: str):
    # Import strings for `uvicorn --http ...`; built on first use, reading config.Settings.
    if name == "GuardedHttpTools":
        value = guarded_protocol(_httptools())
    elif name == "GuardedH11":
        value = guarded_protocol(_h11())
    elif name == "GuardedAuto":  # httptools when installed (as uvicorn's "auto" chooses), else h11
        try:
            value = guarded_protocol(_httptools())
        except ImportError:
            value = guarded_protocol(_h11())
    else:
        raise AttributeError(name)
    globals()[name] = value
    return value
