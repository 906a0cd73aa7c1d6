"""Webhook signing, the target check (SSRF), and the durable delivery queue against a real receiver."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from diffusionapi.jobs.webhooks import (DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, WebhookQueue,
                                   WebhookRefused, check_target, sign, verify)

SECRET = "s3cret"


# ---------------------------------------------------------------------------- signing

def test_signature_scheme_is_hmac_sha256_of_timestamp_dot_body():
    import hashlib
    import hmac

    body = b'{"state": "done"}'
    header = sign(SECRET, body, timestamp=1_700_000_000)
    expected = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert verify(SECRET, header, body, now=1_700_000_100)


def test_verify_rejects_tampering_wrong_secret_replay_and_garbage():
    body = b'{"a": 1}'
    header = sign(SECRET, body, timestamp=1_700_000_000)
    assert not verify(SECRET, header, b'{"a": 2}', now=1_700_000_000)
    assert not verify("other", header, body, now=1_700_000_000)
    assert not verify(SECRET, header, body, now=1_700_000_000 + 301)  # too old: a replay
    # The timestamp is signed: moving it forward breaks the MAC.
    forged = header.replace("t=1700000000", "t=1700000400")
    assert not verify(SECRET, forged, body, now=1_700_000_400)
    assert not verify(SECRET, "nonsense", body)


# ---------------------------------------------------------------------------- targets

def resolver(table):
    return lambda host, port: table[host]


@pytest.mark.parametrize("url", ["http://127.0.0.1/x", "http://localhost:8080/", "http://[::1]/",
                                 "http://10.1.2.3/", "http://192.168.0.5/", "http://172.16.0.1/",
                                 "http://169.254.169.254/latest/meta-data", "http://0.0.0.0/",
                                 "http://[::ffff:127.0.0.1]/", "http://100.64.0.1/"])
def test_private_loopback_and_link_local_targets_are_refused_by_default(url):
    with pytest.raises(WebhookRefused, match="non-public"):
        check_target(url)  # real resolution: these are literal addresses or /etc/hosts names


def test_a_public_name_that_resolves_to_a_private_address_is_refused():
    with pytest.raises(WebhookRefused, match="non-public"):
        check_target("https://rebind.example/", resolve=resolver({"rebind.example": ["93.184.216.34", "10.0.0.7"]}))
    check_target("https://ok.example/hook", resolve=resolver({"ok.example": ["93.184.216.34"]}))


def test_scheme_and_unresolvable_hosts_are_refused():
    with pytest.raises(WebhookRefused, match="http and https"):
        check_target("ftp://93.184.216.34/")
    with pytest.raises(WebhookRefused, match="no host"):
        check_target("http:///path")

    def fail(host, port):
        raise OSError("no such host")
    with pytest.raises(WebhookRefused, match="cannot resolve"):
        check_target("http://nowhere.invalid/", resolve=fail)


def test_operator_listed_hosts_networks_and_strict_lists():
    check_target("http://127.0.0.1:9000/", ["127.0.0.1"])
    check_target("http://10.2.3.4/", ["*", "10.0.0.0/8"])
    check_target("http://hooks.internal/", ["hooks.internal"], resolve=resolver({}))  # listed name: trusted
    with pytest.raises(WebhookRefused, match="not in DIFFUSIONAPI_WEBHOOK_ALLOWED_HOSTS"):
        check_target("https://public.example/", ["127.0.0.1"],
                     resolve=resolver({"public.example": ["93.184.216.34"]}))
    with pytest.raises(WebhookRefused, match="non-public"):
        check_target("http://192.168.1.1/", ["*", "10.0.0.0/8"])


# ---------------------------------------------------------------------------- delivery

class Receiver:
    """A real HTTP receiver on 127.0.0.1 that answers ``statuses`` in turn (then 200)."""

    def __init__(self, statuses=()):
        self.statuses = list(statuses)
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                code = outer.statuses.pop(0) if outer.statuses else 200
                outer.requests.append({"headers": dict(self.headers), "body": body, "code": code})
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def successes(self):
        return [r for r in self.requests if r["code"] == 200]


def wait_for(cond, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise TimeoutError


def test_fails_twice_then_one_signed_delivery_with_every_attempt_recorded(tmp_path):
    rx = Receiver([500, 503])
    q = WebhookQueue(tmp_path / "webhooks", SECRET, ["127.0.0.1"], backoff_sec=0.05)
    q.start()
    try:
        body = json.dumps({"job_id": "j1", "state": "done"}).encode()
        delivery = q.enqueue("j1", "done", rx.url, body)
        wait_for(lambda: q.deliveries("j1")[0]["state"] != "pending")
    finally:
        q.stop()
        rx.close()
    assert len(rx.requests) == 3 and len(rx.successes) == 1
    ok = rx.successes[0]
    assert ok["body"] == body
    assert verify(SECRET, ok["headers"][SIGNATURE_HEADER], ok["body"])
    assert ok["headers"][EVENT_HEADER] == "done" and ok["headers"][DELIVERY_HEADER] == delivery
    [rec] = q.deliveries("j1")
    assert rec["state"] == "delivered"
    assert [a["status_code"] for a in rec["attempts"]] == [500, 503, 200]
    assert rec["attempts"][0]["error"] == "HTTP 500" and rec["attempts"][2]["error"] is None
    assert not (tmp_path / "webhooks" / f"{delivery}.body").exists()  # delivered: body not kept


def test_gives_up_after_max_tries(tmp_path):
    rx = Receiver([500] * 10)
    q = WebhookQueue(tmp_path / "webhooks", SECRET, ["127.0.0.1"], backoff_sec=0.01, max_tries=5)
    q.start()
    try:
        q.enqueue("j2", "error", rx.url, b"{}")
        wait_for(lambda: q.deliveries("j2")[0]["state"] != "pending")
    finally:
        q.stop()
        rx.close()
    [rec] = q.deliveries("j2")
    assert rec["state"] == "failed" and len(rec["attempts"]) == 5 == len(rx.requests)


def test_a_restart_between_attempts_still_delivers(tmp_path):
    rx = Receiver([500])
    q = WebhookQueue(tmp_path / "webhooks", SECRET, ["127.0.0.1"], backoff_sec=0.3)
    q.start()
    q.enqueue("j3", "done", rx.url, b'{"n": 1}')
    wait_for(lambda: len(rx.requests) == 1)
    q.stop()  # "crash" between the failed attempt and the retry
    assert q.deliveries("j3")[0]["state"] == "pending"
    q2 = WebhookQueue(tmp_path / "webhooks", SECRET, ["127.0.0.1"], backoff_sec=0.3)
    q2.start()
    try:
        wait_for(lambda: q2.deliveries("j3")[0]["state"] == "delivered")
    finally:
        q2.stop()
        rx.close()
    assert len(rx.successes) == 1 and rx.successes[0]["body"] == b'{"n": 1}'


def test_a_target_refused_at_delivery_time_is_not_called(tmp_path):
    rx = Receiver()
    q = WebhookQueue(tmp_path / "webhooks", SECRET, ["*"], backoff_sec=0.01, max_tries=2)
    q.start()
    try:
        q.enqueue("j4", "done", rx.url, b"{}")  # loopback, not listed
        wait_for(lambda: q.deliveries("j4")[0]["state"] != "pending")
    finally:
        q.stop()
        rx.close()
    [rec] = q.deliveries("j4")
    assert rec["state"] == "failed" and "refused" in rec["attempts"][0]["error"]
    assert rx.requests == []

