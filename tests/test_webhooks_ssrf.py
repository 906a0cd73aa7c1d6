"""Webhook targets and delivery under hostile conditions (issue #31): IPv6 forms that hide an IPv4
address, the address connected to is the one checked (resolved once, no DNS-rebinding window),
and deliveries run concurrently with a per-host cap (a stalling receiver delays only itself)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from diffusionapi.jobs.webhooks import WebhookQueue, WebhookRefused, check_target

from .test_webhooks import SECRET, Receiver, wait_for

EMBEDDED = [
    "64:ff9b::a00:1",        # NAT64 (well-known prefix) of 10.0.0.1
    "64:ff9b::7f00:1",       # ... of 127.0.0.1
    "64:ff9b::5db8:d822",    # ... of a public address: still refused (a gateway decides where it goes)
    "64:ff9b:1::a00:1",      # local-use NAT64 (RFC 8215)
    "2002:a00:1::1",         # 6to4 of 10.0.0.1
    "2002:5db8:d822::1",     # 6to4 of a public address
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "::a00:1",               # IPv4-compatible ::10.0.0.1
    "::5db8:d822",           # ::93.184.216.34
    "fec0::1",               # site-local (deprecated, routed inside sites)
]


@pytest.mark.parametrize("address", EMBEDDED)
def test_ipv6_forms_that_embed_ipv4_are_refused(address):
    with pytest.raises(WebhookRefused):
        check_target(f"http://[{address}]:8080/hook")  # a literal
    with pytest.raises(WebhookRefused):
        check_target("https://hooks.example/", resolve=lambda h, p: ["93.184.216.34", address])  # via DNS


def test_a_listed_network_still_allows_them():
    check_target("http://[64:ff9b::a00:1]/", ["*", "64:ff9b::/96"])


class Resolver:
    """A DNS stand-in: answers each name from a script, counting the questions."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def __call__(self, host, port):
        if host[0].isdigit():
            return [host]  # an address literal: no question asked
        self.calls.append(host)
        answer = self.answers[host]
        return answer(len(self.calls)) if callable(answer) else answer


def test_the_connection_goes_to_the_checked_address_with_the_name_kept(tmp_path):
    """hooks.test exists only in our resolver: the delivery can reach the receiver only through
    the address the check allowed, and the receiver sees the name in the Host header."""
    rx = Receiver()
    port = rx.url.split(":")[2].split("/")[0]
    dns = Resolver({"hooks.test": ["127.0.0.1"]})
    q = WebhookQueue(tmp_path / "webhooks", SECRET, ["127.0.0.1"], backoff_sec=0.01, max_tries=1, resolve=dns)
    q.start()
    try:
        q.enqueue("j1", "done", f"http://hooks.test:{port}/hook", b"{}")
        wait_for(lambda: q.deliveries("j1")[0]["state"] != "pending")
    finally:
        q.stop()
        rx.close()
    assert q.deliveries("j1")[0]["state"] == "delivered"
    assert rx.requests[0]["headers"]["Host"] == f"hooks.test:{port}"
    assert dns.calls == ["hooks.test"]  # resolved once for the attempt: checked and connected alike


def test_dns_rebinding_between_check_and_connect_cannot_reach_a_private_address(tmp_path):
    """The name answers a public address first and loopback after: whichever answer the attempt
    gets is the one it checks and connects to, so the receiver on loopback is never called."""
    rx = Receiver()
    port = rx.url.split(":")[2].split("/")[0]
    dns = Resolver({"rebind.test": lambda n: ["93.184.216.34"] if n % 2 else ["127.0.0.1"]})
    check_target(f"http://rebind.test:{port}/", resolve=dns)  # what submit saw: public
    q = WebhookQueue(tmp_path / "webhooks", SECRET, ["*"], backoff_sec=0.01, max_tries=3, resolve=dns,
                     timeout_sec=1)
    q.start()
    try:
        q.enqueue("j2", "done", f"http://rebind.test:{port}/hook", b"{}")
        wait_for(lambda: q.deliveries("j2")[0]["state"] != "pending", timeout=30)
    finally:
        q.stop()
        rx.close()
    [rec] = q.deliveries("j2")
    assert rec["state"] == "failed" and rx.requests == []
    assert any("refused" in (a["error"] or "") for a in rec["attempts"])


class StallingReceiver:
    """Holds every request until ``release`` is set; counts how many it holds at once."""

    def __init__(self):
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.now = self.most = self.done = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["content-length"]))
                with outer.lock:
                    outer.now += 1
                    outer.most = max(outer.most, outer.now)
                outer.release.wait(30)
                with outer.lock:
                    outer.now -= 1
                    outer.done += 1
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_stalling_receiver_delays_only_its_own_deliveries_and_is_capped(tmp_path):
    slow, fast = StallingReceiver(), Receiver()
    dns = Resolver({"slow.test": ["127.0.0.1"]})
    q = WebhookQueue(tmp_path / "webhooks", SECRET, ["127.0.0.1"], backoff_sec=0.01, timeout_sec=30,
                     concurrency=8, per_host=2, resolve=dns)
    q.start()
    try:
        for i in range(5):
            q.enqueue(f"s{i}", "done", f"http://slow.test:{slow.port}/hook", json.dumps({"i": i}).encode())
        wait_for(lambda: slow.now == 2)
        q.enqueue("f", "done", fast.url, b"{}")
        # Sequential delivery would wait for the stalled ones first: this would time out.
        wait_for(lambda: q.deliveries("f")[0]["state"] == "delivered")
        assert slow.done == 0 and slow.most == 2  # still stalled, and never more than 2 at once
        slow.release.set()
        wait_for(lambda: all(d["state"] == "delivered" for d in q.deliveries() if d["job_id"].startswith("s")))
    finally:
        q.stop()
        slow.close()
        fast.close()
    assert slow.done == 5 and slow.most == 2
