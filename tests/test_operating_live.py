"""Operating it (#27) on the real server: `uvicorn diffusionapi.main:app` as a child process with
the real engine and tiny models, JSON logs into a file, and a real Prometheus scraping it.

One server runs a finished job, a 422, a failed job (a corrupt LoRA), a cancelled queued job
and a cancelled running one; the test then reads each job's records from the log file and asks
Prometheus' query API for the counters and histograms."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, free_port, make_settings
from tests.ops_fixtures import Prometheus

pytestmark = [pytest.mark.timeout(600), pytest.mark.processes]

ROOT = Path(__file__).resolve().parents[1]
JOB = dict(prompt="a tiny test", width=64, height=64, steps=3, model="tiny-sd15", seed=1)
SLOW = dict(JOB, width=256, height=256, steps=150)


@pytest.fixture(scope="module")
def live(model_store, tmp_path_factory):
    work = tmp_path_factory.mktemp("ops-live")
    loras = work / "loras"
    loras.mkdir()
    (loras / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}...")
    settings = make_settings(model_store, work, loras_dir=loras, log_format="json")
    port = free_port()
    env = ServerProcess(settings, extra_env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}).env
    log_file = work / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "diffusionapi.main:app", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "info"], env=env, cwd=work,
                            stdout=open(log_file, "ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    prom = None
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, log_file.read_text()[-3000:]
            assert time.time() < deadline, "server did not start"
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        prom = Prometheus(work / "prometheus", {"embedded": f"127.0.0.1:{port}"}).start()
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, log_file, prom
    finally:
        if prom:
            prom.stop()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait(client, job_id, timeout=300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        body = client.get(f"/queue/{job_id}", params={"wait": 5}).json()
        if body["state"] in ("done", "error", "cancelled"):
            return body
    raise TimeoutError(job_id)


def _submit(client, **payload) -> str:
    r = client.post("/txt2img", json=payload)
    assert r.status_code == 200, r.text
    return r.json()["job_id"]


def _records(log_file: Path) -> list[dict]:
    lines = [line for line in log_file.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line is one JSON object


def test_json_logs_tell_each_jobs_story_and_prometheus_counts_them(live):
    client, log_file, prom = live
    done = _submit(client, **JOB)
    assert _wait(client, done)["state"] == "done"
    bad = client.post("/txt2img", json=dict(JOB, steps=0))
    assert bad.status_code == 422
    failed = _submit(client, **JOB, loras=["broken"])
    failed_body = _wait(client, failed)
    assert failed_body["state"] == "error" and "broken" in failed_body["error"]

    running = _submit(client, **SLOW)
    while client.get(f"/queue/{running}").json()["state"] != "processing":
        time.sleep(0.05)
    queued = _submit(client, **JOB)
    assert client.delete(f"/queue/{queued}").json()["state"] == "cancelled"
    assert client.delete(f"/queue/{running}").json()["state"] == "cancelling"
    assert _wait(client, running)["state"] == "cancelled"
    assert _wait(client, queued)["state"] == "cancelled"

    # ---- the log file: one JSON object per line, uvicorn's lines included
    records = _records(log_file)
    assert any(r["logger"] == "uvicorn.error" and "Started server process" in r["msg"] for r in records)
    access = [r for r in records if r["logger"] == "uvicorn.access"]
    assert any(r["method"] == "POST" and r["path"] == "/txt2img" and r["status"] == 422 for r in access)
    startup = next(r for r in records if r.get("event") == "startup")
    assert startup["settings"]["default_model"] == "tiny-sd15"

    def story(job_id):
        return [r["event"] for r in records if r.get("job_id") == job_id and "event" in r]

    assert story(done) == ["submitted", "started", "model_loaded", "done"]  # the first job loads the model
    ok = {r["event"]: r for r in records if r.get("job_id") == done and "event" in r}
    assert ok["model_loaded"]["model"] == "tiny-sd15" and ok["model_loaded"]["seconds"] > 0
    assert ok["submitted"]["kind"] == "txt2img" and ok["submitted"]["model"] == "tiny-sd15"
    assert ok["submitted"]["caller"].startswith("127.0.0.1")
    assert ok["started"]["worker"] == "embedded" and ok["started"]["attempt"] == 1
    assert set(ok["done"]["phase_sec"]) == {"model_load", "sampling", "decode", "encode"}

    rejected = [r for r in records if r.get("event") == "http_4xx" and r["status"] == 422]
    assert rejected and "steps" in rejected[-1]["reason"] and rejected[-1]["path"] == "/txt2img"

    assert story(failed) == ["submitted", "started", "failed"]
    fail = next(r for r in records if r.get("job_id") == failed and r.get("event") == "failed")
    assert fail["level"] == "WARNING" and "broken" in fail["error"]

    assert story(queued) == ["submitted", "cancel_requested", "cancelled"]
    assert story(running) == ["submitted", "started", "cancel_requested", "cancelled"]
    ask = next(r for r in records if r.get("job_id") == running and r.get("event") == "cancel_requested")
    assert ask["caller"].startswith("127.0.0.1")

    # ---- Prometheus, scraping the server every second
    assert prom.targets_up().get("embedded") in ("up", "unknown")
    prom.wait_value('sum(diffusionapi_jobs_total{state="done"})', 1)
    prom.wait_value('sum(diffusionapi_jobs_total{state="error"})', 1)
    prom.wait_value('sum(diffusionapi_jobs_total{state="cancelled"})', 2)
    prom.wait_value('sum(diffusionapi_jobs_submitted_total{kind="txt2img"})', 4)
    prom.wait_value('sum(diffusionapi_job_phase_seconds_count{phase="sampling"})', 1)
    prom.wait_value('sum(diffusionapi_job_phase_seconds_count{phase="decode"})', 1)
    prom.wait_value('sum(diffusionapi_job_phase_seconds_count{phase="model_load"})', 1)
    prom.wait_value('sum(diffusionapi_job_phase_seconds_count{phase="queue_wait"})', 3)  # the queued one never started
    prom.wait_value('sum(diffusionapi_model_loads_total{model="tiny-sd15"})', 1)
    prom.wait_value('sum(diffusionapi_job_duration_seconds_count{state="done"})', 1)
    prom.wait_value('sum(diffusionapi_images_total)', 1)
    prom.wait_value('sum(diffusionapi_http_requests_total{route="/txt2img",status="422"})', 1)
    assert prom.targets_up()["embedded"] == "up"
