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
adds a private network. Checked at submit (a 4xx) and again before each attempt (DNS may
change in between).

Delivery: each webhook is a record in ``<queue dir>/webhooks/<id>.json`` (fsynced) with its
body beside it; one thread sends due deliveries, retrying with exponential backoff up to
``max_tries`` attempts, recording every attempt; a restart picks pending ones up again.
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


def _resolve(host: str, port: int) -> list[str]:
    return [ai[4][0] for ai in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def _ip(text: str):
    ip = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def check_target(url: str, allowed_hosts: Iterable[str] = ("*",), resolve: Resolver = _resolve) -> None:
    """Raise :class:`WebhookRefused` unless ``url`` may be called (see the module docstring)."""
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
    if host in names:
        return  # the operator trusts this name, wherever it points
    try:
        addrs = [_ip(a) for a in resolve(host, port)]
    except (OSError, UnicodeError) as e:
        raise WebhookRefused(f"cannot resolve host {host!r}") from e
    except ValueError as e:
        raise WebhookRefused(f"host {host!r} resolves to an invalid address") from e
    if not addrs:
        raise WebhookRefused(f"cannot resolve host {host!r}")
    for ip in addrs:
        if any(ip.version == n.version and ip in n for n in nets):
            continue
        if not any_public:
            raise WebhookRefused(f"host {host!r} is not in DIFFUSIONAPI_WEBHOOK_ALLOWED_HOSTS")
        if not ip.is_global or ip.is_multicast:
            raise WebhookRefused(f"host {host!r} resolves to a non-public address ({ip}); "
                                 "list it in DIFFUSIONAPI_WEBHOOK_ALLOWED_HOSTS to allow it")


# ---------------------------------------------------------------------------- delivery queue

class WebhookQueue:
    """Durable webhook deliveries with retries; one sender thread, never the worker's."""

    def __init__(self, directory: Path, secret: str | None, allowed_hosts: Iterable[str] = ("*",), *,
                 max_tries: int = 5, backoff_sec: float = 10.0, timeout_sec: float = 10.0,
                 keep_sec: float = 3600.0, on_record: Callable[[dict], None] | None = None):
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
        import httpx

        with httpx.Client(timeout=self.timeout_sec, follow_redirects=False, trust_env=False) as client:
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

    def run_due(self, client) -> float:
        """Attempt every due delivery once; returns seconds until the next one is due."""
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
            self._attempt(client, record)
            if self._stopping:
                break
            if record["state"] == "pending":
                next_due = min(next_due, max(record["next_attempt_at"] - time.time(), 0.0))
        return max(next_due, 0.01)

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
                check_target(record["url"], self.allowed_hosts)
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
            log.warning("webhook %s for job %s to %s failed after %d attempts: %s", record["event"],
                        record["job_id"], record["url"], n, attempt["error"])
        else:
            record["next_attempt_at"] = time.time() + self.backoff_sec * 2 ** (n - 1)
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
