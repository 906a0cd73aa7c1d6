"""Models installed over the API (#27): a real server with the real engine and tiny models, a
local HTTP server (loopback allowed explicitly by DIFFUSIONAPI_MODEL_INSTALL_ALLOWED_HOSTS)
serving a tiny LoRA built in code: progress events, sha256 checked, an interrupted download
resumed with a Range request, the LoRA then used by a job; admin key only; private addresses
refused by default."""
from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from diffusionapi.demo import tiny_sd15_pipeline
from tests.conftest import SMALL, LiveServer, make_settings
from tests.tiny_files import write_tiny_lora

pytestmark = pytest.mark.timeout(300)

ADMIN = {"X-API-Key": "admin-key"}
USER = {"X-API-Key": "user-key"}


class FileServer:
    """Serves ``files`` (path -> bytes) with Range support. ``slow``: in 10 pieces 0.1 s apart;
    ``drop_once``: paths whose first full request is cut off halfway (the connection closes)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.slow: set[str] = set()
        self.drop_once: set[str] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                rng = self.headers.get("Range")
                outer.requests.append((self.path, rng))
                data = outer.files.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                body = data[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if self.path in outer.drop_once and not rng:
                    outer.drop_once.discard(self.path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                pieces = 10 if self.path in outer.slow else 1
                step = -(-len(body) // pieces)
                for i in range(0, len(body), step):
                    self.wfile.write(body[i:i + step])
                    self.wfile.flush()
                    if pieces > 1:
                        time.sleep(0.1)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture(scope="module")
def setup(model_store, tmp_path_factory):
    work = tmp_path_factory.mktemp("install")
    sd = tiny_sd15_pipeline(0)
    files = {}
    for i, name in enumerate(("style-a", "style-b", "style-c")):
        path = write_tiny_lora(sd, work / "src" / f"{name}.safetensors", "kohya", seed=10 + i)
        files[f"/files/{name}.safetensors"] = path.read_bytes()
    fs = FileServer(files)
    settings = make_settings(model_store, work, loras_dir=work / "loras", api_key="user-key", admin_key="admin-key",
                             model_install_allowed_hosts=["*", "127.0.0.1"])  # the test's server is on loopback
    with LiveServer(settings) as s:
        yield s, fs
    fs.close()


def _install(s, **body) -> httpx.Response:
    return s.client.post("/models/install", json=body, headers=ADMIN)


def _final(s, job_id, timeout=120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        body = s.client.get(f"/queue/{job_id}", params={"wait": 5}, headers=ADMIN).json()
        if body["state"] in ("done", "error", "cancelled"):
            return body
    raise TimeoutError(job_id)


def _events(s, job_id) -> list[tuple[str, dict]]:
    """The job's event stream to its end: (event, data) pairs."""
    out, kind = [], None
    with s.client.stream("GET", f"/queue/{job_id}/events", headers=ADMIN, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind:
                out.append((kind, json.loads(line.split(":", 1)[1])))
                if kind in ("done", "error", "cancelled"):
                    break
    return out


def test_install_with_progress_events_then_the_lora_generates(setup):
    s, fs = setup
    path = "/files/style-a.safetensors"
    fs.slow.add(path)
    digest = hashlib.sha256(fs.files[path]).hexdigest()
    r = _install(s, url=fs.url + path, kind="lora", sha256=digest)
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]
    assert r.json()["path"].endswith("loras/style-a.safetensors")
    events = _events(s, job_id)
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done", events
    downloading = [d["progress"] for k, d in events if k == "progress" and d["phase"] == "downloading"]
    assert len(downloading) >= 2 and downloading == sorted(downloading) and downloading[-1] > 0
    assert any(k == "progress" and d["phase"] == "verifying" for k, d in events)
    installed = s.settings.loras_dir / "style-a.safetensors"
    assert hashlib.sha256(installed.read_bytes()).hexdigest() == digest
    assert not list(s.settings.loras_dir.glob(".*.part"))
    assert "style-a" in [e["name"] for e in s.client.get("/loras", headers=USER).json()["loras"]]
    job = s.client.post("/txt2img", json=dict(SMALL, model="tiny-sd15", loras=["style-a"]), headers=USER)
    assert job.status_code == 200, job.text
    assert _final(s, job.json()["job_id"])["state"] == "done"
    # Deleted over the API: gone from the listing and the folder.
    d = s.client.delete("/models/style-a", params={"kind": "lora"}, headers=ADMIN)
    assert d.status_code == 200 and not installed.exists()
    assert "style-a" not in [e["name"] for e in s.client.get("/loras", headers=USER).json()["loras"]]
    assert s.client.post("/models/rescan", headers=ADMIN).json()["loras"] == 0


def test_sha256_mismatch_fails_and_leaves_nothing(setup):
    s, fs = setup
    r = _install(s, url=fs.url + "/files/style-b.safetensors", kind="lora", sha256="0" * 64)
    body = _final(s, r.json()["job_id"])
    assert body["state"] == "error" and "sha256 mismatch" in body["error"]
    assert not any(s.settings.loras_dir.iterdir())  # neither the file nor its partial download


def test_an_interrupted_download_resumes_where_it_stopped(setup):
    s, fs = setup
    path = "/files/style-c.safetensors"
    fs.drop_once.add(path)
    digest = hashlib.sha256(fs.files[path]).hexdigest()
    r = _install(s, url=fs.url + path, kind="lora", name="resumed", sha256=digest)
    assert _final(s, r.json()["job_id"])["state"] == "done"
    ranges = [rng for p, rng in fs.requests if p == path]
    assert ranges[0] is None and ranges[1] == f"bytes={len(fs.files[path]) // 2}-", ranges
    assert hashlib.sha256((s.settings.loras_dir / "resumed.safetensors").read_bytes()).hexdigest() == digest


def test_admin_key_only_and_private_addresses_refused(setup):
    s, fs = setup
    url = fs.url + "/files/style-a.safetensors"
    assert s.client.post("/models/install", json={"url": url, "kind": "lora"}, headers=USER).status_code == 403
    assert s.client.post("/models/install", json={"url": url, "kind": "lora"}).status_code == 401
    assert s.client.post("/models/rescan", headers=USER).status_code == 403
    assert s.client.delete("/models/tiny-sd15", headers=USER).status_code == 403
    private = _install(s, url="http://10.11.12.13/files/x.safetensors", kind="lora")
    assert private.status_code == 422 and "non-public address" in private.json()["error"], private.text
    assert "MODEL_INSTALL_ALLOWED_HOSTS" in private.json()["error"]
    bad_name = _install(s, url=fs.url + "/files/style-a.safetensors", kind="lora", name="../evil")
    assert bad_name.status_code == 422


def _direct_settings(allowed):
    from types import SimpleNamespace

    return SimpleNamespace(model_install_max_gb=1.0, model_install_allowed_hosts=allowed, hf_token=None,
                           civitai_token=None)


def test_the_download_connects_to_the_address_the_check_allowed(setup, tmp_path):
    # files.test exists only in the scripted resolver: the file can arrive only through the address
    # the check allowed, resolved once per connection (the webhooks' pinned client).
    from diffusionapi.models_install import download
    from tests.test_webhooks_ssrf import Resolver

    _, fs = setup
    port = fs.url.rsplit(":", 1)[1]
    dns = Resolver({"files.test": ["127.0.0.1"]})
    part = tmp_path / ".a.part"
    download(_direct_settings(["127.0.0.1"]), f"http://files.test:{port}/files/style-a.safetensors", part,
             progress=lambda *a: None, cancelled=lambda: False, resolve=dns)
    assert part.read_bytes() == fs.files["/files/style-a.safetensors"]
    assert dns.calls == ["files.test", "files.test"]  # the check, then the connection


def test_a_name_that_rebinds_to_loopback_after_the_check_reaches_nothing(setup, tmp_path):
    from diffusionapi.jobs.states import JobFailed
    from diffusionapi.models_install import download
    from tests.test_webhooks_ssrf import Resolver

    _, fs = setup
    port = fs.url.rsplit(":", 1)[1]
    dns = Resolver({"rebind.test": lambda n: ["93.184.216.34"] if n % 2 else ["127.0.0.1"]})
    seen = len(fs.requests)
    with pytest.raises(JobFailed, match="127.0.0.1"):
        download(_direct_settings(["*"]), f"http://rebind.test:{port}/files/style-a.safetensors",
                 tmp_path / ".b.part", progress=lambda *a: None, cancelled=lambda: False, resolve=dns)
    assert len(fs.requests) == seen  # the loopback server was never asked
