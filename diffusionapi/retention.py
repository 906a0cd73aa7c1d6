"""A disk that never fills: retention of outputs and unread results, and the free-space floor.

- ``DIFFUSIONAPI_RESULT_TTL`` (seconds, or ``24h``/``30m``/``7d``): output images older than
  this are removed, and so are finished jobs nobody collected (their id then answers 410
  naming the TTL instead of 404).
- ``DIFFUSIONAPI_OUTPUTS_MAX_GB``: past this size the oldest output images are removed first;
  an unread job whose image went answers 410 naming the cap.
- ``DIFFUSIONAPI_MIN_FREE_GB``: a submit while the queue's or the outputs' disk has less free
  space is refused (503 + Retry-After) before anything is written (:func:`free_space_problem`).

Only files named like this service's outputs (``<job uuid>[-<k>].<ext>``) are ever removed:
whatever else an operator keeps in the folder is left alone. One :class:`Janitor` thread per
process that writes outputs (the embedded server, each cluster worker).
"""
from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

from . import metrics

log = logging.getLogger(__name__)

_OUTPUT = re.compile(r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})(?:-\d+)?\.[A-Za-z0-9]+$")
GB = 1024 ** 3
MIN_GAP_SEC = 1.0  # sweeps never follow each other closer than this (each lists outputs/)


def job_of_output(name: str) -> str | None:
    m = _OUTPUT.match(name)
    return m.group(1) if m else None


def ttl_reason(ttl: float) -> str:
    return f"results are kept for DIFFUSIONAPI_RESULT_TTL={ttl:g} s ({_human(ttl)})"


def cap_reason(cap_gb: float) -> str:
    return f"its image was removed to keep outputs under DIFFUSIONAPI_OUTPUTS_MAX_GB={cap_gb:g}"


def _human(sec: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if sec >= n:
            return f"{sec / n:g} {unit}"
    return f"{sec:g} s"


def free_space_problem(settings) -> str | None:
    """Why a submit must be refused for lack of disk (None: enough). One statvfs per folder."""
    floor = settings.min_free_gb
    if not floor:
        return None
    for folder in (Path(settings.queue_dir), Path(settings.outputs_dir)):
        probe = folder
        while not probe.exists() and probe != probe.parent:  # outputs/ appears with the first image
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if free < floor * GB:
            return (f"the disk of {folder} has {free / GB:.2f} GB free, below DIFFUSIONAPI_MIN_FREE_GB={floor:g}; "
                    "retry later")
    return None


def disk_free(settings) -> dict[str, int]:
    """Free bytes per folder, for the ``diffusionapi_disk_free_bytes`` gauge."""
    out = {}
    for name, folder in (("queue", settings.queue_dir), ("outputs", settings.outputs_dir)):
        probe = Path(folder)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        out[name] = shutil.disk_usage(probe).free
    return out


class Janitor:
    """Removes what retention says is due, every ``interval`` seconds on its own thread.

    ``expire_finals(before, reason)`` removes unread finished jobs that became final before
    ``before`` (the embedded backend's); ``expire_job(job_id, reason)`` one job whose image was
    removed by the cap. Both are optional: a cluster worker only has outputs to look after."""

    def __init__(self, settings, expire_finals: Callable[[float, str], int] | None = None,
                 expire_job: Callable[[str, str], bool] | None = None):
        self.outputs = Path(settings.outputs_dir)
        self.ttl = settings.result_ttl
        self.cap = settings.outputs_max_gb
        self.expire_finals = expire_finals
        self.expire_job = expire_job
        self.interval = min(60.0, max(0.5, (self.ttl or 240) / 4))
        self._stop = threading.Event()
        self._poked = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.ttl or self.cap)

    def start(self) -> None:
        if not self.enabled:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="diffusionapi-retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._poked.set()
        if self._thread:
            self._thread.join(10)

    def poke(self) -> None:
        """New images were written: with a size cap, sweep soon rather than at the next interval."""
        if self.cap:
            self._poked.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - retention must keep running
                log.exception("retention sweep failed")
            self._poked.wait(self.interval)
            self._poked.clear()
            if self._stop.wait(MIN_GAP_SEC):  # a burst of finished jobs: one sweep per gap
                return

    def sweep(self, now: float | None = None) -> dict[str, int]:
        """One pass: TTL first (results, then images), then the size cap, oldest first."""
        now = time.time() if now is None else now
        removed = {"ttl": 0, "cap": 0, "results": 0}
        if self.ttl and self.expire_finals is not None:
            removed["results"] = self.expire_finals(now - self.ttl, ttl_reason(self.ttl))
            if removed["results"]:
                metrics.OUTPUTS_REMOVED.labels("result_ttl").inc(removed["results"])
        files = self._outputs()
        if self.ttl:
            keep = []
            for mtime, size, path in files:
                if mtime < now - self.ttl:
                    if self._remove(path, "ttl"):
                        removed["ttl"] += 1
                else:
                    keep.append((mtime, size, path))
            files = keep
        if self.cap:
            total = sum(size for _, size, _ in files)
            for mtime, size, path in files:  # oldest first
                if total <= self.cap * GB:
                    break
                if self._remove(path, "cap"):
                    removed["cap"] += 1
                    total -= size
                    job_id = job_of_output(path.name)
                    if job_id and self.expire_job is not None:
                        self.expire_job(job_id, cap_reason(self.cap))
        if removed["ttl"] or removed["cap"] or removed["results"]:
            log.info("retention removed %d images past the TTL, %d over the outputs cap, %d unread results",
                     removed["ttl"], removed["cap"], removed["results"], extra={"event": "retention", **removed})
        return removed

    def _outputs(self) -> list[tuple[float, int, Path]]:
        out = []
        try:
            entries = list(self.outputs.iterdir())
        except FileNotFoundError:
            return out
        for p in entries:
            if not _OUTPUT.match(p.name):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, p))
        out.sort(key=lambda t: t[0])
        return out

    @staticmethod
    def _remove(path: Path, reason: str) -> bool:
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        metrics.OUTPUTS_REMOVED.labels(reason).inc()
        return True
