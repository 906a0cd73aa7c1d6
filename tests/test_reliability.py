"""Crash and restart, failures inside jobs, cancel, limits, access control."""
from __future__ import annotations

import base64
import io
import json
import shutil
import time
import uuid

import httpx
import pytest
import torch
from PIL import Image

from .conftest import SMALL, LiveServer, ServerProcess, make_settings
from .holding import Hold

SLOW = dict(prompt="slow", width=128, height=128, steps=60, model="tiny-sd15")


def _final(client, job_id, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = client.get(f"/queue/{job_id}")
        assert r.status_code == 200, (job_id, r.text)
        if r.json()["state"] in ("done", "error", "cancelled"):
            return r.json()
        time.sleep(0.05)
    raise TimeoutError(job_id)


@pytest.mark.processes
def test_kill_9_and_restart_loses_no_job(model_store, tmp_path):
    settings = make_settings(model_store, tmp_path)
    srv = ServerProcess(settings).start()
    hold = Hold()  # held (tests/holding.py): the first slow job surely runs, the others wait, at the kill
    try:
        c = httpx.Client(base_url=srv.url, timeout=30)
        quick = c.post("/txt2img", json=dict(SMALL, model="tiny-sd15", seed=1)).json()["job_id"]
        deadline = time.time() + 60
        while not any(j["job_id"] == quick and j["state"] == "done" for j in c.get("/queue").json()["jobs"]):
            assert time.time() < deadline
            time.sleep(0.05)
        slow = [c.post("/txt2img", json=dict(SLOW, seed=i, steps=8, prompt=hold.prompt)).json()["job_id"] for i in range(4)]
        while c.get(f"/queue/{slow[0]}").json()["progress"] <= 0:
            time.sleep(0.02)
    finally:
        srv.kill9()
        hold.release()
    # A torn record written by the crash must not stop the restart.
    (settings.queue_dir / f"{uuid.uuid4()}_job.json").write_text('{"job_id": "x", "pay')
    srv2 = ServerProcess(settings, port=srv.port).start()
    try:
        c = httpx.Client(base_url=srv2.url, timeout=30)
        listed = {j["job_id"]: j for j in c.get("/queue").json()["jobs"]}
        assert set(slow) | {quick} <= set(listed)
        done = _final(c, quick)
        assert done["state"] == "done" and done["image"]
        assert c.get(f"/queue/{quick}").status_code == 404  # served once
        outputs = set()
        for j in slow:
            r = _final(c, j)
            assert r["state"] == "done", r
            Image.open(io.BytesIO(base64.b64decode(r["image"]))).verify()
            outputs.add(r["output_path"])
            assert c.get(f"/queue/{j}").status_code == 404
        assert len(outputs) == 4
        assert len(list((settings.queue_dir / "corrupt").iterdir())) == 1
        assert not [p for p in settings.queue_dir.glob("*.json") if not p.name.startswith(".")]  # job records
    finally:
        srv2.stop()


@pytest.mark.processes
def test_graceful_stop_requeues_the_running_job(model_store, tmp_path):
    settings = make_settings(model_store, tmp_path)
    srv = ServerProcess(settings).start()
    c = httpx.Client(base_url=srv.url, timeout=30)
    hold = Hold()  # surely running when the stop comes (tests/holding.py)
    job = c.post("/txt2img", json=dict(SLOW, steps=8, prompt=hold.prompt)).json()["job_id"]
    while c.get(f"/queue/{job}").json()["progress"] <= 0:
        time.sleep(0.02)
    srv.stop()
    hold.release()
    assert json.loads(settings.queue_dir.joinpath(f"{job}.json").read_text())["state"] == "queued"
    assert json.loads(settings.queue_dir.joinpath(f"{job}_job.json").read_text())["attempts"] == 0
    srv2 = ServerProcess(settings, port=srv.port).start()
    try:
        assert _final(httpx.Client(base_url=srv2.url, timeout=30), job)["state"] == "done"
    finally:
        srv2.stop()


@pytest.fixture(scope="module")
def rel_server(model_store, tmp_path_factory):
    with LiveServer(make_settings(model_store, tmp_path_factory.mktemp("rel"), max_queued_jobs=5)) as s:
        yield s


def _inject_once(server, exc):
    """Make the resident UNet raise once: there is no real CUDA OOM on a CPU box."""
    loaded = server.engine.cache.get(server.app.state.registry.resolve_model("tiny-sd15"))
    unet = loaded.pipe.unet
    original = unet.forward

    def failing(*a, **k):
        unet.forward = original
        raise exc

    unet.forward = failing


@pytest.mark.parametrize("exc, needle", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "out of GPU memory"),
    (MemoryError(), "out of memory"),
])
def test_out_of_memory_fails_the_job_and_the_next_one_runs(rel_server, exc, needle):
    rel_server.run(**SMALL, model="tiny-sd15")
    _inject_once(rel_server, exc)
    r = rel_server.run(**SMALL, model="tiny-sd15")
    assert r["state"] == "error" and needle in r["error"], r
    assert rel_server.run(**SMALL, model="tiny-sd15")["state"] == "done"


def test_output_write_failure(rel_server):
    out = rel_server.settings.outputs_dir
    blocker, job = rel_server.submit_held(**dict(SLOW, steps=20))
    shutil.rmtree(out, ignore_errors=True)
    out.write_text("a file where the outputs directory should be")
    try:
        rel_server.wait(blocker)  # fails to write too
        r = rel_server.wait(job)
    finally:
        out.unlink()
    assert r["state"] == "error" and "could not write the output image" in r["error"]
    assert rel_server.run(**SMALL, model="tiny-sd15")["state"] == "done"


def test_cancel_queued_and_running(rel_server):
    c = rel_server.client
    running = rel_server.submit_blocker()  # runs until cancelled (tests/holding.py)
    queued = rel_server.submit(**SMALL)
    st = c.get(f"/queue/{queued}").json()
    assert st["state"] == "queued" and st["queue_position"] == 1
    assert c.get(f"/queue/{running}").json()["queue_position"] == 0
    listing = c.get("/queue").json()["jobs"]
    assert [(j["job_id"], j["queue_position"]) for j in listing[:2]] == [(running, 0), (queued, 1)]
    assert "image" not in json.dumps(listing)
    r = c.delete(f"/queue/{queued}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert c.delete(f"/queue/{running}").json()["state"] == "cancelling"
    final = rel_server.wait(running)
    # "cancelled", not "done": it stopped between model evaluations (it was held: it never finishes alone).
    assert final["state"] == "cancelled"
    assert rel_server.wait(queued)["state"] == "cancelled"
    for j in (queued, running):
        assert c.get(f"/queue/{j}").status_code == 404
        assert not list(rel_server.settings.queue_dir.glob(f"{j}*"))
    assert c.delete(f"/queue/{uuid.uuid4()}").status_code == 404
    done = rel_server.submit(**SMALL)
    while c.get("/queue").json()["jobs"]:
        if any(j["state"] == "done" for j in c.get("/queue").json()["jobs"]):
            break
        time.sleep(0.02)
    assert c.delete(f"/queue/{done}").status_code == 409
    rel_server.wait(done)


def test_unwritable_queue_dir_is_503_and_nothing_queued(model_store, tmp_path):
    settings = make_settings(model_store, tmp_path)
    with LiveServer(settings) as s:
        shutil.rmtree(settings.queue_dir)
        settings.queue_dir.write_text("a file where the queue directory should be")
        try:
            r = s.client.post("/txt2img", json=SMALL)
            assert r.status_code == 503 and "queue directory" in r.json()["error"]
            assert s.app.state.backend.queue.size() == 0
        finally:
            settings.queue_dir.unlink()
            settings.queue_dir.mkdir()
        assert s.run(**SMALL, model="tiny-sd15")["state"] == "done"


def test_queue_full_is_503_with_retry_after(rel_server):
    c = rel_server.client
    jobs = [rel_server.submit_blocker()] + [rel_server.submit(**dict(SLOW, steps=8)) for _ in range(4)]
    r = c.post("/txt2img", json=SMALL)
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["status"] == "error"
    for j in jobs:
        c.delete(f"/queue/{j}")
    for j in jobs:
        rel_server.wait(j)


def test_limits(rel_server):
    c = rel_server.client
    s = rel_server.settings
    cases = [({"prompt": "x" * (s.max_prompt_chars + 1)}, 422, "prompt"),
             ({"prompt": "x", "negative_prompt": "y" * (s.max_prompt_chars + 1)}, 422, "negative_prompt"),
             ({"prompt": "x", "width": 2048, "height": 2048 + 8}, 422, "height"),
             ({"prompt": "x", "loras": ["a"] * (s.max_loras + 1)}, 422, "loras"),
             ({"prompt": "x", "hires": {"enabled": True, "scale": 4, "steps": s.max_steps + 1}}, 422, "hires.steps")]
    for body, status, field in cases:
        r = c.post("/txt2img", json=body)
        assert r.status_code == status and field in r.json()["error"], (body, r.text)
    big = json.dumps({"prompt": "x" * (s.max_body_bytes + 10)})
    r = c.post("/txt2img", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    def chunks():
        yield b'{"prompt": "'
        for _ in range(s.max_body_bytes // 1000 + 2):
            yield b"x" * 1000
        yield b'"}'
    r = c.post("/txt2img", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_api_key_and_cors(model_store, tmp_path):
    settings = make_settings(model_store, tmp_path, api_key="s3cret", cors_origins=["https://app.example"])
    with LiveServer(settings) as s:
        c = s.client
        assert c.get("/hello").status_code == 200
        for path in ("/models", "/loras", "/upscalers", "/sampling_methods", "/queue", f"/queue/{uuid.uuid4()}"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/txt2img", json=SMALL).status_code == 401
        assert c.get("/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/models", headers={"X-API-Key": "s3cret"}).status_code == 200
        r = c.options("/models", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"})
        assert r.headers.get("access-control-allow-origin") == "https://app.example"
        r = c.options("/models", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
        assert r.headers.get("access-control-allow-origin") is None


def test_symlinks_outside_are_ignored(model_store, tmp_path):
    import os

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(b"x")
    loras = tmp_path / "loras"
    loras.mkdir()
    os.symlink(outside / "secret.safetensors", loras / "escape.safetensors")
    os.symlink(outside, loras / "dir-escape")
    models = tmp_path / "models"
    models.mkdir()
    os.symlink(model_store / "models" / "tiny-sd15", models / "linked-outside")
    from diffusionapi.registry import Registry

    reg = Registry(make_settings(model_store, tmp_path, loras_dir=loras, models_dir=models))
    assert reg.loras() == [] and reg.models() == []


def test_job_interrupted_too_often_ends_in_error(model_store, tmp_path):
    from diffusionapi.jobs.backends.embedded.store import JobStore
    from diffusionapi.jobs.states import MAX_ATTEMPTS

    settings = make_settings(model_store, tmp_path)
    store = JobStore(settings.queue_dir)
    job = str(uuid.uuid4())
    store.create(job, dict(SMALL, model="tiny-sd15", seed=1))
    record = store.read_job(job)
    record["attempts"] = MAX_ATTEMPTS
    store.write_job(job, record)
    store.write_status(job, {"state": "processing", "current_phase": "generation", "progress": 40.0})
    with LiveServer(settings) as s:
        r = s.wait(job)
    assert r["state"] == "error" and "interrupted 3 times" in r["error"]
