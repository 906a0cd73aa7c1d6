"""Idempotency-Key on submit, embedded backend (#32): a submit retried with the same key by the
same caller returns the first job, also after a crash and restart of the server. The Celery
backend's side is in tests/test_cluster_faults.py (a retry after the API node died mid-request)
and tests/test_cluster_state.py (the submit script)."""
from __future__ import annotations

import json
import time

import httpx

from diffusionapi.jobs.backends.embedded.store import JobStore

from .conftest import SMALL, ServerProcess, make_settings
import pytest

pytestmark = pytest.mark.processes  # the fast tier (./test.sh --quick) leaves these out

JOB = dict(SMALL, model="tiny-sd15")


def _final(c: httpx.Client, job_id: str, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = c.get(f"/queue/{job_id}", params={"wait": 10})
        assert r.status_code == 200, r.text
        if r.json()["state"] in ("done", "error", "cancelled"):
            return r.json()
    raise TimeoutError(job_id)


def test_same_key_same_job_across_a_kill_9_and_restart(model_store, tmp_path):
    settings = make_settings(model_store, tmp_path, api_key="k1")
    auth = {"Authorization": "Bearer k1"}
    srv = ServerProcess(settings).start()
    try:
        c = httpx.Client(base_url=srv.url, timeout=30, headers=auth)
        first = c.post("/txt2img", json=dict(JOB, seed=1), headers={"Idempotency-Key": "order-1"})
        assert first.status_code == 200, first.text
        job = first.json()["job_id"]
        again = c.post("/txt2img", json=dict(JOB, seed=1), headers={"Idempotency-Key": "order-1"})
        assert again.json()["job_id"] == job
        other = c.post("/txt2img", json=dict(JOB, seed=2), headers={"Idempotency-Key": "order-2"}).json()["job_id"]
        plain = [c.post("/txt2img", json=dict(JOB, seed=3)).json()["job_id"] for _ in range(2)]  # no key: two jobs
        assert len({job, other, *plain}) == 4
        bad = c.post("/txt2img", json=JOB, headers={"Idempotency-Key": "x" * 256})
        assert bad.status_code == 400 and "Idempotency-Key" in bad.json()["error"]
    finally:
        srv.kill9()
    srv2 = ServerProcess(settings, port=srv.port).start()
    try:
        c = httpx.Client(base_url=srv2.url, timeout=30, headers=auth)
        assert c.post("/txt2img", json=dict(JOB, seed=1), headers={"Idempotency-Key": "order-1"}).json()["job_id"] == job
        body = _final(c, job)
        assert body["state"] == "done"
        # Collected, and still the same key: the same id (now unknown: its result was read), no new job.
        assert c.post("/txt2img", json=dict(JOB, seed=1), headers={"Idempotency-Key": "order-1"}).json()["job_id"] == job
        assert c.get(f"/queue/{job}").status_code == 404
        listed = {j["job_id"] for j in c.get("/queue").json()["jobs"]}
        assert listed <= {other, *plain}
        for j in (other, *plain):
            assert _final(c, j)["state"] == "done"
    finally:
        srv2.stop()


def test_a_key_whose_file_a_crash_cut_short_comes_back_from_its_job_record(tmp_path):
    store = JobStore(tmp_path / "queue")
    idem = {"key": "ab" * 32, "expires": time.time() + 60}
    store.create("job-1", {"prompt": "p"}, "txt2img", idem=idem)
    store.create("job-2", {"prompt": "p"}, "txt2img", idem={"key": "cd" * 32, "expires": time.time() - 1})
    store.idem_path(idem["key"]).unlink()  # the crash came between the record and the key's file
    records = [json.loads(p.read_text()) for p in sorted(store.dir.glob("*_job.json"))]
    store.recover_idem(records)
    assert store.idem_job(idem["key"]) == "job-1"
    assert store.idem_job("cd" * 32) is None and not store.idem_path("cd" * 32).exists()  # expired: gone
