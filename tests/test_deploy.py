"""The operator's scripts as real processes: certificates, init.sh, init_https.sh, list_models.py."""
from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import free_port

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parents[1]


def sh(*args, input=None, env=None, timeout=60):
    return subprocess.run([str(a) for a in args], cwd=ROOT, input=input, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def gen_certs(d: Path):
    r = sh(ROOT / "generate_ssl_certs.sh", "--dir", d)
    assert r.returncode == 0, r.stderr
    return d / "cert.pem", d / "key.pem"


def test_generate_ssl_certs(tmp_path):
    cert, key = gen_certs(tmp_path / "ssl")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    text = subprocess.run(["openssl", "x509", "-in", cert, "-noout", "-ext", "subjectAltName"],
                          capture_output=True, text=True).stdout
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text
    before = cert.read_bytes()
    r = sh(ROOT / "generate_ssl_certs.sh", "--dir", tmp_path / "ssl")
    assert r.returncode != 0 and "--force" in r.stderr and cert.read_bytes() == before
    assert sh(ROOT / "generate_ssl_certs.sh", "--dir", tmp_path / "ssl", "--force").returncode == 0
    assert cert.read_bytes() != before
    assert "ssl/" in (ROOT / ".gitignore").read_text()


def test_missing_openssl_is_one_clear_line(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("dirname", "mkdir", "chmod", "mv", "rm", "sed", "tail", "cat", "read"):
        path = shutil.which(tool)
        if path:
            os.symlink(path, bindir / tool)
    r = subprocess.run(["/bin/bash", ROOT / "generate_ssl_certs.sh", "--dir", tmp_path / "x"], cwd=ROOT,
                       env={"PATH": str(bindir)}, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "openssl not found" in r.stderr


class Served:
    def __init__(self, cmd, env, tmp_path, input=None):
        self.port = free_port()
        models = tmp_path / "models"
        self.env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port),
                    "DIFFUSIONAPI_MODELS_DIR": str(models), "DIFFUSIONAPI_MODEL_LABELS": str(tmp_path / "labels.json"),
                    "DIFFUSIONAPI_OUTPUTS_DIR": str(tmp_path / "out"), "DIFFUSIONAPI_QUEUE_DIR": str(tmp_path / "q"),
                    "DIFFUSIONAPI_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", **env}
        self.proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=self.env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if input is not None:
            self.proc.stdin.write(input)
        self.proc.stdin.close()

    def wait_ready(self, scheme="http", verify=True, timeout=120):
        url = f"{scheme}://127.0.0.1:{self.port}"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("exited: " + self.proc.stdout.read())
            try:
                r = httpx.get(url + "/hello", verify=verify, timeout=2)
                if r.status_code == 200:
                    return url
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("not ready")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.stdout.read()


def _ca(cert: Path):
    ctx = ssl.create_default_context(cafile=str(cert))
    return ctx


def test_init_sh_https_when_certs_exist_and_demo_model(tmp_path):
    cert, key = gen_certs(tmp_path / "ssl")
    s = Served([ROOT / "init.sh"], {"SSL_CERTFILE": str(cert), "SSL_KEYFILE": str(key)}, tmp_path)
    try:
        url = s.wait_ready("https", verify=_ca(cert))
        c = httpx.Client(base_url=url, verify=_ca(cert), timeout=30)
        assert c.get("/hello").json() == {"ok": True}
        assert c.get("/models").json()["models"] == [{"name": "demo-tiny-sd15", "type": "sd15", "format": "diffusers",
                                                      "label": "Demo (tiny random weights, noise images)",
                                                      "family": "sd15", "prediction": "epsilon", "ztsnr": False}]
        job = c.post("/txt2img", json={"prompt": "demo", "width": 64, "height": 64, "steps": 2}).json()["job_id"]
        while (r := c.get(f"/queue/{job}").json())["state"] not in ("done", "error"):
            time.sleep(0.1)
        assert r["state"] == "done" and r["payload"]["model"] == "demo-tiny-sd15"
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/hello", timeout=5)  # untrusted without the CA
    finally:
        out = s.stop()
    assert f"serving at https://127.0.0.1:{s.port}" in out
    assert "installing the tiny demo model" in out


def test_init_sh_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = sh(ROOT / "init.sh", env={"HOST": "127.0.0.1", "PORT": str(port),
                                      "DIFFUSIONAPI_MODELS_DIR": str(tmp_path / "m"),
                                      "DIFFUSIONAPI_MODEL_LABELS": str(tmp_path / "labels.json"), "SSL_CERTFILE": ""},
               timeout=120)
    assert not (tmp_path / "m").exists()  # fails before installing anything
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr


@pytest.mark.parametrize("choice", ["\n", "1\n"])
def test_init_https_http_choice(tmp_path, choice):
    s = Served([ROOT / "init_https.sh"], {"SSL_DIR": str(tmp_path / "ssl")}, tmp_path, input=choice)
    try:
        s.wait_ready("http")
    finally:
        out = s.stop()
    assert "serving at http://" in out


def test_init_https_self_signed_choice(tmp_path):
    s = Served([ROOT / "init_https.sh"], {"SSL_DIR": str(tmp_path / "ssl")}, tmp_path, input="2\n")
    try:
        cert = tmp_path / "ssl" / "cert.pem"
        deadline = time.time() + 60
        while not cert.exists():
            assert time.time() < deadline
            time.sleep(0.1)
        s.wait_ready("https", verify=_ca(cert))
    finally:
        out = s.stop()
    assert "serving at https://" in out


def test_init_https_custom_choice_and_mismatch(tmp_path):
    cert, key = gen_certs(tmp_path / "a")
    _, other_key = gen_certs(tmp_path / "b")
    s = Served([ROOT / "init_https.sh"], {}, tmp_path, input=f"3\n{cert}\n{key}\n")
    try:
        s.wait_ready("https", verify=_ca(cert))
    finally:
        s.stop()
    r = sh(ROOT / "init_https.sh", input=f"3\n{cert}\n{other_key}\n")
    assert r.returncode == 1 and "do not belong together" in r.stderr and "Traceback" not in r.stderr
    r = sh(ROOT / "init_https.sh", "--mode", "custom", "--cert", tmp_path / "nope.pem", "--key", key)
    assert r.returncode == 1 and "does not exist" in r.stderr
    (tmp_path / "junk.pem").write_text("not a certificate")
    r = sh(ROOT / "init_https.sh", "--mode", "custom", "--cert", tmp_path / "junk.pem", "--key", key)
    assert r.returncode == 1 and "not a PEM certificate" in r.stderr
    r = sh(ROOT / "init_https.sh", input="7\n")
    assert r.returncode == 1 and "unknown choice" in r.stderr


def test_list_models(model_store, tmp_path):
    env = {"DIFFUSIONAPI_MODELS_DIR": str(model_store / "models"),
           "DIFFUSIONAPI_MODEL_LABELS": str(model_store / "labels.json")}
    r = sh(sys.executable, "list_models.py", env=env)
    assert r.returncode == 0, r.stderr
    assert "Tiny SD -> tiny-sd15  [SD 1.5, diffusers]" in r.stdout
    assert "Tiny XL -> tiny-sdxl  [SDXL, diffusers]" in r.stdout
    assert "tiny-sdxl-refiner -> tiny-sdxl-refiner  [SDXL refiner, diffusers]" in r.stdout
    r = sh(sys.executable, "list_models.py", "--json", env=env)
    data = json.loads(r.stdout)
    fams = {m["name"]: (m["family"], m["format"]) for m in data["models"]}
    assert fams["tiny-sd15"] == ("sd15", "diffusers") and fams["models--testorg--tiny-hub-sd15"] == ("sd15", "hub-cache")
    r = sh(sys.executable, "list_models.py", env={"DIFFUSIONAPI_MODELS_DIR": str(tmp_path / "none")})
    assert r.returncode == 0 and "No models installed" in r.stdout and "does not exist" in r.stdout
    # The seed's habit: plain `python3 list_models.py`, outside the venv, works too.
    r = sh("/usr/bin/env", "-u", "VIRTUAL_ENV", "python3", "list_models.py", "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["models"], r.stderr
    console = Path(sys.executable).parent / "diffusionapi-list-models"
    if console.exists():
        assert sh(console, "--json", env=env).returncode == 0
