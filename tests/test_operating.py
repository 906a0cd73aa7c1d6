"""Operating it (#27), in-process with a fake engine (no torch models): probes, /metrics,
retention and the free-space floor. The real-engine and real-Prometheus tests are in
test_operating_live.py and test_operating_cluster.py."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid

import httpx
import pytest
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from diffusionapi.config import Settings
from diffusionapi.engine.plan import GeneratedImage, GenerationResult, JobCancelled
from diffusionapi.main import create_app
from diffusionapi.retention import Janitor
from tests.conftest import free_port
from tests.test_backends_embedded import _fake_model

JOB = dict(prompt="p", model="fake-sd15", width=16, height=16, steps=3, seed=7, sampler_name="Euler",
           scheduler_type="default", fileType="png")


class GateEngine:
    """Each job waits at its start, without reporting anything, until ``gate`` is set (``gate``
    None: runs at once): a wedged worker, as /readyz sees it."""

    def __init__(self):
        self.gate: threading.Event | None = None
        self.started = threading.Event()

    def generate(self, plan, report, cancelled):
        self.started.set()
        if self.gate is not None:
            while not self.gate.wait(0.05):
                if cancelled():
                    raise JobCancelled()
        for i in range(plan.steps):
            report("generation", 100.0 * (i + 1) / plan.steps)
        img = Image.new("RGB", (plan.width, plan.height), (plan.seed % 256, 0, 0))
        return GenerationResult([GeneratedImage(img, plan.seed, {"Steps": plan.steps, "Seed": plan.seed})])


class AppServer:
    """create_app under real uvicorn in a thread, with a fake engine."""

    def __init__(self, tmp_path, engine=None, models=True, **overrides):
        if models:
            _fake_model(tmp_path / "models")
        (tmp_path / "models").mkdir(exist_ok=True)
        base = dict(models_dir=tmp_path / "models", loras_dir=tmp_path / "loras", upscalers_dir=tmp_path / "up",
                    outputs_dir=tmp_path / "out", queue_dir=tmp_path / "queue", model_labels=tmp_path / "labels.json",
                    device="cpu", default_model="fake-sd15")
        base.update(overrides)
        self.settings = Settings(**base)
        self.engine = engine or GateEngine()
        self.app = create_app(self.settings, engine_factory=lambda: self.engine)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        headers = {"X-API-Key": self.settings.api_key} if self.settings.api_key else {}
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30, headers=headers)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        if self.engine.gate is not None:
            self.engine.gate.set()
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)

    def submit(self, **kw) -> str:
        r = self.client.post("/txt2img", json={**JOB, **kw})
        assert r.status_code == 200, r.text
        return r.json()["job_id"]

    def wait_state(self, job_id, states=("done", "error", "cancelled"), timeout=30) -> dict:
        """Polls /queue/{id} without consuming a final answer: the listing shows states."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for e in self.client.get("/queue").json()["jobs"]:
                if e["job_id"] == job_id and e["state"] in states:
                    return e
            time.sleep(0.02)
        raise TimeoutError(job_id)


def until(fn, timeout=30, every=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(every)
    raise TimeoutError(fn)


def metric(text: str, name: str, **labels) -> float:
    """The value of sample ``name`` with ``labels`` in a scrape body (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


# ---------------------------------------------------------------------------- probes

def test_readyz_503_while_the_worker_is_wedged_and_200_after(tmp_path):
    engine = GateEngine()
    engine.gate = threading.Event()
    with AppServer(tmp_path, engine, worker_stall_sec=0.5, api_key="user-key") as s:
        anon = httpx.Client(base_url=s.client.base_url, timeout=10)  # probes need no key
        assert anon.get("/healthz").json() == {"status": "ok"}
        ready = anon.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"worker": None, "queue_dir": None, "models": None}
        assert anon.get("/queue").status_code == 401  # the API itself still needs the key

        job = s.submit()
        assert engine.started.wait(10)
        wedged = until(lambda: (r := anon.get("/readyz")).status_code == 503 and r)
        body = wedged.json()
        assert body["status"] == "not ready" and body["failed"] == ["worker"]
        assert "wedged" in body["checks"]["worker"] and job in body["checks"]["worker"]
        assert anon.get("/healthz").status_code == 200  # liveness: the process still answers

        engine.gate.set()
        s.wait_state(job, ("done",))
        until(lambda: anon.get("/readyz").status_code == 200)
        anon.close()


def test_readyz_names_a_missing_model(tmp_path):
    with AppServer(tmp_path, models=False) as s:
        r = s.client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["failed"] == ["models"] and r.json()["checks"]["models"] == "no model installed"


# ---------------------------------------------------------------------------- /metrics

def test_metrics_count_jobs_phases_http_and_rejected_submits(tmp_path):
    engine = GateEngine()
    with AppServer(tmp_path, engine, max_queued_jobs=1) as s:
        before = s.client.get("/metrics").text
        job = s.submit()
        s.wait_state(job, ("done",))
        assert s.client.get(f"/queue/{job}").json()["state"] == "done"
        engine.gate = threading.Event()
        engine.started.clear()
        blocker = s.submit()
        assert engine.started.wait(10)
        assert s.client.post("/txt2img", json=JOB).status_code == 503  # the queue holds 1
        assert s.client.post("/txt2img", json={**JOB, "steps": 0}).status_code == 422
        after = s.client.get("/metrics").text
        assert after.startswith("# HELP") and "diffusionapi_queue_running 1.0" in after

        def delta(name, **labels):
            return metric(after, name, **labels) - metric(before, name, **labels)

        assert delta("diffusionapi_jobs_submitted_total", kind="txt2img") == 2
        assert delta("diffusionapi_jobs_total", kind="txt2img", state="done") == 1
        assert delta("diffusionapi_job_phase_seconds_count", phase="sampling") == 1
        assert delta("diffusionapi_job_phase_seconds_count", phase="encode") == 1
        assert delta("diffusionapi_job_phase_seconds_count", phase="queue_wait") == 2
        assert delta("diffusionapi_images_total", kind="txt2img") == 1
        assert delta("diffusionapi_sampling_steps_total") == JOB["steps"]
        assert delta("diffusionapi_submits_rejected_total", route="/txt2img", status="503") == 1
        assert delta("diffusionapi_http_requests_total", method="POST", route="/txt2img", status="422") == 1
        assert delta("diffusionapi_http_requests_total", method="GET", route="/queue/{job_id}", status="200") >= 1
        assert s.client.delete(f"/queue/{blocker}").json()["state"] == "cancelling"
        s.wait_state(blocker, ("cancelled",))
        final = s.client.get("/metrics").text
        assert metric(final, "diffusionapi_jobs_total", kind="txt2img", state="cancelled") \
            - metric(before, "diffusionapi_jobs_total", kind="txt2img", state="cancelled") == 1


# ---------------------------------------------------------------------------- disk

def test_result_ttl_removes_outputs_and_the_unread_job_answers_410(tmp_path):
    with AppServer(tmp_path, result_ttl="1s") as s:
        job = s.submit()
        s.wait_state(job, ("done",))
        outputs = s.settings.outputs_dir
        assert [p.name for p in outputs.iterdir()] == [f"{job}.png"]
        (outputs / "keep-me.txt").write_text("an operator's file")  # not named like an output: kept
        until(lambda: not (s.settings.queue_dir / f"{job}.json").exists())  # (a read now would take it)
        r = s.client.get(f"/queue/{job}")
        assert r.status_code == 410 and "DIFFUSIONAPI_RESULT_TTL=1 s" in r.json()["error"], r.text
        until(lambda: not (outputs / f"{job}.png").exists())
        assert (outputs / "keep-me.txt").exists()
        assert s.client.get(f"/queue/{uuid.uuid4()}").status_code == 404  # never known: still 404


def test_outputs_cap_removes_the_oldest_first(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    now = time.time()
    names = [f"{uuid.uuid4()}.png" for _ in range(3)] + [f"{uuid.uuid4()}-1.jpg"]
    for age, name in zip((40, 30, 20, 10), names):
        p = out / name
        p.write_bytes(b"x" * 1000)
        os.utime(p, (now - age, now - age))
    (out / "notes.txt").write_bytes(b"y" * 5000)  # not an output: neither counted nor removed
    expired = []
    settings = Settings(outputs_dir=out, queue_dir=tmp_path / "q", outputs_max_gb=2500 / 1024 ** 3)
    janitor = Janitor(settings, expire_job=lambda job_id, reason: expired.append((job_id, reason)) or True)
    assert janitor.sweep(now) == {"ttl": 0, "cap": 2, "results": 0}
    assert sorted(p.name for p in out.iterdir()) == sorted(names[2:] + ["notes.txt"])
    assert [j for j, _ in expired] == [names[0][:36], names[1][:36]]
    assert "DIFFUSIONAPI_OUTPUTS_MAX_GB" in expired[0][1]


def test_an_unread_job_whose_image_the_cap_removed_answers_410(tmp_path):
    with AppServer(tmp_path, outputs_max_gb=1e-12) as s:  # every image is over the cap
        job = s.submit()
        until(lambda: (s.settings.queue_dir / "expired" / f"{job}.json").exists())
        r = s.client.get(f"/queue/{job}")
        assert r.status_code == 410 and "DIFFUSIONAPI_OUTPUTS_MAX_GB" in r.json()["error"], r.text
        assert not any(s.settings.outputs_dir.iterdir())


def test_submit_below_the_free_space_floor_is_503_and_writes_nothing(tmp_path):
    with AppServer(tmp_path, min_free_gb=1e9) as s:
        before = sorted(p.name for p in s.settings.queue_dir.rglob("*"))
        r = s.client.post("/txt2img", json=JOB)
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert "DIFFUSIONAPI_MIN_FREE_GB" in r.json()["error"]
        assert sorted(p.name for p in s.settings.queue_dir.rglob("*")) == before
        assert not s.settings.outputs_dir.exists() or not any(s.settings.outputs_dir.iterdir())
        assert s.client.get("/queue").json()["jobs"] == []


def test_result_ttl_setting_reads_durations():
    assert Settings(result_ttl="24h").result_ttl == 86400
    assert Settings(result_ttl="90").result_ttl == 90
    assert Settings(result_ttl="").result_ttl is None
    with pytest.raises(ValueError):
        Settings(result_ttl="-5m")


def test_startup_settings_mask_secrets():
    from diffusionapi.logs import masked_settings

    shown = masked_settings(Settings(api_key="s3cret-key", admin_key="adm1n", webhook_secret="whsec",
                                     api_auth="user:pa55", hf_token="hf_abc",
                                     broker_url="amqp://guest:brokerpw@rabbit:5672//",
                                     redis_url="redis://:redispw@redis:6379/0"))
    text = json.dumps(shown)
    for secret in ("s3cret-key", "adm1n", "whsec", "pa55", "hf_abc", "brokerpw", "redispw"):
        assert secret not in text, secret
    assert shown["api_key"] == "***" and shown["broker_url"] == "amqp://guest:***@rabbit:5672//"
    assert shown["civitai_token"] is None and shown["webhook_allowed_hosts"] == ["*"]  # unset, and not secrets


def test_json_lines_carry_the_structured_fields():
    import io
    import logging

    from diffusionapi.logs import configure

    stream = io.StringIO()
    configure("json", "INFO", stream=stream)
    access = logging.getLogger("uvicorn.access")
    level = access.level
    access.setLevel(logging.INFO)  # as uvicorn sets it
    try:
        logging.getLogger("diffusionapi.jobs").info("job %s done", "j1", extra={"event": "done", "job_id": "j1"})
        logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "1.2.3.4:5", "GET", "/hello", "1.1", 200)
    finally:
        access.setLevel(level)
        configure("text", "INFO")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "job j1 done" and first["event"] == "done" and first["job_id"] == "j1"
    assert first["level"] == "INFO" and first["logger"] == "diffusionapi.jobs" and first["ts"].endswith("Z")
    assert (second["method"], second["path"], second["status"]) == ("GET", "/hello", 200)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_webhook_deliveries_are_counted_and_logged_by_outcome(tmp_path):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    codes = [500, 200]  # the first attempt fails, the retry is delivered

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(codes.pop(0) if codes else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{receiver.server_address[1]}/hook?token=secret-in-query"
    try:
        with AppServer(tmp_path, webhook_secret="s", webhook_allowed_hosts=["127.0.0.1"],
                       webhook_backoff_sec=0.05) as s:
            before = s.client.get("/metrics").text
            seen = _Records()
            logging.getLogger("diffusionapi.jobs").addHandler(seen)
            try:
                s.submit(webhook={"url": hook, "events": ["done"]})

                def delivered():
                    return metric(s.client.get("/metrics").text, "diffusionapi_webhook_deliveries_total",
                                  event="done", outcome="delivered") \
                        - metric(before, "diffusionapi_webhook_deliveries_total", event="done", outcome="delivered")
                until(lambda: delivered() == 1)
            finally:
                logging.getLogger("diffusionapi.jobs").removeHandler(seen)
            after = s.client.get("/metrics").text
            assert metric(after, "diffusionapi_webhook_deliveries_total", event="done", outcome="retrying") \
                - metric(before, "diffusionapi_webhook_deliveries_total", event="done", outcome="retrying") == 1
    finally:
        receiver.shutdown()
    records = [r for r in seen.records if getattr(r, "event", None) == "webhook"]
    assert [r.outcome for r in records] == ["retrying", "delivered"]
    assert records[0].status_code == 500 and "HTTP 500" in records[0].error
    assert all("secret-in-query" not in r.getMessage() and "token" not in r.url for r in records)


def test_opentelemetry_trace_of_a_job_has_its_phases(tmp_path):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from diffusionapi import tracing

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracing.use(provider)
    try:
        with AppServer(tmp_path) as s:
            job = s.submit()
            s.wait_state(job, ("done",))
            until(lambda: any(sp.name == "job txt2img" for sp in spans.get_finished_spans()))
    finally:
        tracing.use(None)
    got = {sp.name: sp for sp in spans.get_finished_spans()}
    root = got["job txt2img"]
    assert root.attributes["diffusionapi.job_id"] == job and root.attributes["diffusionapi.state"] == "done"
    children = [sp for sp in spans.get_finished_spans() if sp.parent and sp.parent.span_id == root.context.span_id]
    assert [c.name for c in sorted(children, key=lambda c: c.start_time)] == ["queue_wait", "sampling", "encode"]
    assert all(root.start_time <= c.start_time <= c.end_time <= root.end_time for c in children)
