"""JobStore and JobQueue on real files: atomic writes, recovery, positions."""
from __future__ import annotations

import json
import threading

from diffusionapi.files import write_atomic
from diffusionapi.jobs.backends.base import QueueFull
from diffusionapi.jobs.backends.embedded.queue import JobQueue
from diffusionapi.jobs.backends.embedded.store import JobStore


def test_create_and_read(tmp_path):
    store = JobStore(tmp_path)
    store.create("a", {"prompt": "x"})
    assert store.read_job("a")["payload"] == {"prompt": "x"}
    assert store.read_status("a").state == "queued"
    store.delete("a")
    assert store.read_job("a") is None and store.read_status("a") is None
    assert not list(tmp_path.iterdir())


def test_atomic_writes_never_show_half_a_file(tmp_path):
    store = JobStore(tmp_path)
    store.write_status("j", {"state": "processing", "current_phase": "generation", "progress": 0})
    stop = threading.Event()
    bad = []

    def reader():
        while not stop.is_set():
            st = store.read_status("j")
            if st is None or st.state != "processing":
                bad.append(st)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(500):
        store.write_status("j", {"state": "processing", "current_phase": "generation", "progress": i,
                                "pad": "x" * (i % 97) * 50})
    stop.set()
    t.join()
    assert bad == []


def test_recover_sets_aside_corrupt_records(tmp_path):
    store = JobStore(tmp_path)
    store.create("good", {"prompt": "x"})
    (tmp_path / "torn_job.json").write_text('{"job_id": "torn", "payl')
    (tmp_path / "nofields_job.json").write_text(json.dumps({"x": 1}))
    store.create("badstatus", {"prompt": "y"})
    store.status_path("badstatus").write_text("{")
    (tmp_path / ".x.json.123.tmp").write_text("partial")
    found = store.recover()
    assert [r["job_id"] for r, _ in found] == ["good", "badstatus"]
    assert dict((r["job_id"], s) for r, s in found)["badstatus"] is None
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == ["badstatus.json", "nofields_job.json", "torn_job.json"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_queue_positions_cancel_and_limit(tmp_path):
    q = JobQueue(max_jobs=3)
    for j in "abc":
        q.put(j)
    try:
        q.put("d")
        raise AssertionError("expected QueueFull")
    except QueueFull:
        pass
    running = q.take()
    assert running.job_id == "a"
    assert [q.position(j) for j in "abc"] == [0, 1, 2]
    assert q.remove_waiting("b") and q.position("c") == 1
    assert q.cancel_running("a") and running.cancel.is_set()
    assert q.snapshot() == [("a", 0), ("c", 1)]


def test_write_atomic_replaces(tmp_path):
    p = tmp_path / "f.bin"
    write_atomic(p, b"one")
    write_atomic(p, b"two")
    assert p.read_bytes() == b"two" and [x.name for x in tmp_path.iterdir()] == ["f.bin"]
