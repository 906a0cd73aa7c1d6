"""Access, secure by default (issue #31, docs/security.md "Access"): one credential check for every
route of both dialects, an empty secret is a start-up error, init.sh listens on loopback unless
told otherwise and refuses the network without credentials unless explicitly allowed, duplicate
credential headers are refused, and no listing shows the server's absolute paths."""
from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from diffusionapi.config import Settings

from .conftest import LiveServer, make_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["API_KEY", "API_AUTH", "WEBHOOK_SECRET"])
@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_secret_is_a_startup_error(monkeypatch, name, value):
    monkeypatch.setenv(f"DIFFUSIONAPI_{name}", value)
    with pytest.raises(ValidationError, match=f"DIFFUSIONAPI_{name} is set but empty"):
        Settings()


def test_malformed_api_auth_fails_app_creation(model_store, tmp_path):
    from diffusionapi.main import create_app

    with pytest.raises(ValueError, match="user:password"):
        create_app(make_settings(model_store, tmp_path, api_auth="alice"))


def _basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def basic_only(model_store, tmp_path_factory):
    """DIFFUSIONAPI_API_AUTH alone: it used to guard /sdapi only, leaving the native API open."""
    with LiveServer(make_settings(model_store, tmp_path_factory.mktemp("basic"), api_auth="alice:s3cret")) as s:
        yield s


NATIVE = [("GET", "/models"), ("GET", "/queue"), ("POST", "/txt2img"), ("POST", "/png-info"), ("GET", "/loras")]
SDAPI = [("GET", "/sdapi/v1/sd-models"), ("GET", "/sdapi/v1/options"), ("POST", "/sdapi/v1/txt2img"),
         ("GET", "/sdapi/v1/cmd-flags")]


@pytest.mark.parametrize("method,path", NATIVE + SDAPI)
def test_one_check_guards_every_route_of_both_dialects(basic_only, method, path):
    body = {"prompt": "a", "width": 64, "height": 64, "steps": 1} if method == "POST" else None
    r = httpx.request(method, basic_only.url + path, json=body)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Basic"
    r = httpx.request(method, basic_only.url + path, json=body, headers=_basic("alice", "s3cret"), timeout=120)
    assert r.status_code != 401
    assert httpx.request(method, basic_only.url + path, json=body, headers=_basic("alice", "nope")).status_code == 401


def test_public_paths_stay_open(basic_only):
    for path in ("/hello", "/healthz", "/", "/openapi.json"):
        assert httpx.get(basic_only.url + path).status_code == 200, path


@pytest.fixture(scope="module")
def keyed(model_store, tmp_path_factory):
    with LiveServer(make_settings(model_store, tmp_path_factory.mktemp("keyed"), api_key="the-key")) as s:
        yield s


@pytest.mark.parametrize("path", ["/models", "/sdapi/v1/options"])
def test_the_key_opens_both_dialects_every_way_it_can_be_sent(keyed, path):
    for headers in ({"X-API-Key": "the-key"}, {"Authorization": "Bearer the-key"}, _basic("anyone", "the-key")):
        assert httpx.get(keyed.url + path, headers=headers).status_code == 200, headers
    assert httpx.get(keyed.url + path, headers={"X-API-Key": "wrong"}).status_code == 401


@pytest.mark.parametrize("path", ["/models", "/sdapi/v1/options"])
def test_duplicate_credential_headers_are_refused_whatever_their_order(keyed, path):
    for pair in (["the-key", "wrong"], ["wrong", "the-key"], ["the-key", "the-key"]):
        r = httpx.get(keyed.url + path, headers=[("X-API-Key", v) for v in pair])
        assert r.status_code == 401, pair
    r = httpx.get(keyed.url + path, headers=[("Authorization", "Bearer the-key"), ("Authorization", "Bearer x")])
    assert r.status_code == 401


def test_access_rules_unit(tmp_path):
    from diffusionapi.auth.keys import Authenticator

    off = Authenticator(Settings(queue_dir=tmp_path))
    assert off.authenticate([(b"authorization", b"Basic dW5kZWZpbmVk")]) is not None  # SillyTavern's "undefined"
    on = Authenticator(Settings(queue_dir=tmp_path, api_key="k", api_auth="u:p"))
    assert on.authenticate([(b"x-api-key", b"k")]) is not None
    assert on.authenticate([(b"x-api-key", b"k"), (b"x-api-key", b"k")]) is None
    assert on.authenticate([(b"authorization", b"Basic " + base64.b64encode(b"ghost:p"))]) is None


def test_listings_show_no_absolute_server_paths(keyed):
    h = {"X-API-Key": "the-key"}
    flags = httpx.get(keyed.url + "/sdapi/v1/cmd-flags", headers=h).json()
    texts = [str(v) for v in flags.values()]
    for path in ("/sdapi/v1/loras", "/sdapi/v1/sd-models", "/sdapi/v1/upscalers"):
        texts.append(httpx.get(keyed.url + path, headers=h).text)
    store = str(keyed.settings.models_dir.parent)
    assert all(store not in t and not t.startswith("/") for t in texts)
    assert '"filename":"models/' in texts[-2].replace(" ", "")


# ---------------------------------------------------------------------------- init.sh

def _exposure(host: str, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DIFFUSIONAPI_")}
    return subprocess.run([sys.executable, "-m", "diffusionapi.cli", "check-exposure", host], cwd=ROOT,
                          env={**clean, **env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)


def test_init_sh_listens_on_loopback_by_default():
    out = subprocess.run(["bash", "-c", 'unset HOST; eval "$(grep -m1 \'^HOST=\' init.sh)"; echo "$HOST"'],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "127.0.0.1"
    text = (ROOT / "init.sh").read_text()
    assert "check-exposure" in text and "security.connguard:GuardedAuto" in text


def test_the_network_without_credentials_is_refused_unless_allowed():
    r = _exposure("0.0.0.0")
    assert r.returncode == 1 and "refusing to listen on 0.0.0.0" in r.stderr
    assert _exposure("::").returncode == 1
    for host in ("127.0.0.1", "localhost", "::1"):
        assert _exposure(host).returncode == 0, host
    assert _exposure("0.0.0.0", DIFFUSIONAPI_API_KEY="k").returncode == 0
    assert _exposure("0.0.0.0", DIFFUSIONAPI_API_AUTH="u:p").returncode == 0
    assert _exposure("0.0.0.0", DIFFUSIONAPI_ALLOW_UNAUTHENTICATED="true").returncode == 0
    r = _exposure("127.0.0.1", DIFFUSIONAPI_API_KEY="")
    assert r.returncode == 1 and "DIFFUSIONAPI_API_KEY is set but empty" in r.stderr
