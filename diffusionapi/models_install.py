"""Models installed over the API (``POST /models/install``, admin key only): one file downloaded
into the folder of its kind, as a job of kind ``install`` that ``GET /queue/{id}`` and
``GET /queue/{id}/events`` follow like any other.

- Where: the folder setting of the kind (``KIND_DIRS``); the name is the URL's file name unless
  given, checked like any file name (no folders, a known extension).
- Safe: the URL must pass the webhook rule (jobs/webhooks.py ``check_target``) against
  ``DIFFUSIONAPI_MODEL_INSTALL_ALLOWED_HOSTS``, at submit and at every redirect hop (redirects are
  followed here, one at a time, never blindly; the token is sent only to its own host), and every
  connection goes to an address that rule just allowed (``pinned_client``: a name that answers a
  public address to the check and a private one to the connect reaches nothing).
- Bounded: more than ``DIFFUSIONAPI_MODEL_INSTALL_MAX_GB`` (announced or received) fails the job.
- Resumable: bytes go to ``<folder>/.<name>.part``; a dropped connection is retried from where it
  stopped (HTTP Range), and so is a later install of the same file after a failure or restart.
- Checked: with ``sha256``, a mismatch fails the job and removes the partial file.
- Atomic: the finished file is fsynced and renamed into place, so the registry (which scans the
  folders at every listing: the "rescan") never sees half a model.

Runs on its own thread (:class:`Installer`), never the GPU worker's: a download does not hold up
generation. The embedded backend owns it; a cluster installs on each worker host instead.
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urljoin, urlsplit

from . import metrics
from .jobs.states import JobCancelled, JobFailed, JobInterrupted, ProgressThrottle, final_state_of
from .jobs.status import JobStatus
from .jobs.webhooks import Resolver, WebhookRefused, check_target, pinned_client, resolve_host
from .registry import display_path

log = logging.getLogger(__name__)

# kind -> the Settings field of its folder (fields other features add are picked up when present).
KIND_DIRS = {"model": "models_dir", "lora": "loras_dir", "vae": "vae_dir", "text_encoder": "text_encoders_dir",
             "controlnet": "controlnet_dir", "upscaler": "upscalers_dir", "embedding": "embeddings_dir"}
EXTENSIONS = {"model": (".safetensors", ".ckpt"), "lora": (".safetensors",),
              "embedding": (".safetensors", ".pt", ".bin"), "upscaler": (".pth", ".pt", ".safetensors")}
ANY_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
MAX_REDIRECTS = 5
RETRIES = 3  # a dropped connection resumes this many times within one job
GB = 1024 ** 3


class InstallRefused(ValueError):
    """The request cannot be accepted (a 4xx): ``status`` and the message say why."""

    def __init__(self, message: str, status: int = 422, field: str = "body"):
        super().__init__(message)
        self.status, self.field = status, field


def folder_of(settings, kind: str) -> Path:
    attr = KIND_DIRS.get(kind)
    folder = getattr(settings, attr, None) if attr else None
    if folder is None:
        raise InstallRefused(f"kind: {kind!r} has no folder on this server (known: "
                             f"{', '.join(k for k, a in KIND_DIRS.items() if hasattr(settings, a))})", field="kind")
    return Path(folder)


def plan_install(settings, url: str, kind: str, name: str | None, sha256: str | None) -> dict:
    """The install job's payload, or InstallRefused: URL allowed, name and folder sound, not there yet."""
    try:
        check_target(url, settings.model_install_allowed_hosts)
    except WebhookRefused as e:
        raise InstallRefused(f"url: {str(e).replace('WEBHOOK_ALLOWED_HOSTS', 'MODEL_INSTALL_ALLOWED_HOSTS')}",
                             field="url") from e
    folder = folder_of(settings, kind)
    filename = name or Path(urlsplit(url).path).name
    allowed = EXTENSIONS.get(kind, ANY_EXTENSIONS)
    if name and not name.lower().endswith(allowed):
        filename = name + (Path(urlsplit(url).path).suffix or allowed[0])
    if not _NAME.match(filename or "") or ".." in filename:
        raise InstallRefused(f"name: {filename!r} is not a plain file name (letters, digits, . _ + -)", field="name")
    if not filename.lower().endswith(allowed):
        raise InstallRefused(f"name: a {kind} file ends with {', '.join(allowed)} (got {filename!r})", field="name")
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise InstallRefused("sha256: 64 hex digits", field="sha256")
    target = folder / filename
    if target.exists():
        raise InstallRefused(f"{display_path(target)} exists already; DELETE /models/{target.stem} first",
                             status=409, field="name")
    return {"url": url, "kind": kind, "name": target.stem, "sha256": sha256.lower() if sha256 else None,
            "path": display_path(target), "file": str(target.resolve())}


def _auth_headers(settings, url: str) -> dict:
    host = (urlsplit(url).hostname or "").lower()
    token = None
    if host == "huggingface.co" or host.endswith(".huggingface.co"):
        token = settings.hf_token
    elif host == "civitai.com" or host.endswith(".civitai.com"):
        token = settings.civitai_token
    return {"Authorization": f"Bearer {token}"} if token else {}


def download(settings, url: str, part: Path, *, progress: Callable[[int, int | None], None],
             cancelled: Callable[[], bool], client=None, resolve: Resolver = resolve_host) -> None:
    """``url`` into ``part``, resuming from what ``part`` holds; raises JobFailed or JobCancelled.
    ``resolve``: the name lookup (tests give a scripted one)."""
    import httpx

    cap = int(settings.model_install_max_gb * GB)
    own = client is None
    client = client or pinned_client(settings.model_install_allowed_hosts, httpx.Timeout(30, read=120), resolve,
                                     max_connections=4)
    try:
        for attempt in range(1, RETRIES + 1):
            try:
                _fetch(settings, client, url, part, cap, progress, cancelled, resolve)
                return
            except httpx.TransportError as e:  # dropped, reset, timed out: go on from what arrived
                have = part.stat().st_size if part.exists() else 0
                if attempt == RETRIES:
                    raise JobFailed(f"download failed {RETRIES} times ({type(e).__name__}: {e}); "
                                    f"{have} bytes kept: install again to resume") from e
                log.info("download of %s interrupted at byte %d (%s); resuming", url, have, e)
    finally:
        if own:
            client.close()


def _fetch(settings, client, url: str, part: Path, cap: int, progress, cancelled, resolve: Resolver) -> None:
    current = url
    for _hop in range(MAX_REDIRECTS + 1):
        try:
            check_target(current, settings.model_install_allowed_hosts, resolve)
        except WebhookRefused as e:
            raise JobFailed(f"url {current}: {e}") from e
        try:
            _fetch_hop(settings, client, current, part, cap, progress, cancelled)
            return
        except WebhookRefused as e:  # at the connect: the name answered another address than at the check
            raise JobFailed(f"url {current}: {e}") from e
        except _Redirect as r:
            current = r.location
    raise JobFailed(f"more than {MAX_REDIRECTS} redirects")


class _Redirect(Exception):
    """The hop answered a redirect to ``location`` (checked like the first URL before it is followed)."""

    def __init__(self, location: str):
        super().__init__(location)
        self.location = location


def _fetch_hop(settings, client, current: str, part: Path, cap: int, progress, cancelled) -> None:
    """One request: the file (or its rest) into ``part``, or _Redirect to the next hop."""
    have = part.stat().st_size if part.exists() else 0
    headers = _auth_headers(settings, current)
    if have:
        headers["Range"] = f"bytes={have}-"
    with client.stream("GET", current, headers=headers) as r:
        if r.status_code in (301, 302, 303, 307, 308) and r.headers.get("location"):
            raise _Redirect(urljoin(current, r.headers["location"]))
        if r.status_code == 416 and have:  # nothing after what we have: it is all there
            progress(have, have)
            return
        if r.status_code == 206 and have:
            mode, total = "ab", _total(r, have)
        elif r.status_code == 200:
            mode, total, have = "wb", _total(r, 0), 0  # no ranges here: from the start
        else:
            raise JobFailed(f"download failed: HTTP {r.status_code} from {urlsplit(current).hostname}")
        if total is not None and total > cap:
            raise JobFailed(f"the file is {total / GB:.2f} GB, above DIFFUSIONAPI_MODEL_INSTALL_MAX_GB="
                            f"{settings.model_install_max_gb:g}")
        with open(part, mode) as f:
            for chunk in r.iter_bytes():
                if cancelled():
                    raise JobCancelled()
                have += len(chunk)
                if have > cap:
                    raise JobFailed(f"more than DIFFUSIONAPI_MODEL_INSTALL_MAX_GB="
                                    f"{settings.model_install_max_gb:g} GB received; stopped")
                f.write(chunk)
                progress(have, total)
            f.flush()
            os.fsync(f.fileno())
        if total is not None and have < total:  # the server closed early without an error
            raise _short_read(have, total)


def _short_read(have: int, total: int):
    import httpx

    return httpx.RemoteProtocolError(f"connection closed at byte {have} of {total}")


def _total(r, offset: int) -> int | None:
    if r.status_code == 206:
        m = re.search(r"/(\d+)$", r.headers.get("content-range", ""))
        if m:
            return int(m.group(1))
    length = r.headers.get("content-length")
    return offset + int(length) if length and length.isdigit() else None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Installer:
    """Runs install jobs one at a time on its own thread. ``host`` is the backend that holds the
    jobs: ``read_job(id)``, ``install_started(id, record)``, ``install_progress(id, phase, percent)``,
    ``install_ended(id, status, payload)``."""

    def __init__(self, settings, host):
        self.settings = settings
        self.host = host
        self.read_job = host.store.read_job
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._cancel: set[str] = set()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="diffusionapi-installer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._stopping.set()
        if self._thread:
            self._thread.join(10)

    def put(self, job_id: str) -> None:
        self._queue.put(job_id)

    def cancel(self, job_id: str) -> bool:
        """True when ``job_id`` is an install this installer holds (it stops at the next chunk)."""
        record = self.read_job(job_id) or {}
        if record.get("kind") != "install":
            return False
        self._cancel.add(job_id)
        return True

    def _loop(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            try:
                self.run(job_id)
            except Exception:  # noqa: BLE001 - the installer must survive anything
                log.exception("install %s: unexpected failure", job_id)

    def run(self, job_id: str) -> None:
        record = self.read_job(job_id)
        if record is None:
            return
        payload = record["payload"]
        target = Path(payload["file"])
        part = target.with_name(f".{target.name}.part")
        t0 = time.perf_counter()
        throttle = ProgressThrottle(0.25)

        def cancelled() -> bool:
            if self._stopping.is_set():  # a stop is no failure: the job resumes at the next start
                raise JobInterrupted()
            return job_id in self._cancel

        def progress(have: int, total: int | None) -> None:
            percent = 95.0 * have / total if total else 0.0
            if throttle.due("downloading"):
                self.host.install_progress(job_id, "downloading", percent)

        try:
            if cancelled():
                raise JobCancelled()
            self.host.install_started(job_id, record)
            self.host.install_progress(job_id, "downloading", 0.0)
            target.parent.mkdir(parents=True, exist_ok=True)
            download(self.settings, payload["url"], part, progress=progress, cancelled=cancelled)
            if payload.get("sha256"):
                self.host.install_progress(job_id, "verifying", 95.0)
                got = sha256_of(part)
                if got != payload["sha256"]:
                    part.unlink(missing_ok=True)
                    raise JobFailed(f"sha256 mismatch: expected {payload['sha256']}, got {got}; the download was removed")
            if target.exists():
                raise JobFailed(f"{payload['path']} appeared meanwhile; not replaced")
            os.replace(part, target)  # atomic: listings see the whole file or none
            _fsync_dir(target.parent)
            status = JobStatus(state="done", current_phase="done", progress=100.0, payload=_echo(payload),
                               generation_time_sec=round(time.perf_counter() - t0, 3))
            metrics.MODEL_INSTALLS.labels("done").inc()
            log.info("installed %s (%s) from %s", payload["path"], payload["kind"], urlsplit(payload["url"]).hostname,
                     extra={"event": "model_installed", "job_id": job_id, "path": payload["path"]})
        except JobInterrupted:
            self.host.install_interrupted(job_id)
            return
        except Exception as e:  # noqa: BLE001 - every failure is the job's final state
            state, message = final_state_of(e, job_id)
            metrics.MODEL_INSTALLS.labels(state).inc()
            status = JobStatus.failed(state, message, round(time.perf_counter() - t0, 3))
        finally:
            self._cancel.discard(job_id)
        self.host.install_ended(job_id, status, payload)


def _echo(payload: dict) -> dict:
    """What the final answer shows: the request and where the file went (not the absolute path)."""
    return {k: v for k, v in payload.items() if k != "file"}


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
