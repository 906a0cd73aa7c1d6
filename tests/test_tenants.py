"""Many users on one service (#30, docs/tenants.md): named keys, isolation, limits, fair order.

Jobs run on a fake engine held by a gate (no timing): the fair-order tests read the order jobs
actually started in and compare it with the positions reported before they ran."""
from __future__ import annotations

import base64
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from diffusionapi.auth import cli as keys_cli
from diffusionapi.auth.caller import Caller, Limits
from diffusionapi.auth.keys import hash_key
from diffusionapi.config import Settings
from diffusionapi.errors import IdempotencyConflict, NotFound, RateLimited
from diffusionapi.jobs.backends.base import JobOwner
from diffusionapi.jobs.backends.embedded import EmbeddedBackend
from diffusionapi.jobs.backends.embedded.queue import JobQueue
from diffusionapi.jobs.service import JobService
from diffusionapi.main import create_app
from diffusionapi.registry import Registry
from diffusionapi.schemas import Txt2ImgRequest
from tests.cluster_fixtures import redis_server  # noqa: F401 - fixture
from tests.test_backends_embedded import FakeEngine, _fake_model


# ---------------------------------------------------------------------- the waiting line alone
def _drain(q: JobQueue) -> list[str]:
    out = []
    while q.size():
        r = q.take()
        out.append(r.job_id)
        q.finish()
    return out


def test_a_newcomer_waits_for_at_most_one_more_job_of_a_busy_key():
    q = JobQueue(1000)
    for i in range(30):
        q.put(f"a{i}", owner="A")
    assert q.take().job_id == "a0"  # A's first job runs
    q.finish()
    q.put("b0", owner="B")
    predicted = q.order()
    assert predicted.index("b0") <= 1  # before A's second next job
    assert _drain(q) == predicted      # positions are the order observed


def test_priority_moves_a_job_ahead_within_its_key_and_between_classes():
    q = JobQueue(1000)
    for i in range(3):
        q.put(f"a{i}", owner="A")
    q.put("a-urgent", owner="A", priority=2)
    assert q.order()[0] == "a-urgent"
    q.put("b-urgent", owner="B", priority=5)  # a higher class goes first whoever's turn it is
    assert q.order()[:2] == ["b-urgent", "a-urgent"]
    assert q.position("b-urgent") == 1 and q.position("a0") == 3


def test_shares_weigh_the_turns():
    q = JobQueue(1000)
    for i in range(6):
        q.put(f"a{i}", owner="A", share=2.0)
        q.put(f"b{i}", owner="B", share=1.0)
    order = _drain(q)
    first_nine = [j[0] for j in order[:9]]
    assert first_nine.count("a") == 6 and first_nine.count("b") == 3


def test_an_idle_key_banks_no_turns():
    q = JobQueue(1000)
    q.put("b0", owner="B")
    _drain(q)
    for i in range(10):
        q.put(f"a{i}", owner="A")
    for _ in range(5):
        q.take()
        q.finish()
    for i in range(3):
        q.put(f"b{i + 1}", owner="B")
    order = q.order()
    # B alternates with A from now on; it does not take the 5 turns A had while B was idle
    assert [j[0] for j in order[:6]] == ["b", "a", "b", "a", "b", "a"]


# ---------------------------------------------------------------------- backend + service
def _settings(tmp_path, **kw) -> Settings:
    _fake_model(tmp_path / "models")
    return Settings(models_dir=tmp_path / "models", loras_dir=tmp_path / "loras", upscalers_dir=tmp_path / "up",
                    outputs_dir=tmp_path / "out", queue_dir=tmp_path / "queue", model_labels=tmp_path / "l.json",
                    device="cpu", default_model="fake-sd15", **kw)


@pytest.fixture
def stack(tmp_path):
    made = []

    def make(engine=None, **kw):
        settings = _settings(tmp_path, **kw)
        engine = engine or FakeEngine()
        backend = EmbeddedBackend(settings, Registry(settings), lambda: engine)
        made.append(backend)
        return JobService(backend, backend.runner.registry if hasattr(backend.runner, "registry")
                          else Registry(settings), settings), engine

    yield make
    for s in made:
        s.stop()


def req(prompt="p", **kw):
    return Txt2ImgRequest(prompt=prompt, model="fake-sd15", width=16, height=16, steps=2, seed=1,
                          sampler_name="Euler", **kw)


A = Caller("alice", "user", max_priority=3)
B = Caller("bob", "user")
ADMIN = Caller("root", "admin")


def test_fair_order_on_the_embedded_backend_matches_reported_positions(stack):
    jobs, engine = stack()
    engine.gate = threading.Event()
    jobs.backend.start()
    a = [jobs.submit("txt2img", req(f"a{i}"), A).job_id for i in range(30)]
    assert engine.started.wait(10)  # a0 runs, held by the gate
    b = jobs.submit("txt2img", req("b0"), B).job_id
    urgent = jobs.submit("txt2img", req("a-urgent", priority=9), A).job_id  # capped to alice's 3
    names = {j: f"a{i}" for i, j in enumerate(a)} | {b: "b0", urgent: "a-urgent"}
    reported = sorted(((jobs.position(j, None), names[j]) for j in names if jobs.position(j) > 0))
    engine.gate.set()
    for j in names:
        _wait_final(jobs, j)
    observed = engine.runs[1:]
    assert [n for _, n in reported] == observed       # positions reported = order observed
    assert observed.index("b0") < observed.index("a3")  # b0 before A's third next job
    assert observed.index("a-urgent") < observed.index("a1")  # A's priority job before A's earlier jobs


def _wait_final(jobs, job_id, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = jobs.status(job_id)
        if st is not None and st.is_final:
            return st
        time.sleep(0.01)
    raise TimeoutError(job_id)


def test_another_keys_job_is_an_unknown_job(stack):
    import asyncio

    jobs, engine = stack()
    engine.gate = threading.Event()
    jobs.backend.start()
    mine = jobs.submit("txt2img", req("b"), B).job_id
    unknown = "00000000-0000-4000-8000-000000000000"
    assert engine.started.wait(10)
    for job in (mine, unknown):  # alice: bob's job and a job that never was answer alike
        assert jobs.status(job, A) is None and jobs.position(job, A) is None
        assert jobs.take_final(job, A) is None and jobs.current_job(A) is None
        assert asyncio.run(jobs.events(job, None, A)) is None
        with pytest.raises(NotFound) as e:
            jobs.cancel(job, A)
        assert e.value.message == f"no job {job!r}"
    assert [e.job_id for e in jobs.listing(A)] == [] and jobs.others_count(A) == 1
    assert jobs.status(mine, ADMIN) is not None and [e.owner for e in jobs.listing(ADMIN)] == ["bob"]
    assert jobs.status(mine, B).state in ("queued", "processing") and jobs.current_job(B) == mine
    assert jobs.cancel(mine, B) in ("cancelled", "cancelling")
    engine.gate.set()


def test_each_limit_refuses_with_its_name_and_nothing_is_queued(stack):
    jobs, engine = stack()
    engine.gate = threading.Event()
    jobs.backend.start()
    capped = Caller("carol", "user", Limits(max_queued=2))
    jobs.submit("txt2img", req(), capped)
    jobs.submit("txt2img", req(), capped)
    with pytest.raises(RateLimited) as e:
        jobs.submit("txt2img", req(), capped)
    assert e.value.status == 429 and e.value.extra["limit"] == "max_queued" and e.value.headers["Retry-After"]
    assert len(jobs.listing()) == 2

    daily = Caller("dave", "user", Limits(images_per_day=3))
    jobs.submit("txt2img", req(batch_size=2), daily)
    with pytest.raises(RateLimited) as e:
        jobs.submit("txt2img", req(batch_size=2), daily)
    assert e.value.extra["limit"] == "images_per_day" and 0 < int(e.value.headers["Retry-After"]) <= 86400
    jobs.submit("txt2img", req(), daily)  # the third image still fits

    budget = Caller("erin", "user", Limits(pixel_steps_per_minute=16 * 16 * 2 * 2))
    jobs.submit("txt2img", req(), budget)
    jobs.submit("txt2img", req(), budget)
    with pytest.raises(RateLimited) as e:
        jobs.submit("txt2img", req(), budget)
    assert e.value.extra["limit"] == "pixel_steps_per_minute" and 1 <= int(e.value.headers["Retry-After"]) <= 31

    rpm = Caller("fred", "user", Limits(requests_per_minute=2))
    jobs.backend.ledger.take_request(rpm)
    jobs.backend.ledger.take_request(rpm)
    with pytest.raises(RateLimited) as e:
        jobs.backend.ledger.take_request(rpm)
    assert e.value.extra["limit"] == "requests_per_minute" and int(e.value.headers["Retry-After"]) == 30
    assert len(jobs.listing()) == 6  # 2 + 2 + 2: no refused request left a job behind
    engine.gate.set()


def test_counts_and_usage_survive_a_restart(tmp_path):
    settings = _settings(tmp_path)
    daily = Caller("dave", "user", Limits(images_per_day=2))
    engine = FakeEngine()
    backend = EmbeddedBackend(settings, Registry(settings), lambda: engine)
    jobs = JobService(backend, Registry(settings), settings)
    backend.start()
    job = jobs.submit("txt2img", req(batch_size=2), daily).job_id
    _wait_final(jobs, job)
    backend.stop()
    backend = EmbeddedBackend(settings, Registry(settings), lambda: engine)  # a restart
    jobs = JobService(backend, Registry(settings), settings)
    backend.start()
    try:
        with pytest.raises(RateLimited) as e:
            jobs.submit("txt2img", req(), daily)
        assert e.value.extra["limit"] == "images_per_day"
        (day, models), = jobs.usage(daily)["dave"].items()
        # usage counts what was made: the fake engine makes one image whatever the batch size
        assert models["fake-sd15"]["jobs"] == 1 and models["fake-sd15"]["images"] == 1
        assert models["fake-sd15"]["steps"] == 2 and models["fake-sd15"]["gpu_seconds"] >= 0
        with pytest.raises(NotFound):
            jobs.usage(daily, key="someone-else")
        assert set(jobs.usage(ADMIN)) == {"dave"}
    finally:
        backend.stop()


# ---------------------------------------------------------------------- over HTTP, with a keys file
@pytest.fixture
def keyed(tmp_path):
    keys_file = tmp_path / "keys.toml"
    tokens = {}
    for name, extra in (("alice", ["--max-priority", "2"]), ("bob", ["--images-per-day", "1"]),
                        ("root", ["--role", "admin"])):
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert keys_cli.main(["--file", str(keys_file), "add", name, *extra]) == 0
        tokens[name] = out.getvalue().strip()
    engine = FakeEngine()
    engine.gate = threading.Event()
    app = create_app(_settings(tmp_path, api_keys_file=keys_file, api_key="legacy-admin-key"),
                     engine_factory=lambda: engine)
    with TestClient(app) as client:
        yield client, tokens, keys_file, engine
    engine.gate.set()


def _basic(key: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"anyone:{key}".encode()).decode()}


BODY = {"prompt": "x", "model": "fake-sd15", "width": 16, "height": 16, "steps": 2, "sampler_name": "Euler"}


def test_keys_file_holds_hashes_and_a_revoked_key_is_refused_at_once(keyed):
    client, tokens, keys_file, _ = keyed
    text = keys_file.read_text()
    assert all(t not in text for t in tokens.values()) and hash_key(tokens["alice"]) in text
    for headers in ({"X-API-Key": tokens["alice"]}, {"Authorization": f"Bearer {tokens['alice']}"},
                    _basic(tokens["alice"])):
        assert client.get("/queue", headers=headers).status_code == 200
    assert client.get("/sdapi/v1/progress", headers=_basic(tokens["alice"])).status_code == 200
    assert client.get("/queue", headers={"X-API-Key": "legacy-admin-key"}).status_code == 200  # one admin
    assert client.get("/queue", headers={"X-API-Key": "dapi-wrong"}).status_code == 401
    assert keys_cli.main(["--file", str(keys_file), "revoke", "alice"]) == 0
    assert client.get("/queue", headers={"X-API-Key": tokens["alice"]}).status_code == 401
    r = client.get("/sdapi/v1/progress", headers=_basic(tokens["alice"]))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic"
    assert client.get("/queue", headers={"X-API-Key": tokens["bob"]}).status_code == 200


def test_http_isolation_and_admin_view(keyed):
    client, tokens, _, engine = keyed
    alice, bob, root = ({"X-API-Key": tokens[n]} for n in ("alice", "bob", "root"))
    job = client.post("/txt2img", json=BODY, headers=bob).json()["job_id"]
    unknown = "00000000-0000-4000-8000-000000000000"
    for path in (f"/queue/{job}", f"/queue/{job}/events", f"/queue/{job}/preview"):
        mine, never = client.get(path, headers=alice), client.get(path.replace(job, unknown), headers=alice)
        assert mine.status_code == never.status_code == 404
        assert mine.json()["error"] == never.json()["error"].replace(unknown, job)
    assert client.delete(f"/queue/{job}", headers=alice).status_code == 404
    listing = client.get("/queue", headers=alice).json()
    assert listing["jobs"] == [] and listing["others"] == 1
    listing = client.get("/queue", headers=bob).json()
    assert [(j["job_id"], j["owner"]) for j in listing["jobs"]] == [(job, "bob")] and listing["others"] == 0
    admin = client.get("/queue", headers=root).json()
    assert [j["job_id"] for j in admin["jobs"]] == [job] and admin["others"] is None
    assert client.get(f"/queue/{job}", headers=root).status_code == 200
    assert client.delete(f"/queue/{job}", headers=root).json()["state"] in ("cancelled", "cancelling")
    engine.gate.set()


def test_a_limit_answers_429_in_the_native_and_sdapi_shapes(keyed):
    client, tokens, _, engine = keyed
    bob = {"X-API-Key": tokens["bob"]}
    assert client.post("/txt2img", json=BODY, headers=bob).status_code == 200
    r = client.post("/txt2img", json=BODY, headers=bob)
    assert r.status_code == 429 and r.json()["limit"] == "images_per_day" and "images_per_day" in r.json()["error"]
    assert int(r.headers["Retry-After"]) > 0
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 16, "height": 16},
                    headers=_basic(tokens["bob"]))
    assert r.status_code == 429 and "images_per_day" in r.json()["detail"] and r.headers["Retry-After"]
    assert set(r.json()) >= {"error", "detail", "errors"}  # A1111's error shape
    assert len(client.get("/queue", headers=bob).json()["jobs"]) == 1
    usage = client.get("/usage", headers=bob).json()["usage"]
    assert set(usage) == {"bob"}
    assert client.get("/usage?key=alice", headers=bob).status_code == 404
    engine.gate.set()


def test_a_keyed_retry_gets_its_job_without_being_limited_or_counted_again(stack):
    # A client whose response was lost retries with its Idempotency-Key: the job it made, not a 429
    # for the quota that job used, and the quota is charged once.
    jobs, engine = stack()
    engine.gate = threading.Event()
    jobs.backend.start()
    capped = Caller("carol", "user", Limits(max_queued=1, images_per_day=2))
    first = jobs.submit("txt2img", req(), capped, idempotency_key="order-1").job_id
    assert jobs.submit("txt2img", req(), capped, idempotency_key="order-1").job_id == first
    with pytest.raises(RateLimited) as e:
        jobs.submit("txt2img", req(), capped)  # a new job still meets max_queued
    assert e.value.extra["limit"] == "max_queued"
    with pytest.raises(IdempotencyConflict) as e:  # the key with another request: 422, nothing queued
        jobs.submit("txt2img", req("another prompt"), capped, idempotency_key="order-1")
    assert (e.value.status, e.value.field) == (422, "Idempotency-Key") and first in e.value.message
    assert [j.job_id for j in jobs.listing()] == [first]
    engine.gate.set()
    while jobs.status(first).state != "done":
        time.sleep(0.05)
    second = jobs.submit("txt2img", req(), capped).job_id  # the day's second image: the retry was not counted
    assert second != first
    with pytest.raises(RateLimited) as e:
        jobs.submit("txt2img", req(), capped, idempotency_key="order-2")
    assert e.value.extra["limit"] in ("images_per_day", "max_queued")


def test_the_idempotency_conflict_is_a_422_in_each_dialects_shape(tmp_path):
    app = create_app(_settings(tmp_path), engine_factory=FakeEngine)
    key = {"Idempotency-Key": "order-9"}
    with TestClient(app) as client:
        first = client.post("/txt2img", json={"prompt": "a", "steps": 2, "width": 16, "height": 16}, headers=key)
        assert first.status_code == 200, first.text
        again = client.post("/txt2img", json={"prompt": "a", "steps": 2, "width": 16, "height": 16}, headers=key)
        assert again.json()["job_id"] == first.json()["job_id"]
        native = client.post("/txt2img", json={"prompt": "b", "steps": 2, "width": 16, "height": 16}, headers=key)
        assert native.status_code == 422, native.text
        assert native.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"], native.text
        sdapi = client.post("/sdapi/v1/txt2img", json={"prompt": "c", "steps": 2, "width": 16, "height": 16},
                            headers=key)
        assert sdapi.status_code == 422 and "Idempotency-Key" in json.dumps(sdapi.json()), sdapi.text
        openai = client.post("/v1/images/generations", json={"prompt": "d", "size": "16x16"}, headers=key)
        assert openai.status_code == 400, openai.text  # OpenAI answers a bad request with 400
        assert openai.json()["error"]["param"] == "Idempotency-Key", openai.text
        assert len(client.get("/queue").json()["jobs"]) == 1


def test_requests_per_minute_refused_before_any_route(tmp_path):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"keys": {"bot": {"hash": hash_key("k1"), "role": "user",
                                                      "limits": {"requests_per_minute": 3}}}}))
    app = create_app(_settings(tmp_path, api_keys_file=keys_file), engine_factory=FakeEngine)
    with TestClient(app) as client:
        codes = [client.get("/queue", headers={"X-API-Key": "k1"}).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = client.get("/sdapi/v1/progress", headers=_basic("k1"))
        assert r.status_code == 429 and "requests_per_minute" in r.json()["detail"] and r.headers["Retry-After"]


# ---------------------------------------------------------------------- the Celery backend's ledger
def test_redis_ledger_limits_and_usage(redis_server):  # noqa: F811
    import redis

    from diffusionapi.jobs.backends.celery.ledger import RedisLedger

    r = redis.Redis.from_url(redis_server.url)
    r.flushdb()
    ledger = RedisLedger(r)
    now = 1_000_000.0
    daily = Caller("dave", "user", Limits(images_per_day=3, pixel_steps_per_minute=100))
    ledger.check_submit(daily, 2, 60, 0, now)
    ledger.charge_submit(daily, 2, 60, now)
    with pytest.raises(RateLimited) as e:
        ledger.check_submit(daily, 2, 10, 0, now)
    assert e.value.extra["limit"] == "images_per_day"
    with pytest.raises(RateLimited) as e:
        ledger.check_submit(daily, 1, 60, 0, now)
    assert e.value.extra["limit"] == "pixel_steps_per_minute" and e.value.headers["Retry-After"] == "12"
    ledger.check_submit(daily, 1, 60, 0, now + 12)  # refilled: 40 + 12 s x 100/60
    rpm = Caller("fred", "user", Limits(requests_per_minute=1))
    ledger.take_request(rpm, now)
    with pytest.raises(RateLimited) as e:
        ledger.take_request(rpm, now)
    assert e.value.extra["limit"] == "requests_per_minute"
    assert RedisLedger(r).usage("dave") == {"dave": {}}  # a new ledger (another API node) sees the same counts
    ledger.record_usage("dave", "m1", images=2, steps=40, gpu_seconds=1.5, now=now)
    ledger.record_usage("dave", "m1", images=1, steps=20, gpu_seconds=0.5, now=now)
    ledger.record_usage("erin", "m2", images=1, steps=20, gpu_seconds=0.25, now=now)
    day = time.strftime("%Y-%m-%d", time.gmtime(now))
    assert RedisLedger(r).usage("dave") == {"dave": {day: {"m1": {"jobs": 2, "images": 3, "steps": 60,
                                                                 "gpu_seconds": 2.0}}}}
    assert set(ledger.usage()) == {"dave", "erin"}


# ---------------------------------------------------------------------- a real uvicorn server
def test_end_to_end_over_uvicorn_fair_order_positions_and_isolation(tmp_path):
    import httpx
    import uvicorn

    from tests.conftest import free_port

    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(keys_cli.dump_toml({
        "a": {"hash": hash_key("key-a"), "role": "user", "max_priority": 1},
        "b": {"hash": hash_key("key-b"), "role": "user"}}))
    engine = FakeEngine()
    engine.gate = threading.Event()
    app = create_app(_settings(tmp_path, api_keys_file=keys_file), engine_factory=lambda: engine)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}"
        a = httpx.Client(base_url=url, headers={"X-API-Key": "key-a"}, timeout=30)
        b = httpx.Client(base_url=url, auth=("whoever", "key-b"), timeout=30)  # Basic, key as password
        ids = {a.post("/txt2img", json={**BODY, "prompt": f"a{i}"}).json()["job_id"]: f"a{i}" for i in range(8)}
        assert engine.started.wait(120)  # the worker imports torch first (warm-up)
        b_job = b.post("/txt2img", json={**BODY, "prompt": "b0"}).json()["job_id"]
        ids[b_job] = "b0"
        hi = a.post("/txt2img", json={**BODY, "prompt": "a-hi", "priority": 1}).json()["job_id"]
        ids[hi] = "a-hi"
        # each key reads its own positions; together they are the order the jobs will start in
        positions = {}
        for job, name in ids.items():
            body = (b if name == "b0" else a).get(f"/queue/{job}").json()
            if body.get("queue_position"):  # 0: the one running (a0, held by the gate)
                positions[body["queue_position"]] = name
        assert sorted(positions) == list(range(1, len(positions) + 1))
        # b cannot follow a's job; its own stream starts with its position
        assert b.get(f"/queue/{hi}/events").status_code == 404
        with b.stream("GET", f"/queue/{b_job}/events") as stream:
            assert stream.status_code == 200
            first = next(line for line in stream.iter_lines() if line.startswith("data:"))
            assert json.loads(first[5:])["position"] == next(p for p, n in positions.items() if n == "b0")
        assert [j["job_id"] for j in b.get("/queue").json()["jobs"]] == [b_job]
        engine.gate.set()
        for job, name in ids.items():
            client = b if name == "b0" else a
            deadline = time.time() + 60
            while client.get(f"/queue/{job}?wait=5").json()["state"] not in ("done", "error", "cancelled"):
                assert time.time() < deadline
        observed = engine.runs[1:]
        assert observed == [positions[p] for p in sorted(positions)]
        assert observed.index("b0") <= 1 and observed.index("a-hi") < observed.index("a1")
        usage = a.get("/usage").json()["usage"]
        assert sum(m["jobs"] for d in usage["a"].values() for m in d.values()) == 9
    finally:
        engine.gate.set()
        server.should_exit = True
        thread.join(30)


# ---------------------------------------------------------------------- the keys file itself
def test_keys_file_errors_fail_closed_and_sighup_reload(tmp_path, caplog):
    from diffusionapi.auth.keys import Authenticator

    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": {"k": {"hash": hash_key("secret"), "limits": {"images_per_day": 5}}}}))
    auth = Authenticator(_settings(tmp_path, api_keys_file=path))
    headers = [(b"x-api-key", b"secret")]
    caller = auth.authenticate(headers)
    assert (caller.name, caller.role, caller.limits.images_per_day) == ("k", "user", 5)
    assert auth.authenticate(headers + [(b"x-api-key", b"secret")]) is None  # sent twice: refused
    path.write_text("{not json")
    assert auth.authenticate(headers) is None  # a broken file accepts no key of it
    assert "unreadable" in caplog.text
    path.write_text(json.dumps({"keys": {"k2": {"hash": hash_key("secret"), "role": "admin"}}}))
    auth.reload()  # what SIGHUP does
    assert auth.authenticate(headers).name == "k2"
    path.write_text(json.dumps({"keys": {"k": {"hash": "plain-key-here"}}}))
    with pytest.raises(ValueError, match="hashes, never keys"):
        Authenticator(_settings(tmp_path, api_keys_file=path))  # at start: refused outright


def test_the_cli_writes_json_too_and_never_the_key(tmp_path, capsys):
    path = tmp_path / "k.json"
    assert keys_cli.main(["--file", str(path), "add", "bot", "--requests-per-minute", "60", "--share", "0.5"]) == 0
    key = capsys.readouterr().out.strip()
    data = json.loads(path.read_text())
    assert key.startswith("dapi-") and key not in path.read_text()
    assert data["keys"]["bot"]["limits"] == {"requests_per_minute": 60} and data["keys"]["bot"]["share"] == 0.5
    assert keys_cli.main(["--file", str(path), "add", "bot"]) == 1  # names are unique
    assert keys_cli.main(["--file", str(path), "list"]) == 0 and "requests_per_minute=60" in capsys.readouterr().out
    assert keys_cli.main(["--file", str(path), "revoke", "bot"]) == 0
    assert json.loads(path.read_text()) == {"keys": {}}


def test_celery_jobs_carry_their_owner(redis_server, tmp_path, monkeypatch):  # noqa: F811
    """Isolation on the Celery backend: the owner beside each job (no broker needed: publishing is stubbed)."""
    import redis

    from diffusionapi.jobs.backends.celery.backend import CeleryBackend

    redis.Redis.from_url(redis_server.url).flushdb()
    settings = _settings(tmp_path, backend="celery", redis_url=redis_server.url)
    backend = CeleryBackend(settings)
    monkeypatch.setattr(backend, "_publish", lambda job_id, queue: None)
    jobs = JobService(backend, Registry(settings), settings)
    mine = backend.submit("txt2img", {"model": "fake-sd15", "prompt": "x"}, JobOwner("bob"))
    anon = backend.submit("txt2img", {"model": "fake-sd15", "prompt": "y"})
    assert backend.owner(mine) == "bob" and backend.owner(anon) is None
    assert backend.state.record(mine)["owner"] == "bob"  # the worker records usage under it
    assert jobs.status(mine, A) is None and jobs.status(mine, B).state == "queued"
    with pytest.raises(NotFound):
        jobs.cancel(mine, A)
    assert [e.job_id for e in jobs.listing(B)] == [mine] and jobs.others_count(B) == 1
    assert {e.owner for e in jobs.listing(ADMIN)} == {"bob", None}
    assert backend.active_count("bob") == 1


def test_another_keys_job_and_an_unknown_one_take_the_same_path(stack, monkeypatch):
    """No timing difference worth measuring: for a user, neither reads a file or the backend's
    status; both stop at the same in-memory owner look-up."""
    jobs, engine = stack()
    engine.gate = threading.Event()
    jobs.backend.start()
    theirs = jobs.submit("txt2img", req("b"), B).job_id
    unknown = "00000000-0000-4000-8000-000000000000"
    touched = []
    for name in ("read_status", "read_job"):
        original = getattr(jobs.backend.store, name)
        monkeypatch.setattr(jobs.backend.store, name, lambda j, _o=original, _n=name: touched.append(_n) or _o(j))
    looked_up = []
    original_owner = jobs.backend.owner
    monkeypatch.setattr(jobs.backend, "owner", lambda j: looked_up.append(j) or original_owner(j))
    for job in (theirs, unknown):
        jobs.status(job, A)
        jobs.take_final(job, A)
        with pytest.raises(NotFound):
            jobs.cancel(job, A)
    assert touched == [] and looked_up == [theirs] * 3 + [unknown] * 3
    engine.gate.set()


# ---------------------------------------------------------------------- shared state and the dialects' priority
def test_a_user_key_may_not_change_the_shared_options_nor_interrupt_another_keys_job(keyed):
    client, tokens, _, engine = keyed
    alice, root = _basic(tokens["alice"]), _basic(tokens["root"])
    before = client.get("/sdapi/v1/options", headers=alice).json()
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "fake-sd15", "CLIP_stop_at_last_layers": 2},
                    headers=alice)
    assert r.status_code == 403 and set(r.json()) >= {"error", "detail", "errors"} and "admin" in r.json()["detail"]
    assert client.get("/sdapi/v1/options", headers=alice).json() == before  # nothing changed
    r = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}, headers=root)
    assert r.status_code == 200
    assert client.get("/sdapi/v1/options", headers=alice).json()["CLIP_stop_at_last_layers"] == 2
    # /interrupt and /skip stop the caller's own job only: bob's goes on
    job = client.post("/txt2img", json=BODY, headers={"X-API-Key": tokens["bob"]}).json()["job_id"]
    assert engine.started.wait(10)
    deadline = time.time() + 30
    while client.get(f"/queue/{job}", headers=root).json()["state"] != "processing":
        assert time.time() < deadline
        time.sleep(0.02)
    for path in ("/sdapi/v1/interrupt", "/sdapi/v1/skip"):
        assert client.post(path, headers=alice).status_code == 200
    engine.gate.set()
    assert _wait_http_final(client, job, root) == "done"  # not cancelled


def _wait_http_final(client, job, headers, timeout=30) -> str:
    deadline = time.time() + timeout
    while (state := client.get(f"/queue/{job}", headers=headers).json()["state"]) not in ("done", "error",
                                                                                          "cancelled"):
        assert time.time() < deadline
        time.sleep(0.02)
    return state


def _own_line(client, headers) -> list[str]:
    jobs = client.get("/queue", headers=headers).json()["jobs"]
    return [j["job_id"] for j in sorted((j for j in jobs if j["queue_position"]), key=lambda j: j["queue_position"])]


def test_priority_in_the_sdapi_and_openai_dialects_is_capped_like_native(keyed):
    """/sdapi: ``override_settings.priority`` (or a top-level ``priority``); OpenAI: an extra body
    field (openai-python's ``extra_body``). Both capped to the key's max_priority (alice: 2)."""
    import openai

    client, tokens, _, engine = keyed
    alice = {"X-API-Key": tokens["alice"]}
    blocker = client.post("/txt2img", json=BODY, headers=alice).json()["job_id"]
    assert engine.started.wait(10)
    plain = [client.post("/txt2img", json=BODY, headers=alice).json()["job_id"] for _ in range(2)]
    # a native job at alice's max: the dialects' jobs asking for more come after it (capped to the same 2)
    top = client.post("/txt2img", json={**BODY, "priority": 2}, headers=alice).json()["job_id"]
    # out of range
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 16, "height": 16,
                                               "override_settings": {"priority": "soon"}}, headers=_basic(tokens["alice"]))
    assert r.status_code == 422 and "override_settings.priority" in r.json()["detail"]
    r = client.post("/v1/images/generations", json={"prompt": "x", "size": "16x16", "priority": 99}, headers=alice)
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"
    assert len(_own_line(client, alice)) == 3
    done = []

    def sdapi():
        body = {"prompt": "x", "steps": 2, "width": 16, "height": 16, "override_settings": {"priority": 9}}
        done.append(client.post("/sdapi/v1/txt2img", json=body, headers=_basic(tokens["alice"])).status_code)

    def oai():
        with openai.OpenAI(base_url="http://testserver/v1", api_key=tokens["alice"], http_client=client,
                           max_retries=0) as c:
            c.images.generate(prompt="x", size="16x16", extra_body={"priority": 9, "steps": 2})
        done.append(200)

    threads, new = [], []
    for fn in (sdapi, oai):
        seen = set(_own_line(client, alice))
        threads.append(threading.Thread(target=fn, daemon=True))
        threads[-1].start()
        deadline = time.time() + 30
        while not (fresh := set(_own_line(client, alice)) - seen):
            assert time.time() < deadline
            time.sleep(0.02)
        new += list(fresh)
    sd_job, oai_job = new
    # both ahead of the plain jobs, behind the earlier job of the same (capped) priority
    assert _own_line(client, alice) == [top, sd_job, oai_job, *plain]
    engine.gate.set()
    for t in threads:
        t.join(60)
    assert done == [200, 200] and blocker


def test_sdapi_priority_top_level_first_then_override_settings():
    from diffusionapi.api.sdapi import protocol as p

    def native(**kw):
        ctx = p.Context(default_sampler="Euler", model=None, clip_skip=None, resolve_checkpoint=lambda v: v)
        return p.to_native(p.Txt2ImgAPIRequest(prompt="x", **kw), ctx)

    assert "priority" not in native()
    assert native(priority=-3)["priority"] == -3
    assert native(override_settings={"priority": "4"})["priority"] == 4
    assert native(priority=1, override_settings={"priority": 4})["priority"] == 1
    for bad in (11, 1.5, True, "high"):
        with pytest.raises(p.FieldError, match="^priority: "):
            native(priority=bad)
