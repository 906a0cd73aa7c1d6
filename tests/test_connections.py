"""Connection exhaustion (issue #31, docs/security.md "Connections"): with raw sockets, as an
attacker would. A flood of half-sent requests from one client neither keeps its sockets past the
header deadline nor holds more than its per-client cap, and another client's `/healthz` is
answered all along; the total cap refuses at once and frees the descriptor.

Flood sockets come from 127.0.0.2 (any 127/8 address reaches the server on Linux), the probe
from 127.0.0.1: two clients.
"""
from __future__ import annotations

import socket
import time

import httpx
import pytest

from diffusionapi.security.connguard import Limits, guarded_protocol

from .conftest import LiveServer, make_settings
from .test_hostile import HealthProbe

pytestmark = pytest.mark.processes  # the fast tier (./test.sh --quick) leaves these out

ATTACKER = "127.0.0.2"


def _protocols():
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    return {"httptools": HttpToolsProtocol, "h11": H11Protocol}


class GuardedServer(LiveServer):
    def __init__(self, settings, base, limits: Limits):
        import uvicorn

        super().__init__(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error",
                                                    lifespan="on", http=guarded_protocol(base, limits)))
        import threading

        self.thread = threading.Thread(target=self.server.run, daemon=True)


LIMITS = Limits(header_timeout_sec=1.5, body_timeout_sec=3.0, max_connections=400, max_connections_per_client=40)


@pytest.fixture(scope="module", params=["httptools", "h11"])
def guarded(request, model_store, tmp_path_factory):
    settings = make_settings(model_store, tmp_path_factory.mktemp("conn"))
    with GuardedServer(settings, _protocols()[request.param], LIMITS) as s:
        yield s


def _connect(server, source: str = ATTACKER) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", server.port))
    return s


def _read_all(s: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes (or the timeout: then what came)."""
    s.settimeout(timeout)
    out = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return out
            out += chunk
    except (socket.timeout, ConnectionResetError):
        return out


def test_slow_headers_flood_is_bounded_and_others_are_served(guarded):
    socks = []
    with HealthProbe(guarded.url):
        for i in range(150):  # one client, far more than its cap; half send nothing, half a part
            s = _connect(guarded)
            if i % 2:
                s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            socks.append(s)
        answers = [_read_all(s, timeout=15) for s in socks]
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    timed_out = [a for a in answers if a.startswith(b"HTTP/1.1 408")]
    assert len(refused) >= 50  # the cap (40) held; the rest were refused at once
    assert len(timed_out) + len(refused) == 150  # every socket was answered and closed: none kept
    for s in socks:
        s.close()
    assert httpx.get(guarded.url + "/healthz", timeout=5).status_code == 200


def test_slow_body_is_cut_at_the_deadline(guarded):
    s = _connect(guarded)
    s.sendall(b"POST /txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"pr")
    answer = _read_all(s, timeout=20)
    s.close()
    # The app was reading the body; the deadline closed the connection (no 200, nothing queued).
    assert b"200 OK" not in answer
    assert guarded.client.get("/queue").json()["jobs"] == []


def test_a_slow_answer_is_not_a_slow_request(guarded):
    """The deadlines cover the request's arrival only: a long-poll that outlasts them is served,
    and a kept-alive connection carries several requests."""
    job = guarded.submit(prompt="slow", width=128, height=128, steps=12, seed=1)
    with httpx.Client(base_url=guarded.url, timeout=60) as c:
        r = c.get(f"/queue/{job}", params={"wait": 30})
        assert r.status_code == 200 and r.json()["state"] == "done"
        for _ in range(3):
            assert c.get("/healthz").status_code == 200


def test_total_cap_refuses_and_frees(model_store, tmp_path_factory):
    limits = Limits(header_timeout_sec=1.0, body_timeout_sec=2.0, max_connections=10, max_connections_per_client=0)
    settings = make_settings(model_store, tmp_path_factory.mktemp("cap"))
    with GuardedServer(settings, _protocols()["httptools"], limits) as server:
        socks = [_connect(server, f"127.0.0.{3 + i}") for i in range(30)]  # many clients
        answers = [_read_all(s, timeout=15) for s in socks]
        assert sum(a.startswith(b"HTTP/1.1 503") for a in answers) >= 20
        assert all(a.startswith((b"HTTP/1.1 503", b"HTTP/1.1 408")) for a in answers)
        for s in socks:
            s.close()
        assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200


def test_the_uvicorn_command_line_takes_the_guard_and_its_settings(model_store, tmp_path):
    """What init.sh runs: `uvicorn ... --http diffusionapi.security.connguard:GuardedAuto`, the
    limits read from DIFFUSIONAPI_* settings."""
    import subprocess
    import sys

    from .conftest import ServerProcess

    srv = ServerProcess(make_settings(model_store, tmp_path, header_timeout_sec=1.0, max_connections_per_client=3))
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "diffusionapi.main:app", "--host", "127.0.0.1",
                             "--port", str(srv.port), "--log-level", "warning",
                             "--http", "diffusionapi.security.connguard:GuardedAuto"],
                            env=srv.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            try:
                if httpx.get(srv.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.time() < deadline
                time.sleep(0.2)
        socks = [_connect(srv) for _ in range(5)]
        answers = [_read_all(s, timeout=20) for s in socks]
        assert sum(a.startswith(b"HTTP/1.1 503") for a in answers) >= 2  # the per-client cap of 3
        assert sum(a.startswith(b"HTTP/1.1 408") for a in answers) >= 1  # the 1 s header deadline
        for s in socks:
            s.close()
    finally:
        proc.terminate()
        proc.wait(30)
