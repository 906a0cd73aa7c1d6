"""Operating it (#27) on a cluster: real RabbitMQ and Redis, one `diffusionapi api` node and one
`diffusionapi worker` (sleep engine: no torch) as child processes with JSON logs; a real
Prometheus scrapes the worker's metrics port and the API node's /metrics. /readyz follows
Redis going away and coming back."""
from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

from tests.cluster_fixtures import RedisServer, rabbitmq_server  # noqa: F401 - fixture
from tests.conftest import free_port, make_settings
from tests.ops_fixtures import Prometheus
from tests.test_celery_backend import ROOT, Node, _env

pytestmark = [pytest.mark.timeout(600), pytest.mark.broker]

JOB = dict(prompt="a tiny test", width=64, height=64, steps=2, model="tiny-sd15")


@pytest.fixture(scope="module")
def ops_cluster(model_store, tmp_path_factory, rabbitmq_server):  # noqa: F811
    root = tmp_path_factory.mktemp("ops-cluster")
    redis_srv = RedisServer(root / "redis").start()  # its own: the test stops and restarts it
    metrics_port = free_port()

    def env(name, **extra):
        s = make_settings(model_store, root / name, backend="celery", broker_url=rabbitmq_server.url,
                          redis_url=redis_srv.url, worker_heartbeat_sec=0.5, log_format="json", **extra)
        return _env(s, HF_HUB_OFFLINE=1, OMP_NUM_THREADS=1, PYTHONPATH=ROOT)

    worker = Node(["worker", "--device", "cpu", "--models", "tiny-sd15", "--name", "w1", "--sleep-engine", "0.2"],
                  env("w1", metrics_port=metrics_port), root / "w1").start()
    port = free_port()
    api = Node(["api", "--host", "127.0.0.1", "--port", str(port), "--log-level", "info"], env("api"),
               root / "api", port).start()
    prom = None
    try:
        api.wait_http()
        deadline = time.time() + 120
        while httpx.get(api.url + "/readyz").status_code != 200:  # the worker's first heartbeat
            assert worker.proc.poll() is None, worker.log.read_text()[-3000:]
            assert time.time() < deadline, httpx.get(api.url + "/readyz").text
            time.sleep(0.2)
        prom = Prometheus(root / "prometheus", {"worker": f"127.0.0.1:{metrics_port}",
                                                "api": f"127.0.0.1:{port}"}).start()
        yield api, worker, f"http://127.0.0.1:{metrics_port}", redis_srv, prom
    finally:
        if prom:
            prom.stop()
        api.stop(signal.SIGKILL)
        worker.stop(signal.SIGKILL)
        redis_srv.stop()


def _records(node: Node) -> list[dict]:
    return [json.loads(line) for line in node.log.read_text().splitlines() if line.strip()]  # all JSON


def test_prometheus_scrapes_worker_and_api_node(ops_cluster):
    api, worker, worker_url, _redis, prom = ops_cluster
    ids = []
    for seed in range(3):
        r = httpx.post(api.url + "/txt2img", json=dict(JOB, seed=seed), timeout=30)
        assert r.status_code == 200, r.text
        ids.append(r.json()["job_id"])
    for job_id in ids:
        deadline = time.time() + 120
        while httpx.get(f"{api.url}/queue/{job_id}", params={"wait": 5}, timeout=30).json()["state"] != "done":
            assert time.time() < deadline
    # The worker counts what ran on it; the API node what it accepted and the cluster's queue.
    prom.wait_value('sum(diffusionapi_jobs_total{job="worker",state="done"})', 3)
    prom.wait_value('sum(diffusionapi_job_phase_seconds_count{job="worker",phase="sampling"})', 3)
    prom.wait_value('sum(diffusionapi_job_phase_seconds_count{job="worker",phase="queue_wait"})', 3)
    prom.wait_value('sum(diffusionapi_job_duration_seconds_count{job="worker",state="done"})', 3)
    prom.wait_value('sum(diffusionapi_images_total{job="worker"})', 3)
    prom.wait_value('sum(diffusionapi_jobs_submitted_total{job="api"})', 3)
    prom.wait_value('diffusionapi_queue_waiting{job="api"}', 0)
    assert prom.targets_up() == {"worker": "up", "api": "up"}

    # The same job records on both sides, as JSON lines: submitted on the API node, the rest on the worker.
    submitted = {r["job_id"] for r in _records(api) if r.get("event") == "submitted"}
    assert submitted >= set(ids)
    ran = _records(worker)
    for job_id in ids:
        events = [r["event"] for r in ran if r.get("job_id") == job_id and "event" in r]
        assert events == ["started", "done"], events
        started = next(r for r in ran if r.get("job_id") == job_id and r.get("event") == "started")
        assert started["worker"] == "w1" and started["attempt"] == 1
    assert any(r.get("event") == "startup" and r["settings"]["redis_url"].startswith("redis://") for r in ran)


def test_readyz_follows_redis_down_and_back(ops_cluster):
    api, _worker, worker_url, redis_srv, _prom = ops_cluster
    assert httpx.get(api.url + "/readyz").status_code == 200
    assert httpx.get(worker_url + "/readyz").status_code == 200
    redis_srv.stop()
    try:
        r = httpx.get(api.url + "/readyz", timeout=30)
        assert r.status_code == 503 and "redis" in r.json()["failed"], r.text
        assert r.json()["checks"]["broker"] is None  # only what is down is named
        w = httpx.get(worker_url + "/readyz", timeout=30)
        assert w.status_code == 503 and "redis" in w.json()["failed"], w.text
        assert httpx.get(api.url + "/healthz").status_code == 200
        assert httpx.get(worker_url + "/healthz").status_code == 200
    finally:
        redis_srv.start()
    deadline = time.time() + 60
    while httpx.get(api.url + "/readyz", timeout=30).status_code != 200:
        assert time.time() < deadline, httpx.get(api.url + "/readyz").text
        time.sleep(0.2)
    assert httpx.get(worker_url + "/readyz", timeout=30).status_code == 200
