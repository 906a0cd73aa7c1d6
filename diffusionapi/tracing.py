"""Optional OpenTelemetry traces: one span per finished job with a child span per phase
(queue_wait, model_load, sampling, decode, encode), when the standard ``OTEL_*`` variables say
where to send them (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, or
``OTEL_TRACES_EXPORTER=otlp``; ``OTEL_SERVICE_NAME`` names the service, default ``diffusionapi``).

The spans are built when the job ends, from the same phase seconds as the ``done`` log record and
the phase histogram (jobs/observe.py calls :func:`job_ended`), so the three never disagree and a
job's hot path carries no tracing code. Needs ``pip install diffusionapi[otel]``
(opentelemetry-sdk and the OTLP/HTTP exporter); without them, or without ``OTEL_*``, nothing is done.
"""
from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)

# The order phases happen in, for laying the child spans out one after another.
PHASE_ORDER = ("model_load", "sampling", "upscale", "decode", "encode")

_lock = threading.Lock()
_tracer = None
_checked = False


def _wanted() -> bool:
    env = os.environ
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(exporter or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def use(provider) -> None:
    """Trace into ``provider`` (an SDK TracerProvider) from now on (tests; a host application)."""
    global _tracer, _checked
    with _lock:
        _tracer, _checked = (provider.get_tracer("diffusionapi") if provider is not None else None), True


def tracer():
    """The tracer, set up from ``OTEL_*`` on first use; None when tracing is off."""
    global _tracer, _checked
    if _checked:
        return _tracer
    with _lock:
        if _checked:
            return _tracer
        _checked = True
        if not _wanted():
            return None
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            log.warning("OTEL_* is set but opentelemetry-sdk is not installed (pip install diffusionapi[otel]); "
                        "no traces")
            return None
        provider = TracerProvider(resource=Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME", "diffusionapi")}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # endpoint etc. from OTEL_*
        _tracer = provider.get_tracer("diffusionapi")
        log.info("OpenTelemetry traces on: a span per job and phase")
        return _tracer


def job_ended(job_id: str, kind: str, state: str, seconds: float | None, phases: dict[str, float],
              queue_wait: float | None, error: str | None = None) -> None:
    """Record the trace of a job that just ended (now): job span, then its phases in order."""
    t = tracer()
    if t is None:
        return
    from opentelemetry.trace import Status, StatusCode

    ns = 1_000_000_000
    end = time.time_ns()
    start_run = end - int((seconds or 0.0) * ns)
    start = start_run - int((queue_wait or 0.0) * ns)
    attrs = {"diffusionapi.job_id": job_id, "diffusionapi.kind": kind, "diffusionapi.state": state}
    job = t.start_span(f"job {kind}", start_time=start, attributes=attrs)
    try:
        from opentelemetry import trace

        ctx = trace.set_span_in_context(job)
        if queue_wait:
            t.start_span("queue_wait", context=ctx, start_time=start).end(end_time=start_run)
        at = start_run
        for phase in sorted(phases, key=lambda p: PHASE_ORDER.index(p) if p in PHASE_ORDER else len(PHASE_ORDER)):
            length = int(phases[phase] * ns)
            t.start_span(phase, context=ctx, start_time=at).end(end_time=min(at + length, end))
            at = min(at + length, end)
        if state == "error":
            job.set_status(Status(StatusCode.ERROR, error or "failed"))
    finally:
        job.end(end_time=end)
