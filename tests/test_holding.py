"""The test-support hold (tests/holding.py): a held job stays running until released or cancelled."""
from __future__ import annotations

import time

from .conftest import SMALL
from .holding import Hold


def test_a_held_job_runs_its_first_step_then_waits_until_released(server):
    hold = Hold()
    job = server.submit(**dict(SMALL, model="tiny-sd15", steps=3, prompt=hold.prompt))
    deadline = time.time() + 60
    while (st := server.client.get(f"/queue/{job}").json())["progress"] <= 0:
        assert st["state"] in ("queued", "processing") and time.time() < deadline
        time.sleep(0.02)
    time.sleep(0.5)  # (no promise is made on time: this only shows it did not go on by itself)
    st = server.client.get(f"/queue/{job}").json()
    assert st["state"] == "processing" and 0 < st["progress"] < 100
    other = server.submit(**dict(SMALL, model="tiny-sd15"))
    assert server.client.get(f"/queue/{other}").json()["state"] == "queued"
    hold.release()
    assert server.wait(job)["state"] == "done"
    assert server.wait(other)["state"] == "done"


def test_a_held_job_is_cancelled_at_once(server):
    blocker = server.submit_blocker()
    assert server.client.delete(f"/queue/{blocker}").json()["state"] == "cancelling"
    deadline = time.time() + 30
    while (st := server.client.get(f"/queue/{blocker}").json())["state"] == "processing":
        assert time.time() < deadline
        time.sleep(0.02)
    assert st["state"] == "cancelled"
