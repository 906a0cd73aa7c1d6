"""The embedded backend's files: one job record and one status per job, written atomically.

Files, per the seed: ``QUEUE_DIR/<id>_job.json`` (the job record, written with fsync before the
submit answers, so a job survives a crash from that moment) and ``QUEUE_DIR/<id>.json`` (its
``JobStatus``). Both are replaced atomically (temp file + rename): a reader never sees half a
file. After the final read of a finished job both are deleted; the images stay in the outputs
directory.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from ....files import write_atomic
from ...resolve import without_inputs
from ...status import JobStatus

log = logging.getLogger(__name__)


@dataclass
class IndexEntry:
    """What a listing shows of a job, kept in memory beside its files: GET /queue, /cluster and
    /sdapi/v1/progress read this, never every record on disk."""
    kind: str
    created_at: float
    state: str = "queued"
    current_phase: str = "queued"
    progress: float = 0.0
    owner: str | None = None


class JobStore:
    def __init__(self, queue_dir: Path):
        self.dir = Path(queue_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, IndexEntry] = {}
        self._lock = threading.Lock()

    def index(self) -> dict[str, IndexEntry]:
        """A copy of the listing index: job id -> IndexEntry, in creation order."""
        with self._lock:
            return {k: IndexEntry(**vars(v)) for k, v in self._index.items()}

    def job_path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}_job.json"

    def status_path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.json"

    def create(self, job_id: str, payload: dict, kind: str = "txt2img", owner: dict | None = None,
               idem: dict | None = None) -> None:
        """``owner``: {name, priority, share} (the queue rebuilds its fair order from it after a restart).
        ``idem``: {"key": hash, "expires": unix time} of the submit's Idempotency-Key; kept in
        the record (written first: a crash before ``remember_idem`` is repaired at start)."""
        record = {"job_id": job_id, "kind": kind, "payload": payload, "created_at": time.time(), "attempts": 0,
                  **({"owner": owner} if owner else {}), **({"idem": idem} if idem else {})}
        with self._lock:
            self._index[job_id] = IndexEntry(kind, record["created_at"], owner=(owner or {}).get("name"))
        self.write_status(job_id, JobStatus.queued(), fsync=True)
        write_atomic(self.job_path(job_id), json.dumps(record).encode(), fsync=True)
        if idem:
            self.remember_idem(idem, job_id)

    # ---- Idempotency-Key: QUEUE_DIR/idem/<hash>.json {job_id, expires}, outliving the job's own
    # files (a retry after the job was collected still gets its id, within the window).
    def idem_path(self, key: str) -> Path:
        return self.dir / "idem" / f"{key}.json"

    def remember_idem(self, idem: dict, job_id: str) -> None:
        path = self.idem_path(idem["key"])
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, json.dumps({"job_id": job_id, "expires": idem["expires"], "fp": idem.get("fp")}).encode(),
                     fsync=True)

    def idem_entry(self, key: str) -> tuple[str, str | None] | None:
        """(job id, request fingerprint or None) a live idempotency key names; an expired one is deleted."""
        data = _read_json(self.idem_path(key))
        if not data or not data.get("job_id"):
            return None
        if data.get("expires", 0) < time.time():
            self.idem_path(key).unlink(missing_ok=True)
            return None
        return data["job_id"], data.get("fp")

    def idem_job(self, key: str) -> str | None:
        """The job id a live idempotency key names; an expired one is deleted."""
        entry = self.idem_entry(key)
        return entry[0] if entry else None

    def recover_idem(self, records: list[dict]) -> None:
        """At start: keys whose file a crash cut short come back from their job records; expired
        ones go."""
        for record in records:
            idem = record.get("idem")
            if idem and idem.get("expires", 0) >= time.time() and not self.idem_path(idem["key"]).exists():
                self.remember_idem(idem, record["job_id"])
        for p in (self.dir / "idem").glob("*.json") if (self.dir / "idem").is_dir() else ():
            self.idem_job(p.stem)

    def read_job(self, job_id: str) -> dict | None:
        return _read_json(self.job_path(job_id))

    def write_job(self, job_id: str, record: dict) -> None:
        write_atomic(self.job_path(job_id), json.dumps(record).encode(), fsync=True)

    def read_status(self, job_id: str) -> JobStatus | None:
        data = _read_json(self.status_path(job_id))
        if data is None:
            return None
        try:
            return JobStatus.model_validate(data)
        except ValidationError:
            return None

    def write_status(self, job_id: str, status: JobStatus | dict, *, fsync: bool = False) -> None:
        if isinstance(status, dict):
            status = JobStatus.model_validate(status)
        write_atomic(self.status_path(job_id), json.dumps(status.to_record()).encode(), fsync=fsync)
        if status.is_final:  # (before the index says so: a listing that shows the job ended finds it slim)
            self.drop_inputs(job_id)
        with self._lock:
            entry = self._index.get(job_id)
            if entry is not None:
                entry.state, entry.current_phase, entry.progress = status.state, status.current_phase, status.progress

    def drop_inputs(self, job_id: str) -> None:
        """A job that ended never runs again: its input images (often megabytes of base64) leave
        the record now, so finished, cancelled and unread jobs cost a small file each."""
        record = self.read_job(job_id)
        payload = without_inputs((record or {}).get("payload"))
        if payload is None:
            return
        record["payload"] = payload
        try:
            self.write_job(job_id, record)
        except OSError as e:  # the job is final either way; the space comes back when it is read
            log.warning("could not drop the inputs of job %s: %s", job_id, e)

    def owner(self, job_id: str) -> str | None:
        with self._lock:
            entry = self._index.get(job_id)
            return entry.owner if entry is not None else None

    def delete(self, job_id: str, *, missing_ok_errors: bool = False) -> None:
        with self._lock:
            self._index.pop(job_id, None)
        for p in (self.status_path(job_id), self.job_path(job_id)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                if not missing_ok_errors:
                    raise

    # ------------------------------------------------------------------ retention (retention.py)
    def final_ids_before(self, before: float) -> list[str]:
        """Jobs whose status was last written before ``before`` (unix time): candidates to expire."""
        out = []
        for p in self.dir.glob("*.json"):
            job_id = p.stem
            if job_id.endswith("_job") or len(job_id) != 36:
                continue
            try:
                if p.stat().st_mtime < before:
                    out.append(job_id)
            except FileNotFoundError:
                continue
        return out

    def mark_expired(self, job_id: str, reason: str) -> None:
        """A tombstone: the id answers 410 with ``reason`` (kept TOMBSTONE_SEC, see prune_expired)."""
        folder = self.dir / "expired"
        folder.mkdir(exist_ok=True)
        write_atomic(folder / f"{job_id}.json", json.dumps({"reason": reason, "at": time.time()}).encode(),
                     fsync=False)

    def expired_reason(self, job_id: str) -> str | None:
        data = _read_json(self.dir / "expired" / f"{job_id}.json")
        return data.get("reason") if isinstance(data, dict) else None

    def prune_expired(self, before: float) -> None:
        for p in (self.dir / "expired").glob("*.json"):
            try:
                if p.stat().st_mtime < before:
                    p.unlink()
            except FileNotFoundError:
                continue

    def set_aside(self, path: Path, reason: str) -> None:
        """Move a torn or corrupt record out of the way so start-up goes on."""
        bad = self.dir / "corrupt"
        bad.mkdir(exist_ok=True)
        log.error("job record %s is unreadable (%s); moved to %s", path.name, reason, bad)
        os.replace(path, bad / path.name)

    def recover(self) -> list[tuple[dict, JobStatus | None]]:
        """Every job record on disk with its status, oldest first; corrupt ones set aside."""
        out = []
        for p in sorted(self.dir.glob("*_job.json")):
            try:
                record = json.loads(p.read_text())
                if not isinstance(record, dict) or "job_id" not in record or "payload" not in record:
                    raise ValueError("missing fields")
            except (OSError, ValueError) as e:
                self.set_aside(p, str(e))
                continue
            status = None
            sp = self.status_path(record["job_id"])
            try:
                status = JobStatus.model_validate_json(sp.read_bytes())
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as e:  # pydantic's ValidationError is a ValueError
                self.set_aside(sp, str(e).splitlines()[0])
            out.append((record, status))
        for stray in self.dir.glob(".*.tmp"):  # temp files of writes a crash cut short
            stray.unlink(missing_ok=True)
        out.sort(key=lambda rs: rs[0].get("created_at", 0))
        with self._lock:
            self._index = {r["job_id"]: IndexEntry(r.get("kind", "txt2img"), r.get("created_at", 0.0),
                                                   *((st.state, st.current_phase, st.progress) if st else
                                                     ("queued", "queued", 0.0)),
                                                   owner=(r.get("owner") or {}).get("name"))
                           for r, st in out}
        return out


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        return None
