"""Shared fixtures: tiny models built once per session, a real uvicorn server per test module."""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx
import pytest

from diffusionapi.config import Settings
from tests import holding
from tests.holding import Hold

# Test tiers (docs/testing.md). `./test.sh --quick` deselects these; `./test.sh` runs everything.
# Each module (or test) that needs one says so with a one-line `pytestmark = pytest.mark.<name>`.
MARKERS = {
    "browser": "drives a real headless Chromium (Playwright)",
    "broker": "starts real RabbitMQ and/or Redis servers (the Celery cluster)",
    "processes": "real server processes: crash/restart, graceful stop, the shell scripts",
    "slow": "long by design: the 200-job load test, schemathesis's full run, the GPU benchmark's flow",
}
QUICK = "not (" + " or ".join(MARKERS) + ")"  # the -m expression of ./test.sh --quick


def pytest_configure(config):
    for name, what in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {what}")


@pytest.fixture(autouse=True)
def _release_holds():
    """No held job outlives its test (tests/holding.py), even when the test failed."""
    yield
    holding.release_all()


TINY = {"tiny-sd15": "sd15", "tiny-sdxl": "sdxl", "tiny-sdxl-refiner": "sdxl-refiner"}
HUB_NAME = "models--testorg--tiny-hub-sd15"


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> Path:
    """A models dir with tiny SD 1.5, SDXL and refiner folders and a hub-cache copy."""
    from diffusionapi.demo import save_tiny_model

    root = tmp_path_factory.mktemp("store")
    models = root / "models"
    for name, fam in TINY.items():
        save_tiny_model(fam, models / name)
    snap = models / HUB_NAME / "snapshots" / "0123abcd"
    shutil.copytree(models / "tiny-sd15", snap)
    (models / HUB_NAME / "refs").mkdir()
    (models / HUB_NAME / "refs" / "main").write_text("0123abcd")
    (root / "labels.json").write_text(json.dumps({"tiny-sd15": "Tiny SD", "tiny-sdxl": "Tiny XL"}))
    (root / "loras").mkdir()
    (root / "upscalers").mkdir()
    return root


def make_settings(store: Path, work: Path, **overrides) -> Settings:
    base = dict(models_dir=store / "models", loras_dir=store / "loras", upscalers_dir=store / "upscalers",
                model_labels=store / "labels.json", outputs_dir=work / "outputs", queue_dir=work / "queue",
                device="cpu", default_model="tiny-sd15")
    base.update(overrides)
    return Settings(**base)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """The real app under real uvicorn, in this process (so pipelines stay warm between tests)."""

    def __init__(self, settings: Settings):
        import uvicorn

        from diffusionapi.main import create_app

        self.settings = settings
        self.app = create_app(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                   log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        holding.install()  # jobs with a hold token wait on it (tests/holding.py)
        self.holds: dict[str, Hold] = {}
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        self.client = httpx.Client(base_url=self.url, timeout=60)
        return self

    def __exit__(self, *exc):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)

    # helpers ------------------------------------------------------------
    def submit(self, **payload) -> str:
        r = self.client.post("/txt2img", json=payload)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "queued"
        return r.json()["job_id"]

    def release(self, job_id: str) -> None:
        """Let a held blocker (``submit_blocker``) go on, without waiting for it."""
        if job_id in self.holds:
            self.holds.pop(job_id).release()

    def wait(self, job_id: str, timeout: float = 120, on_poll=None) -> dict:
        """Polls until the job is final. Waiting for a held blocker (``submit_blocker``) releases it."""
        self.release(job_id)
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = self.client.get(f"/queue/{job_id}")
            assert r.status_code == 200, r.text
            body = r.json()
            if on_poll:
                on_poll(body)
            if body["state"] in ("done", "error", "cancelled"):
                return body
            time.sleep(0.02)
        raise TimeoutError(job_id)

    def run(self, **payload) -> dict:
        return self.wait(self.submit(**payload))

    def submit_blocker(self, **payload) -> str:
        """A job that runs (its first step), then is held until the test cancels it or waits for it
        (``wait`` releases it; tests/holding.py): whatever is submitted next surely queues. Returns
        once the blocker has reported progress."""
        hold = Hold()
        blocker = self.submit(**{"model": "tiny-sd15", "width": 64, "height": 64, "steps": 4, **payload,
                                 "prompt": hold.prompt})
        self.holds[blocker] = hold
        # Running with progress: its model is loaded (a load in the worker while a submit loads an
        # upscaler file can make the latter fail: diffusers' empty-weights loading is process-wide).
        deadline = time.time() + 120
        while (st := self.client.get(f"/queue/{blocker}").json())["progress"] <= 0:
            assert st["state"] in ("queued", "processing") and time.time() < deadline, st
            time.sleep(0.01)
        return blocker

    def submit_held(self, **payload) -> tuple[str, str]:
        """Submit ``payload`` behind a held blocker, so the test can change files before it starts.
        Returns (blocker id, job id); the job is still queued when this returns, and stays queued
        until the test waits for (or cancels) the blocker."""
        blocker = self.submit_blocker()
        job = self.submit(**payload)
        assert self.client.get(f"/queue/{job}").json()["state"] == "queued"
        return blocker, job

    @property
    def engine(self):
        return self.app.state.backend.worker.engine


SMALL = dict(prompt="a tiny test", width=64, height=64, steps=4)


@pytest.fixture(scope="module")
def server(model_store, tmp_path_factory):
    settings = make_settings(model_store, tmp_path_factory.mktemp("work"))
    with LiveServer(settings) as s:
        yield s


class ServerProcess:
    """`uvicorn diffusionapi.main:app` as a real child process (for crash and restart tests)."""

    def __init__(self, settings: Settings, port: int | None = None, extra_env: dict | None = None):
        self.settings = settings
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ,
                    **{f"DIFFUSIONAPI_{k.upper()}": (json.dumps(v) if isinstance(v, list) else str(v))
                       for k, v in settings.model_dump().items() if v is not None},
                    "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **(extra_env or {})}
        self.proc = None

    def start(self, timeout: float = 60):
        import subprocess
        import sys

        # Through tests/holding.py, so jobs with a hold token wait on it here too.
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.holding", "uvicorn", "diffusionapi.main:app", "--host",
                                      "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
                                     env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited: " + self.proc.stdout.read().decode()[-2000:])
            try:
                if httpx.get(self.url + "/hello", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def kill9(self):
        import signal

        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except Exception:
                self.proc.kill()
