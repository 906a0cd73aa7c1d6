"""What a job's life tells the outside while it runs: event-stream events and webhooks.

A backend calls these hooks from its worker (any thread); they only append to the
in-process :class:`EventLog` and hand webhooks to the durable :class:`WebhookQueue` through a
small executor, so the worker never waits for a network, a listener or a large file write.
"""
from __future__ import annotations

import base64
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from .events import EventLog
from .states import PROCESSING, progress_event
from .webhooks import WebhookQueue

log = logging.getLogger(__name__)


class LiveFeed:
    def __init__(self, settings):
        self.settings = settings
        self.events = EventLog(settings.events_retention_sec)
        self.hooks = JobWebhooks(settings)
        self.webhooks = self.hooks.queue
        self._positions: dict[str, int] = {}
        self._previews: dict[str, tuple[str, int]] = {}   # job -> (base64 JPEG, step): the latest
        self._steps: dict[str, tuple[int, int]] = {}      # job -> (step, total) of the current stage
        self._lock = threading.Lock()

    def start(self) -> None:
        self.hooks.start()

    def stop(self) -> None:
        self.hooks.stop()

    # ------------------------------------------------------------------ lifecycle hooks
    def queued(self, job_id: str, position: int | None) -> None:
        """A job's position (1, 2, ...) when it is queued or when it changes."""
        if position is None:
            return
        with self._lock:
            if self._positions.get(job_id) == position:
                return
            self._positions[job_id] = position
        self.events.publish(job_id, "queued", {"position": position})

    def positions(self, snapshot: list[tuple[str, int]]) -> None:
        """Everyone behind moved up: tell the jobs someone follows now (a listener that comes
        later is sent the position then; see the backend's catch-up)."""
        followed = self.events.listened_jobs()
        for job_id, pos in snapshot:
            if pos > 0 and job_id in followed:
                self.queued(job_id, pos)

    def started(self, job_id: str) -> None:
        with self._lock:
            self._positions.pop(job_id, None)
        self.events.publish(job_id, "started", {})

    def progress(self, job_id: str, payload: dict | None, phase: str, progress: float,
                 step: int | None = None, total: int | None = None) -> None:
        data = progress_event(round(progress, 2), phase, step, total)
        if step is not None:
            with self._lock:
                self._steps[job_id] = (step, total)
        self.events.publish(job_id, "progress", data)
        self.hooks.progress(job_id, payload, data)

    def preview(self, job_id: str, jpeg: bytes, step: int, total: int | None = None) -> None:
        b64 = base64.b64encode(jpeg).decode()
        with self._lock:
            self._previews[job_id] = (b64, step)
        self.events.publish(job_id, "preview", {"image": b64, "step": step, "total": total})

    def latest_preview(self, job_id: str) -> tuple[str, int] | None:
        with self._lock:
            return self._previews.get(job_id)

    def latest_step(self, job_id: str) -> tuple[int, int] | None:
        with self._lock:
            return self._steps.get(job_id)

    def ended(self, job_id: str, payload: dict | None, state: str, response: Callable[[], dict | None]) -> None:
        """The job reached a final state; ``response()`` builds its final /queue/{id} answer (image
        included) without consuming it. Called by the worker: the building happens elsewhere."""
        self.forget(job_id)
        self.hooks.ended(job_id, payload, state, response)

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._positions.pop(job_id, None)
            self._previews.pop(job_id, None)
            self._steps.pop(job_id, None)
        self.hooks.forget(job_id)


class JobWebhooks:
    """A job's webhooks (its ``webhook`` field): progress ones throttled, final ones with the final
    answer as body, recorded in the durable :class:`WebhookQueue` by a small executor. Used by the
    embedded backend's :class:`LiveFeed` and by cluster workers alike."""

    def __init__(self, settings, on_record: Callable[[dict], None] | None = None):
        self.settings = settings
        self.queue = WebhookQueue(Path(settings.queue_dir) / "webhooks", settings.webhook_secret,
                                  settings.webhook_allowed_hosts, max_tries=settings.webhook_max_tries,
                                  backoff_sec=settings.webhook_backoff_sec, timeout_sec=settings.webhook_timeout_sec,
                                  on_record=on_record, concurrency=settings.webhook_concurrency,
                                  per_host=settings.webhook_per_host)
        self._executor: ThreadPoolExecutor | None = None
        self._progress_sent: dict[str, float] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="diffusionapi-webhook-enqueue")
        self.queue.start()

    def stop(self) -> None:
        if self._executor:
            self._executor.shutdown(wait=True)  # queued webhooks are recorded before we stop
        self.queue.stop()

    def deliveries(self) -> list[dict]:
        return self.queue.deliveries()

    def progress(self, job_id: str, payload: dict | None, data: dict) -> None:
        """``data``: the progress event's {progress, phase, step, total}."""
        hook = _webhook(payload)
        if not hook or "progress" not in hook.get("events", ()):
            return
        now = time.monotonic()
        with self._lock:
            if now - self._progress_sent.get(job_id, -1e9) < self.settings.webhook_progress_interval_sec:
                return
            self._progress_sent[job_id] = now
        body = {"job_id": job_id, "state": PROCESSING, "current_phase": data["phase"], **data}
        self._submit(self._enqueue, job_id, "progress", hook["url"], body, 1)

    def ended(self, job_id: str, payload: dict | None, state: str, response: Callable[[], dict | None]) -> None:
        """The job reached ``state``; ``response()`` builds its final answer (run on the executor)."""
        self.forget(job_id)
        hook = _webhook(payload)
        if hook and state in hook.get("events", ()):
            self._submit(self._enqueue_final, job_id, state, hook, response)

    def record_final(self, job_id: str, state: str, hook: dict, body: dict) -> None:
        """Record a final webhook whose body is built already, now (in the caller's thread)."""
        if state in hook.get("events", ()):
            self._enqueue_final(job_id, state, hook, lambda: body)

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._progress_sent.pop(job_id, None)

    # ------------------------------------------------------------------ internals
    def _submit(self, fn, *args) -> None:
        if self._executor is None:
            fn(*args)
            return
        try:
            self._executor.submit(fn, *args)
        except RuntimeError:  # shutting down: record it here rather than lose it
            fn(*args)

    def _enqueue_final(self, job_id: str, state: str, hook: dict, response: Callable[[], dict | None]) -> None:
        try:
            body = response()
        except Exception:  # noqa: BLE001
            log.exception("could not build the %s webhook body of job %s", state, job_id)
            return
        if body is None:
            return
        if not hook.get("include_image", True):
            body = {k: v for k, v in body.items() if k not in ("image", "images")}
        self._enqueue(job_id, state, hook["url"], body, None)

    def _enqueue(self, job_id: str, event: str, url: str, body: dict, max_tries: int | None) -> None:
        try:
            self.queue.enqueue(job_id, event, url, json.dumps(body).encode(), max_tries=max_tries)
        except Exception:  # noqa: BLE001 - a webhook must never fail a job
            log.exception("could not record the %s webhook of job %s", event, job_id)


def _webhook(payload: dict | None) -> dict | None:
    hook = (payload or {}).get("webhook")
    return hook if isinstance(hook, dict) and hook.get("url") else None
