"""Webhooks: signing, the allowed-target check, and a durable delivery queue.

Signature (header ``X-DiffusionAPI-Signature``)::

    t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + raw body bytes)>

The timestamp is the time of that attempt (each retry is signed afresh). A receiver
recomputes the HMAC over the exact body it received, compares in constant time, and
rejects timestamps older than a few minutes (replay). ``X-DiffusionAPI-Delivery`` is the
delivery id (the same on every retry: a receiver can drop duplicates by it) and
``X-DiffusionAPI-Event`` the event name. :func:`verify` is a reference implementation.

Targets: http(s) only, no redirects followed. Every address a host name resolves to must be a
public one, unless the operator lists the host, its address or a network containing it in
``DIFFUSIONAPI_WEBHOOK_ALLOWED_HOSTS``; the list replaces the default ``["*"]`` (``*`` = any
public host), so ``["hooks.example.com"]`` allows that host only and ``["*", "10.0.0.0/8"]``
adds a private network. IPv6 forms that embed an IPv4 address (NAT64 ``64:ff9b::/96`` and
``64:ff9b:1::/48``, 6to4 ``2002::/16``, Teredo ``2001::/32``, IPv4-compatible ``::a.b.c.d``) and
the deprecated site-local ``fec0::/10`` are refused unless a listed network contains them: a
gateway would carry them to whatever IPv4 address they hide. Checked at submit (a 4xx) and at
each attempt, where the host is resolved **once** and the connection goes to an address that
passed the check (the Host header and TLS SNI keep the name): DNS cannot answer the check one
address and the connection another (rebinding).

Delivery: each webhook is a record in ``<queue dir>/webhooks/<id>.json`` (fsynced) with its
body beside it; one thread hands due deliveries to ``concurrency`` sender threads, at most
``per_host`` at a time to one host (a stalling receiver delays only its own deliveries), retrying
with exponential backoff up to ``max_tries`` attempts, recording every attempt; a restart picks
pending ones up again.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlsplit

from ..files import write_atomic

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-DiffusionAPI-Signature"
EVENT_HEADER = "X-DiffusionAPI-Event"
DELIVERY_HEADER = "X-DiffusionAPI-Delivery"
from .states import WEBHOOK_EVENTS  # noqa: E402,F401 - re-exported: what a webhook may subscribe to


# ---------------------------------------------------------------------------- signing

def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else int(timestamp)
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str, header: str, body: bytes, tolerance_sec: float = 300, now: float | None = None) -> bool:
    """True when ``header`` signs ``body`` under ``secret`` and is at most ``tolerance_sec`` old."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        t = int(parts["t"])
        mac = parts["v1"]
    except (ValueError, KeyError):
        return False
    now = time.time() if now is None else now
    if abs(now - t) > tolerance_sec:
        return False
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, mac)


# ---------------------------------------------------------------------------- targets

class WebhookRefused(ValueError):
    """The URL may not be called; the message says why."""


Resolver = Callable[[str, int], Iterable[str]]


def resolve_host(host: str, port: int) -> list[str]:
    return [ai[4][0] for ai in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def _ip(text: str):
    ip = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


# IPv6 ranges that carry (or route to) an IPv4 address, and the deprecated site-local range:
# a NAT64 or 6to4 gateway turns 64:ff9b::a00:1 into 10.0.0.1.
EMBEDDED_IPV4_NETS = tuple(ipaddress.ip_network(n) for n in (
    "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32", "::/96", "fec0::/10"))


def _parse_target(url: str) -> tuple[str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise WebhookRefused(f"not a valid URL: {e}") from e
    if parts.scheme not in ("http", "https"):
        raise WebhookRefused("only http and https URLs are allowed")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise WebhookRefused("the URL has no host")
    return host, port


def check_target(url: str, allowed_hosts: Iterable[str] = ("*",), resolve: Resolver = resolve_host) -> None:
    """Raise :class:`WebhookRefused` unless ``url`` may be called (see the module docstring)."""
    host, port = _parse_target(url)
    if host in {e.strip().lower().rstrip(".") for e in allowed_hosts}:
        return  # the operator trusts this name, wherever it points (it is resolved when connecting)
    checked_addresses(host, port, allowed_hosts, resolve)


def checked_addresses(host: str, port: int, allowed_hosts: Iterable[str] = ("*",),
                      resolve: Resolver = resolve_host) -> list[str]:
    """The addresses ``host`` resolves to (resolved once), every one allowed; WebhookRefused if any
    is not. A connection to one of these is a connection to what was checked."""
    host = host.lower().rstrip(".").strip("[]")
    names, nets, any_public = set(), [], False
    for entry in allowed_hosts:
        entry = entry.strip().lower().rstrip(".")
        if entry == "*":
            any_public = True
            continue
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            names.add(entry)
    try:
        raw = list(resolve(host, port))
        addrs = [_ip(a) for a in raw]
    except (OSError, UnicodeError) as e:
        raise WebhookRefused(f"cannot resolve host {host!r}") from e
    except ValueError as e:
        raise WebhookRefused(f"host {host!r} resolves to an invalid address") from e
    if not addrs:
        raise WebhookRefused(f"cannot resolve host {host!r}")
    if host in names:
        return raw  # the operator trusts this name, wherever it points
    for ip in addrs:
        if any(ip.version == n.version and ip in n for n in nets):
            continue
        if not any_public:
            raise WebhookRefused(f"host {host!r} is not in DIFFUSIONAPI_WEBHOOK_ALLOWED_HOSTS")
        if not ip.is_global or ip.is_multicast:
            raise WebhookRefused(f"host {host!r} resolves to a non-public address ({ip}); "
                                 "list it in DIFFUSIONAPI_WEBHOOK_ALLOWED_HOSTS to allow it")
        if ip.version == 6 and any(ip in n for n in EMBEDDED_IPV4_NETS):
            raise WebhookRefused(f"host {host!r} resolves to {ip}, an IPv6 form that embeds or routes to an "
                                 "IPv4 address (NAT64, 6to4, Teredo, IPv4-compatible) or is site-local; "
                                 "list its network in DIFFUSIONAPI_WEBHOOK_ALLOWED_HOSTS to allow it")
    return raw


def pinned_client(allowed_hosts: Iterable[str], timeout_sec: float, resolve: Resolver = resolve_host,
                  max_connections: int = 16):
    """An httpx client whose every TCP connection goes to an address :func:`checked_addresses`
    just allowed for the URL's host (resolved once per connection); TLS still verifies, and SNI
    and the Host header still carry, the name. No proxies from the environment, no redirects."""
    import httpcore
    import httpx

    allowed = list(allowed_hosts)

    class PinnedBackend(httpcore.SyncBackend):
        def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            error: Exception | None = None
            for address in checked_addresses(host, port, allowed, resolve):
                try:
                    return super().connect_tcp(address, port, timeout, local_address, socket_options)
                except httpcore.ConnectError as e:  # the next address, as getaddrinfo users do
                    error = e
            raise error or httpcore.ConnectError(f"cannot connect to {host}")

    class PinnedTransport(httpx.HTTPTransport):
        def __init__(self):  # HTTPTransport's request handling over a pool with our backend
            self._pool = httpcore.ConnectionPool(ssl_context=httpx.create_ssl_context(trust_env=False),
                                                 max_connections=max_connections,
                                                 network_backend=PinnedBackend())

    return httpx.Client(transport=PinnedTransport(), timeout=timeout_sec, follow_redirects=False, trust_env=False)


def _host_key(url: str) -> str:
    try:
        parts = urlsplit(url)
        return f"{(parts.hostname or '').lower()}:{parts.port or ''}"
    except ValueError:
        return url


# ---------------------------------------------------------------------------- delivery queue

class WebhookQueue:
    """Durable webhook deliveries with retries; one sender thread, never the worker's."""

    def __init__(self, directory: Path, secret: str | None, allowed_hosts: Iterable[str] = ("*",), *,
                 max_tries: int = 5, backoff_sec: float = 10.0, timeout_sec: float = 10.0,
                 keep_sec: float = 3600.0, on_record: Callable[[dict], None] | None = None,
                 concurrency: int = 8, per_host: int = 2, resolve: Resolver = resolve_host):
        self.dir = Path(directory)
        self.secret = secret
        self.allowed_hosts = list(allowed_hosts)
        self.max_tries = max_tries
        self.backoff_sec = backoff_sec
        self.timeout_sec = timeout_sec
        self.keep_sec = keep_sec
        # Told each record as written (a cluster worker mirrors them to Redis for GET /queue).
        self.on_record = on_record
        self._cond = threading.Condition()
        self._lock = threading.Lock()  # record files: one writer at a time
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.concurrency, self.per_host, self.resolve = max(1, concurrency), max(1, per_host), resolve
        self._inflight: set[str] = set()          # delivery ids being attempted now
        self._host_load: dict[str, int] = {}      # attempts in flight per host
        self._senders = None                      # ThreadPoolExecutor while started

    # records ------------------------------------------------------------
    def _record_path(self, delivery_id: str) -> Path:
        return self.dir / f"{delivery_id}.json"

    def _body_path(self, delivery_id: str) -> Path:
        return self.dir / f"{delivery_id}.body"

    def _write(self, record: dict) -> None:
        write_atomic(self._record_path(record["id"]), json.dumps(record).encode(), fsync=True)
        if self.on_record is not None:
            try:
                self.on_record(dict(record))
            except Exception as e:  # noqa: BLE001 - the file is the record; a mirror may lag
                log.warning("webhook record %s not mirrored: %s", record["id"], e)

    def _records(self) -> list[dict]:
        out = []
        if not self.dir.is_dir():
            return out
        for p in self.dir.glob("*.json"):
            try:
                out.append(json.loads(p.read_bytes()))
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as e:
                log.error("webhook record %s is unreadable (%s); removed", p.name, e)
                p.unlink(missing_ok=True)
        out.sort(key=lambda r: r.get("created_at", 0))
        return out

    def enqueue(self, job_id: str, event: str, url: str, body: bytes, *, max_tries: int | None = None) -> str:
        """Record a delivery durably and wake the sender; returns the delivery id."""
        self.dir.mkdir(parents=True, exist_ok=True)
        delivery_id = str(uuid.uuid4())
        write_atomic(self._body_path(delivery_id), body, fsync=True)
        now = time.time()
        record = {"id": delivery_id, "job_id": job_id, "event": event, "url": url, "created_at": now,
                  "state": "pending", "max_tries": max_tries or self.max_tries, "next_attempt_at": now,
                  "attempts": []}
        with self._lock:
            self._write(record)
        with self._cond:
            self._cond.notify()
        return delivery_id

    def deliveries(self, job_id: str | None = None) -> list[dict]:
        """Recorded deliveries (pending ones and those finished within ``keep_sec``)."""
        return [{k: v for k, v in r.items() if k != "created_at"} for r in self._records()
                if job_id is None or r.get("job_id") == job_id]

    # sending ------------------------------------------------------------
    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="diffusionapi-webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread:
            self._thread.join(timeout)

    def _loop(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._senders = ThreadPoolExecutor(self.concurrency, thread_name_prefix="diffusionapi-webhook-send")
        with pinned_client(self.allowed_hosts, self.timeout_sec, self.resolve, self.concurrency) as client:
            try:
                while True:
                    with self._cond:
                        if self._stopping:
                            return
                    try:
                        wait = self.run_due(client)
                    except Exception:  # noqa: BLE001 - the sender must survive anything
                        log.exception("webhook sender failed; retrying")
                        wait = 1.0
                    with self._cond:
                        if self._stopping:
                            return
                        self._cond.wait(wait)
            finally:
                # Attempts in flight finish (each within timeout_sec) and are recorded before the client closes.
                self._senders.shutdown(wait=True, cancel_futures=True)

    def run_due(self, client) -> float:
        """Start an attempt of every due delivery (in the sender threads, within the per-host cap;
        without them, here, one after another); returns seconds until the next one is due. A
        finished attempt wakes the loop, so a delivery held back by the cap goes next."""
        now = time.time()
        next_due = 60.0
        for record in self._records():
            if record["state"] != "pending":
                finished_at = record["attempts"][-1]["at"] if record["attempts"] else 0
                if now - finished_at > self.keep_sec:
                    self._record_path(record["id"]).unlink(missing_ok=True)
                continue
            if record["next_attempt_at"] > now:
                next_due = min(next_due, record["next_attempt_at"] - now)
                continue
            if self._stopping:
                break
            if self._senders is None:
                self._attempt(client, record)
                continue
            host = _host_key(record["url"])
            with self._cond:
                if record["id"] in self._inflight or self._host_load.get(host, 0) >= self.per_host:
                    continue
                self._inflight.add(record["id"])
                self._host_load[host] = self._host_load.get(host, 0) + 1
            self._senders.submit(self._send, client, record, host)
        return max(next_due, 0.01)

    def _send(self, client, record: dict, host: str) -> None:
        try:
            self._attempt(client, record)
        except Exception:  # noqa: BLE001 - a sender thread must survive anything
            log.exception("webhook delivery %s failed unexpectedly", record.get("id"))
        finally:
            with self._cond:
                self._inflight.discard(record["id"])
                self._host_load[host] -= 1
                if not self._host_load[host]:
                    del self._host_load[host]
                self._cond.notify_all()

    def _attempt(self, client, record: dict) -> None:
        attempt: dict = {"at": time.time(), "status_code": None, "error": None}
        try:
            body = self._body_path(record["id"]).read_bytes()
        except OSError as e:
            body = None
            attempt["error"] = f"body file missing: {e}"
        if body is not None:
            try:
                if not self.secret:
                    raise WebhookRefused("DIFFUSIONAPI_WEBHOOK_SECRET is not set")
                _parse_target(record["url"])  # the scheme; the addresses are checked as the client connects
                r = client.post(record["url"], content=body, headers={
                    "content-type": "application/json", SIGNATURE_HEADER: sign(self.secret, body),
                    EVENT_HEADER: record["event"], DELIVERY_HEADER: record["id"]})
                attempt["status_code"] = r.status_code
                if not 200 <= r.status_code < 300:
                    attempt["error"] = f"HTTP {r.status_code}"
            except WebhookRefused as e:
                attempt["error"] = f"refused: {e}"
            except Exception as e:  # noqa: BLE001 - network errors of every kind are a failed attempt
                attempt["error"] = f"{type(e).__name__}: {e}"
        record["attempts"].append(attempt)
        n = len(record["attempts"])
        if attempt["error"] is None:
            record["state"] = "delivered"
        elif n >= record["max_tries"] or body is None:
            record["state"] = "failed"
        else:
            record["next_attempt_at"] = time.time() + self.backoff_sec * 2 ** (n - 1)
        from . import observe  # its log record and metric (one per attempt)

        observe.webhook_attempt(record, attempt, "retrying" if record["state"] == "pending" else record["state"])
        with self._lock:
            self._write(record)
        if record["state"] != "pending":
            self._body_path(record["id"]).unlink(missing_ok=True)



def check_webhook(hook: dict | None, settings) -> str | None:
    """Why a request's ``webhook`` cannot be accepted (a 4xx message naming the field), or None."""
    if not hook:
        return None
    if not settings.webhook_secret:
        return "webhook: this server does not send webhooks (DIFFUSIONAPI_WEBHOOK_SECRET is not set)"
    try:
        check_target(hook["url"], settings.webhook_allowed_hosts)
    except WebhookRefused as e:
        return f"webhook.url: {e}"
    return None
