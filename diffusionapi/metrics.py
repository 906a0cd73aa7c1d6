"""Prometheus metrics (``prometheus-client``), every name prefixed ``diffusionapi_``.

The counters and histograms are process-wide (prometheus-client's default registry): the
embedded server, each Celery worker and each API node count what happens in them, and
Prometheus sums over its targets. Job counts are written by :mod:`diffusionapi.jobs.observe`
(one call per lifecycle event), HTTP counts by ``api/observe.py``, webhook outcomes by
``jobs/webhooks.py``. Queue depth and GPU memory are read at scrape time (:class:`_LiveCollector`).

Served at ``GET /metrics`` by the API (``api/metrics.py``) and, on a cluster worker, by
:func:`serve_worker_http` on ``DIFFUSIONAPI_METRICS_PORT`` (with ``/healthz`` and ``/readyz``).
"""
from __future__ import annotations

import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import REGISTRY, CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

# Seconds: from a cached tiny model on a GPU (tens of ms) to a cold SDXL load from a slow disk.
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

JOBS_SUBMITTED = Counter("diffusionapi_jobs_submitted_total", "Jobs accepted into the queue", ["kind"])
JOBS = Counter("diffusionapi_jobs_total", "Jobs that reached a final state", ["kind", "state"])
JOB_RETRIES = Counter("diffusionapi_job_retries_total",
                      "Job runs that are a second or later attempt (worker died, server restarted)")
JOB_SECONDS = Histogram("diffusionapi_job_duration_seconds", "A finished job's run time (start to final state)",
                        ["kind", "state"], buckets=_SECONDS)
PHASE_SECONDS = Histogram("diffusionapi_job_phase_seconds",
                          "Time per job phase: queue_wait, model_load (only jobs that loaded one), sampling, "
                          "decode (VAE), encode (image files)", ["phase"], buckets=_SECONDS)
STEPS = Counter("diffusionapi_sampling_steps_total", "Sampler steps of finished jobs (hires steps included)")
IMAGES = Counter("diffusionapi_images_total", "Images produced", ["kind"])
MODEL_LOADS = Counter("diffusionapi_model_loads_total", "Model loads (a job whose model was not resident)",
                      ["model"])
PIPELINE_CACHE = Counter("diffusionapi_pipeline_cache_total",
                         "Finished jobs whose models were resident (hit) or had to be loaded (miss)", ["result"])
HOST_CACHE = Counter("diffusionapi_host_cache_total",
                     "Model loads served from host RAM (hit) or from disk while the host cache was on (miss)",
                     ["result"])
WEBHOOKS = Counter("diffusionapi_webhook_deliveries_total",
                   "Webhook delivery attempts by outcome: delivered, retrying, failed", ["event", "outcome"])
HTTP = Counter("diffusionapi_http_requests_total", "HTTP requests by route template and status",
               ["method", "route", "status"])
HTTP_SECONDS = Histogram("diffusionapi_http_request_duration_seconds", "HTTP request time", ["method", "route"],
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
REJECTED = Counter("diffusionapi_submits_rejected_total",
                   "Submits refused with 503 (queue full, disk low, backend down) or 429", ["route", "status"])
OUTPUTS_REMOVED = Counter("diffusionapi_outputs_removed_total",
                          "Output images and unread results removed by retention", ["reason"])
MODEL_INSTALLS = Counter("diffusionapi_model_installs_total", "Model installs over the API by outcome",
                         ["outcome"])


class _LiveCollector:
    """Gauges read when Prometheus scrapes: the queue (from the backend that registered a
    source) and GPU memory per device (only when this process already uses CUDA)."""

    def __init__(self):
        self.queue_source: Callable[[], dict | None] | None = None
        self.disk_source: Callable[[], dict] | None = None

    def collect(self):
        stats = None
        if self.queue_source is not None:
            try:
                stats = self.queue_source()
            except Exception as e:  # noqa: BLE001 - a scrape must answer even with Redis down
                log.debug("queue stats unavailable: %s", e)
        if stats is not None:
            yield GaugeMetricFamily("diffusionapi_queue_waiting", "Jobs waiting", value=stats["waiting"])
            yield GaugeMetricFamily("diffusionapi_queue_running", "Jobs running", value=stats["running"])
            yield GaugeMetricFamily("diffusionapi_queue_oldest_wait_seconds",
                                    "How long the oldest waiting job has waited (0: none waits)",
                                    value=stats["oldest_wait_sec"])
        if self.disk_source is not None:
            try:
                disk = self.disk_source()
            except OSError:
                disk = {}
            g = GaugeMetricFamily("diffusionapi_disk_free_bytes", "Free space where outputs and the queue live",
                                  labels=["dir"])
            for name, free in disk.items():
                g.add_metric([name], free)
            yield g
        yield from _gpu_memory()


def _gpu_memory():
    torch = sys.modules.get("torch")  # never import torch for a scrape (API nodes have none loaded)
    try:  # the worker thread may be importing torch right now (a partly initialised module)
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
    except AttributeError:
        return
    g = GaugeMetricFamily("diffusionapi_gpu_memory_bytes", "GPU memory held by tensors: in_use, peak (since start), "
                          "reserved (by the caching allocator)", labels=["device", "kind"])
    for i in range(torch.cuda.device_count()):
        g.add_metric([f"cuda:{i}", "in_use"], torch.cuda.memory_allocated(i))
        g.add_metric([f"cuda:{i}", "peak"], torch.cuda.max_memory_allocated(i))
        g.add_metric([f"cuda:{i}", "reserved"], torch.cuda.memory_reserved(i))
    yield g


LIVE = _LiveCollector()
REGISTRY.register(LIVE)


def exposition() -> tuple[bytes, str]:
    """The scrape body and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


# ---------------------------------------------------------------------------- a worker's port

def serve_worker_http(port: int, ready: Callable[[], dict], host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` of a cluster worker, which has no HTTP API of its
    own, on a daemon thread. ``ready()`` -> {check: None | why not}."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path == "/metrics":
                body, ctype, code = *exposition(), 200
            elif self.path in ("/healthz", "/readyz"):
                if self.path == "/healthz":
                    ok, out = True, {"status": "ok"}
                else:  # the same body as the API's /readyz (api/health.py)
                    checks = ready()
                    failed = sorted(k for k, v in checks.items() if v is not None)
                    ok, out = not failed, {"status": "not ready" if failed else "ready", "failed": failed,
                                           "checks": checks}
                body = json.dumps(out).encode()
                ctype, code = "application/json", 200 if ok else 503
            else:
                body, ctype, code = b"not found\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes every few seconds: not worth a log line each
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="diffusionapi-metrics", daemon=True).start()
    return server
