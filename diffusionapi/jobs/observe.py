"""A job's life as log records and metrics: one function per lifecycle event, one call site each.

  submitted        api/jobs.py submit (every dialect's submit goes through it)
  cancel_requested api/jobs.py and /sdapi's interrupt (who asked)
  started          the embedded worker (worker.py ``_begin``) and a cluster worker's ``run``
  ended            the embedded backend's ``_ended`` (worker and queued cancels alike); a cluster
                   worker's ``run``; an API node's cancel of a queued cluster job
  interrupted      a graceful stop put a running job back in the queue
  expired          retention forgot an unread result (the embedded backend's ``expire``)

Each record carries ``job_id`` and ``event`` as structured fields (``DIFFUSIONAPI_LOG_FORMAT=json``
prints them as keys) and says the same in its text. The ``done`` record has the seconds of each
phase (``JobStatus.phase_sec``, written by ``runner.finish``); the same numbers feed the
``diffusionapi_job_phase_seconds`` histogram, so logs and metrics never disagree.
"""
from __future__ import annotations

import logging
import time
from urllib.parse import urlsplit

from .. import metrics, tracing
from ..logs import caller
from .states import CANCELLED, DONE, ERROR

log = logging.getLogger("diffusionapi.jobs")

# Queue waits of the jobs running in this process, from ``started`` to ``ended`` (their trace
# begins when they were queued). Bounded: a job that never ends here must not leak.
_waits: dict[str, float] = {}
_MAX_WAITS = 10_000


def _get(status, name, default=None):
    return status.get(name, default) if isinstance(status, dict) else getattr(status, name, default)


def submitted(job_id: str, kind: str, payload: dict) -> None:
    model = payload.get("model")
    who = caller()
    log.info("job %s submitted: %s, model %s, by %s", job_id, kind, model or "-", who,
             extra={"event": "submitted", "job_id": job_id, "kind": kind, "model": model, "caller": who})
    metrics.JOBS_SUBMITTED.labels(kind).inc()


def refused(kind: str, status: int, reason: str) -> None:
    """A submit answered 503/429: nothing was queued (the HTTP middleware counts it)."""
    log.warning("submit refused (%d): %s: %s", status, kind, reason,
                extra={"event": "refused", "kind": kind, "status": status, "reason": reason, "caller": caller()})


def cancel_requested(job_id: str) -> None:
    """Logged before the backend acts, so it precedes the ``cancelled`` record of a queued job."""
    who = caller()
    log.info("job %s: cancel requested by %s", job_id, who,
             extra={"event": "cancel_requested", "job_id": job_id, "caller": who})


def started(job_id: str, kind: str, payload: dict | None, worker: str, attempt: int,
            created_at: float | None) -> None:
    waited = max(0.0, time.time() - created_at) if created_at else None
    model = (payload or {}).get("model")
    log.info("job %s started on %s (attempt %d, waited %s s): %s, model %s", job_id, worker, attempt,
             f"{waited:.2f}" if waited is not None else "?", kind, model or "-",
             extra={"event": "started", "job_id": job_id, "worker": worker, "attempt": attempt, "kind": kind,
                    "model": model, "queue_wait_sec": round(waited, 3) if waited is not None else None})
    if waited is not None and attempt == 1:  # a retry's wait is not the queue's
        metrics.PHASE_SECONDS.labels("queue_wait").observe(waited)
        if len(_waits) >= _MAX_WAITS:
            _waits.pop(next(iter(_waits)))
        _waits[job_id] = waited
    if attempt > 1:
        log.warning("job %s retried: attempt %d (its worker died or the server restarted while it ran)",
                    job_id, attempt, extra={"event": "retried", "job_id": job_id, "attempt": attempt})
        metrics.JOB_RETRIES.inc()


def interrupted(job_id: str) -> None:
    log.info("job %s interrupted by a stop; back in the queue", job_id,
             extra={"event": "interrupted", "job_id": job_id})


def expired(job_id: str, reason: str) -> None:
    """Retention forgot a finished job nobody collected (retention.py)."""
    log.info("job %s expired unread: %s", job_id, reason, extra={"event": "expired", "job_id": job_id,
                                                                 "reason": reason})


def ended(job_id: str, kind: str, status, payload: dict | None = None) -> None:
    """``status``: the final JobStatus (or its record dict)."""
    state = _get(status, "state")
    seconds = _get(status, "generation_time_sec")
    model = (payload or _get(status, "payload") or {}).get("model")
    base = {"job_id": job_id, "kind": kind, "state": state, "model": model, "seconds": seconds}
    metrics.JOBS.labels(kind, state).inc()
    if seconds is not None:
        metrics.JOB_SECONDS.labels(kind, state).observe(seconds)
    phases: dict[str, float] = {}
    if state == DONE and kind == "install":  # models_install.py logs what it installed
        log.info("job %s done in %s s", job_id, seconds, extra={"event": "done", **base})
    elif state == DONE:
        phases = _done(job_id, kind, status, model, base)
    elif state == ERROR:
        log.warning("job %s failed after %s s: %s", job_id, seconds, _get(status, "error"),
                    extra={"event": "failed", "error": _get(status, "error"), **base})
    elif state == CANCELLED:
        log.info("job %s cancelled after %s s", job_id, seconds if seconds is not None else 0,
                 extra={"event": "cancelled", **base})
    tracing.job_ended(job_id, kind, state, seconds, phases, _waits.pop(job_id, None), _get(status, "error"))


def _done(job_id: str, kind: str, status, model: str | None, base: dict) -> dict[str, float]:
    load = _get(status, "load_time_sec") or 0.0
    phases = dict(_get(status, "phase_sec") or {})
    if load > 0:
        phases["model_load"] = load
        log.info("job %s: model %s loaded in %.2f s", job_id, model or "-", load,
                 extra={"event": "model_loaded", "job_id": job_id, "model": model, "seconds": load})
        metrics.MODEL_LOADS.labels(model or "-").inc()
    metrics.PIPELINE_CACHE.labels("miss" if load > 0 else "hit").inc()
    for phase, sec in phases.items():
        metrics.PHASE_SECONDS.labels(phase).observe(sec)
    images = _get(status, "images")
    n_images = len(images) if images else 1
    metrics.IMAGES.labels(kind).inc(n_images)
    payload = _get(status, "payload") or {}
    steps = _steps(kind, payload)
    if steps:
        metrics.STEPS.inc(steps)
    shown = ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
    log.info("job %s done in %s s (%s): %d image(s)", job_id, base["seconds"], shown or "no phases", n_images,
             extra={"event": "done", "phase_sec": phases, "images": n_images, "steps": steps, **base})
    return phases


def _steps(kind: str, payload: dict) -> int:
    """Sampler steps a finished job ran, from its payload echo (0 for an upscale)."""
    if kind == "upscale":
        return 0
    try:
        steps = int(payload.get("steps") or 0)
        hires = payload.get("hires") or {}
        if isinstance(hires, dict) and hires.get("enabled"):
            steps += int(hires.get("steps") or 0)
        return steps * int(payload.get("n_iter") or 1)
    except (TypeError, ValueError):
        return 0


def webhook_attempt(record: dict, attempt: dict, outcome: str) -> None:
    """One delivery attempt of a webhook (jobs/webhooks.py): delivered, retrying or failed."""
    metrics.WEBHOOKS.labels(record.get("event", "?"), outcome).inc()
    level = logging.WARNING if outcome == "failed" else logging.INFO
    parts = urlsplit(str(record.get("url", "")))
    url = f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{parts.path}"  # no query
    log.log(level, "webhook %s of job %s to %s: %s (attempt %d%s)", record.get("event"), record.get("job_id"),
            url, outcome, len(record.get("attempts", ())),
            f": {attempt['error']}" if attempt.get("error") else "",
            extra={"event": "webhook", "job_id": record.get("job_id"), "webhook_event": record.get("event"),
                   "url": url, "outcome": outcome, "status_code": attempt.get("status_code"),
                   "error": attempt.get("error"), "delivery_id": record.get("id")})
