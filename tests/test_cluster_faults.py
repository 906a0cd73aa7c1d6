"""The Celery backend survives its own parts (#32): a Redis restart or blip loses no job and runs
none twice, API nodes answer 503 (never another 5xx) while Redis is down, an event stream gets
its final event across the outage, and a submit retried with its Idempotency-Key after its API
node died makes one job.

Real RabbitMQ (the session's), a Redis of this module's own (it is stopped and started again on
the same port and directory, AOF on), API nodes and sleep-engine workers as processes. Jobs are
held running by a file (``--sleep-hold``), never by a duration.
"""
from __future__ import annotations

import json
import signal
import threading
import time
import uuid

import httpx
import httpx_sse
import pytest

from diffusionapi.jobs.backends.celery.state import RedisJobState
from tests.cluster_fixtures import own_redis, rabbitmq_server, running  # noqa: F401 - fixture
from tests.test_celery_backend import Cluster, Node, poll, submit, wait_final, wait_state

pytestmark = [pytest.mark.timeout(420), pytest.mark.broker]

JOB = dict(prompt="q", width=64, height=64, steps=2, model="tiny-sd15")
FINAL = ("done", "error", "cancelled")


class FaultCluster(Cluster):
    """Workers run the sleep engine (no torch: quick to start), holding jobs by file."""

    def add_worker(self) -> Node:
        self._n += 1
        name = f"w{self._n}"
        node = Node(["worker", "--device", "cpu", "--models", "tiny-sd15", "--name", name, "--sleep-engine", "0.2",
                     "--sleep-hold", str(self.hold_dir), "--log-level", "info"], self.env(name),
                    self.root / name).start()
        node.name = name
        self.workers.append(node)
        return node

    @property
    def hold_dir(self):
        d = self.root / "hold"
        d.mkdir(exist_ok=True)
        return d

    def hold(self, prompt: str) -> None:
        (self.hold_dir / prompt).touch()

    def release(self, prompt: str) -> None:
        (self.hold_dir / prompt).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def cluster(model_store, tmp_path_factory, rabbitmq_server):  # noqa: F811
    root = tmp_path_factory.mktemp("cluster-faults")
    with own_redis(root / "redis") as redis_srv, \
            running(FaultCluster(model_store, root, rabbitmq_server, redis_srv), workers=1) as c:
        yield c


def wait_for(cond, timeout: float = 120, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise TimeoutError(what)


def follow(url: str, job_id: str, out: list, deadline: float) -> None:
    """A client following a job's events as a browser's EventSource does: when the stream ends
    without a final event or cannot be opened (503), it reconnects with its Last-Event-ID."""
    last = None
    while time.time() < deadline:
        try:
            headers = {"Last-Event-ID": last} if last else {}
            with httpx.Client(timeout=30) as c, httpx_sse.connect_sse(c, "GET", f"{url}/queue/{job_id}/events",
                                                                      headers=headers) as src:
                if src.response.status_code != 200:
                    out.append(("http", src.response.status_code))
                    time.sleep(0.3)
                    continue
                for ev in src.iter_sse():
                    if not ev.data:
                        continue
                    out.append((ev.id, ev.event, json.loads(ev.data)))
                    last = ev.id or last
                    if ev.event in FINAL:
                        return
        except httpx.HTTPError as e:
            out.append(("cut", type(e).__name__))
        time.sleep(0.3)


def probe_routes(node: Node, job_id: str) -> dict[str, int]:
    """Every kind of route an API node has, with Redis down: {route: status}."""
    u = node.url
    unknown = str(uuid.uuid4())
    calls = {
        "POST /txt2img": lambda: httpx.post(u + "/txt2img", json=JOB, timeout=30),
        "POST /txt2img (keyed)": lambda: httpx.post(u + "/txt2img", json=JOB, headers={"Idempotency-Key": "k"},
                                                    timeout=30),
        "GET /queue/{id}": lambda: httpx.get(f"{u}/queue/{job_id}", timeout=30),
        "GET /queue/{id}?wait": lambda: httpx.get(f"{u}/queue/{job_id}", params={"wait": 1}, timeout=30),
        "GET /queue/{unknown}": lambda: httpx.get(f"{u}/queue/{unknown}", timeout=30),
        "DELETE /queue/{id}": lambda: httpx.delete(f"{u}/queue/{unknown}", timeout=30),
        "GET /queue": lambda: httpx.get(u + "/queue", timeout=30),
        "GET /queue/{id}/events": lambda: httpx.get(f"{u}/queue/{job_id}/events", timeout=30),
        "GET /queue/{id}/preview": lambda: httpx.get(f"{u}/queue/{job_id}/preview", timeout=30),
        "GET /models": lambda: httpx.get(u + "/models", timeout=30),
        "GET /loras": lambda: httpx.get(u + "/loras", timeout=30),
        "GET /cluster": lambda: httpx.get(u + "/cluster", timeout=30),
        "GET /sdapi/v1/progress": lambda: httpx.get(u + "/sdapi/v1/progress", timeout=30),
        "GET /sdapi/v1/sd-models": lambda: httpx.get(u + "/sdapi/v1/sd-models", timeout=30),
        "POST /sdapi/v1/txt2img": lambda: httpx.post(u + "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1,
                                                                                  "width": 64, "height": 64},
                                                      timeout=30),
        "POST /sdapi/v1/interrupt": lambda: httpx.post(u + "/sdapi/v1/interrupt", timeout=30),
    }
    out = {}
    for name, call in calls.items():
        r = call()
        out[name] = r.status_code
        if r.status_code == 503:
            assert r.headers.get("retry-after"), name
    return out


def test_redis_stopped_with_jobs_queued_and_running_loses_none_and_runs_each_once(cluster):
    a, b = cluster.api
    state = RedisJobState(cluster.redis.url)
    cluster.hold("held")
    running = submit(a, **dict(JOB, prompt="held"))
    wait_state(a, running, ("processing",))
    queued = [submit((a, b)[i % 2], **dict(JOB, seed=i)) for i in range(10)]
    assert all(poll(b, j)["state"] == "queued" for j in queued)
    events: list = []
    listener = threading.Thread(target=follow, args=(b.url, queued[-1], events, time.time() + 300), daemon=True)
    listener.start()
    wait_for(lambda: any(e[1] == "queued" for e in events), 60, "the listener's first event")

    cluster.redis.stop()  # SIGTERM: the AOF is flushed, as on any orderly restart
    down_at = time.monotonic()
    statuses = probe_routes(a, running)
    # A worker that starts now takes a queued job's message and cannot claim it: it waits for
    # Redis holding the message (unacknowledged), instead of acknowledging it into oblivion.
    late = cluster.add_worker()
    wait_for(lambda: "claim: Redis unreachable" in late.log.read_text(errors="replace"), 120,
             "the new worker's claim meeting the outage")
    # Meanwhile the running job's progress writes failed (a blip during sampling): skipped, not fatal.
    held_log = cluster.workers[0].log
    wait_for(lambda: "not written" in held_log.read_text(errors="replace"), 60, "a progress write meeting the outage")
    time.sleep(max(0.0, 3.0 - (time.monotonic() - down_at)))  # down at least 3 s
    cluster.redis.start()

    bad = {k: v for k, v in statuses.items() if v >= 500 and v != 503}
    assert not bad, statuses
    assert statuses["GET /queue/{id}"] == 503 and statuses["POST /txt2img"] == 503, statuses

    cluster.release("held")
    ids = [running] + queued
    # Final (the listener's job may be taken already: its hash is then kept as taken:<id>).
    wait_for(lambda: all(state.is_final(j) or state.taken(j) for j in ids), 240, "every job final")
    for j in ids:  # each ran once: one claim, one start, one output
        attempts = state.r.hget(f"dapi:job:{j}", "attempts") or state.r.hget(f"dapi:taken:{j}", "attempts")
        assert attempts == b"1", j
        assert [f[b"type"] for _, f in state.r.xrange(f"dapi:ev:{j}")].count(b"started") == 1, j
        assert sum((w.dir / "outputs" / f"{j}.jpg").exists() for w in cluster.workers) == 1, j
    for i, j in enumerate(ids):
        if j == queued[-1]:
            continue  # the listener's job: its final answer goes to the listener
        body = wait_final((a, b)[i % 2], j)
        assert body["state"] == "done", body
        assert httpx.get(f"{b.url}/queue/{j}").status_code == 404  # served once
    listener.join(120)
    finals = [e for e in events if e[1] in FINAL]
    assert [e[1] for e in finals] == ["done"], events[-5:]
    assert finals[0][2]["job_id"] == queued[-1]
    ids_seen = [e[0] for e in events if len(e) == 3]
    assert len(ids_seen) == len(set(ids_seen))  # a reconnect resumed after its last event: nothing twice
    state.close()


def test_a_submit_retried_with_its_key_after_its_api_node_died_mid_request_makes_one_job(cluster):
    a, b = cluster.api
    cluster.hold("burst")  # the burst's jobs stay queued or running (held) while we count them
    keys = [f"burst-{uuid.uuid4()}" for _ in range(12)]
    first: dict[str, str] = {}

    def send(key):
        try:
            r = httpx.post(a.url + "/txt2img", json=dict(JOB, prompt="burst"), headers={"Idempotency-Key": key},
                           timeout=30)
            if r.status_code == 200:
                first[key] = r.json()["job_id"]
        except httpx.HTTPError:
            pass  # the node died under this request: the client does not know whether it was made

    threads = [threading.Thread(target=send, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    time.sleep(0.05)
    a.stop(signal.SIGKILL)  # somewhere in the burst: some answered, some recorded only, some never
    cluster.api.remove(a)  # at once: a failure below must not leave the next test a dead node
    cluster.stopped.append(a)
    for t in threads:
        t.join(60)
    # Every client retries on the other node with the same key.
    retried = {k: submit_keyed(b, k) for k in keys}
    for k, job in first.items():
        assert retried[k] == job  # answered before the kill: the same job again
    assert len(set(retried.values())) == len(keys)
    state = RedisJobState(cluster.redis.url)
    burst = [j for j in state.waiting_ids() + list(state.running()) if
             (state.record(j) or {}).get("payload", {}).get("prompt") == "burst"]
    assert sorted(burst) == sorted(retried.values())  # no second job for any key
    # And the case the kill may or may not have hit: recorded with its key (step 1 of submit), the
    # node dead before publishing (step 2). Recorded here exactly as a node records it (no
    # credentials: the caller is "").
    from diffusionapi.jobs.backends.celery.state import idem_key

    record = dict(state.record(retried[keys[0]]), created_at=time.time())
    orphan, key = str(uuid.uuid4()), f"orphan-{uuid.uuid4()}"
    seq, got = state.create_once(orphan, record, 0, idem_key("", key), 600)
    assert seq and got == orphan
    assert submit_keyed(b, key) == orphan  # the retry: that job, not another
    retried[key] = orphan
    cluster.release("burst")
    for job in retried.values():  # a job recorded by the dead node but never published: the sweep does
        assert wait_final(b, job, timeout=180)["state"] == "done"
    assert sum((w.dir / "outputs" / f"{orphan}.jpg").exists() for w in cluster.workers) == 1  # ran once
    state.close()


def submit_keyed(node: Node, key: str) -> str:
    r = httpx.post(node.url + "/txt2img", json=dict(JOB, prompt="burst"), headers={"Idempotency-Key": key}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["job_id"]


def test_a_killed_workers_job_is_taken_over_as_soon_as_it_is_known_dead(cluster):
    # Its Redis connections closed with it: the survivor does not wait out its lease.
    from diffusionapi.jobs.backends.celery import state as state_mod

    b = cluster.api[-1]
    state = RedisJobState(cluster.redis.url)
    # Right after a Redis (re)start a missing connection says nothing (the lease is waited out):
    # this test is about the case after that.
    wait_for(lambda: int(state.r.info("server")["uptime_in_seconds"]) >= state_mod.RECONNECT_GRACE_SEC, 60,
             "Redis up long enough")
    cluster.wait_workers(2)
    cluster.hold("victim")
    job = submit(b, **dict(JOB, prompt="victim"))
    wait_state(b, job, ("processing",))
    owner = wait_for(lambda: next((w["name"] for w in cluster.live_workers() if w["current_job"] == job), None), 60,
                     "the job's worker")
    victim = next(n for n in cluster.workers if n.name == owner)
    survivor = next(n for n in cluster.workers if n.name != owner)
    victim.stop(signal.SIGKILL)
    cluster.retire(victim)
    wait_for(lambda: f"its worker {owner} is gone (no Redis connection); taken over"
             in survivor.log.read_text(errors="replace"), 120, "the takeover")
    cluster.release("victim")
    assert wait_final(b, job)["state"] == "done"
    state.close()
