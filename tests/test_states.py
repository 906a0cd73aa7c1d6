"""jobs/states.py: the lifecycle facts every backend, the Lua scripts and the playground share."""
from __future__ import annotations

import time

import pytest

from diffusionapi.jobs import states
from diffusionapi.jobs.states import (CANCELLED, ERROR, FINAL_STATES, JobCancelled, JobFailed, JobInterrupted,
                                      ProgressThrottle, final_state_of, lua_prelude, progress_event)


def test_exceptions_end_a_job_one_way():
    assert final_state_of(JobCancelled()) == (CANCELLED, "cancelled by request")
    assert final_state_of(JobFailed("model 'x' is gone")) == (ERROR, "model 'x' is gone")
    assert final_state_of(ZeroDivisionError("boom")) == (ERROR, "ZeroDivisionError: boom")
    with pytest.raises(TypeError):  # not an end: the job is requeued
        final_state_of(JobInterrupted())


def test_engine_cancellation_is_the_lifecycle_one():
    from diffusionapi.engine.plan import JobCancelled as EngineCancelled

    assert EngineCancelled is JobCancelled


def test_progress_throttle_writes_phase_changes_and_stage_ends_at_once():
    t = ProgressThrottle(interval=3600)
    assert t.due("generation", 1, 10)        # first report
    assert not t.due("generation", 2, 10)    # within the interval
    assert t.due("generation", 10, 10)       # the stage's last step
    assert t.due("decoding")                 # a phase change
    fast = ProgressThrottle(interval=0.0)
    assert fast.due("generation", 1, 10) and (time.sleep(0.001) or fast.due("generation", 2, 10))


def test_progress_event_shape():
    assert progress_event(50.0, "generation", 5, 10) == {"progress": 50.0, "phase": "generation", "step": 5,
                                                         "total": 10}


def test_lua_prelude_names_every_state_and_the_final_ones(tmp_path):
    """The Redis scripts compare states through these names: run the prelude in a real Redis."""
    import redis

    from tests.cluster_fixtures import RedisServer

    server = RedisServer(tmp_path).start()
    try:
        r = redis.Redis(port=server.port)
        script = lua_prelude() + "return {QUEUED, PROCESSING, DONE, ERROR, CANCELLED, " \
                                 "tostring(is_final(DONE)), tostring(is_final(QUEUED))}"
        got = [x.decode() for x in r.eval(script, 0)]
        assert got == list(states.STATES) + ["true", "false"]
        assert all(s in lua_prelude() for s in FINAL_STATES)
    finally:
        server.stop()


def test_the_playground_gets_the_final_states_from_the_server(tmp_path):
    from fastapi.testclient import TestClient

    from diffusionapi.config import Settings
    from diffusionapi.main import create_app

    settings = Settings(device="cpu", models_dir=tmp_path / "m", queue_dir=tmp_path / "q", outputs_dir=tmp_path / "o")
    app = create_app(settings, engine_factory=lambda: None)
    with TestClient(app) as c:
        r = c.get("/static/js/states.js")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert '["done", "error", "cancelled"]' in r.text and list(FINAL_STATES) == ["done", "error", "cancelled"]
