"""#30's done-when on the Celery backend: fair turns and priorities across several workers.

Real RabbitMQ (the session's), a Redis of this module's own, two API nodes reading one keys file
and two sleep-engine workers as processes. The first two jobs are held running by a file, so the
rest wait; the order the others start in is read from Redis (each job's ``started_n``, set by the
claim: the cluster-wide start order, whichever worker took it) and compared with the positions
the API reported before they ran.
"""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from diffusionapi.auth import cli as keys_cli
from diffusionapi.auth.keys import hash_key
from tests.cluster_fixtures import own_redis, rabbitmq_server, running  # noqa: F401 - fixture
from tests.test_celery_backend import Node
from tests.test_cluster_faults import FaultCluster

pytestmark = [pytest.mark.timeout(300), pytest.mark.broker, pytest.mark.processes]

JOB = dict(width=64, height=64, steps=2, model="tiny-sd15")
KEYS = {"a": ("key-a", {"max_priority": 2}), "b": ("key-b", {}),
        "q": ("key-q", {"limits": {"max_queued": 2}}), "root": ("key-root", {"role": "admin"})}


class KeyedCluster(FaultCluster):
    def env(self, name: str) -> dict:
        env = super().env(name)
        env["DIFFUSIONAPI_API_KEYS_FILE"] = str(self.root / "keys.toml")
        return env

    def live_workers(self) -> list[dict]:
        got = client(self.api[0], "root").get("/cluster").json()
        return [w for w in got["workers"] if w["alive"]]


@pytest.fixture(scope="module")
def cluster(model_store, tmp_path_factory, rabbitmq_server):  # noqa: F811
    root = tmp_path_factory.mktemp("cluster-fair")
    (root / "keys.toml").write_text(keys_cli.dump_toml(
        {name: {"hash": hash_key(key), "role": "user", **extra} for name, (key, extra) in KEYS.items()}))
    with own_redis(root / "redis") as redis_srv, \
            running(KeyedCluster(model_store, root, rabbitmq_server, redis_srv), workers=2) as c:
        yield c


def client(node: Node, name: str) -> httpx.Client:
    return httpx.Client(base_url=node.url, headers={"X-API-Key": KEYS[name][0]}, timeout=30)


def wait_running(c: httpx.Client, job_id: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while (body := c.get(f"/queue/{job_id}").json())["progress"] <= 0:
        assert body["state"] in ("queued", "processing") and time.time() < deadline, body
        time.sleep(0.05)


def test_a_newcomer_and_a_priority_job_start_where_their_positions_said(cluster):
    import redis

    r = redis.Redis.from_url(cluster.redis.url)
    api1, api2 = cluster.api
    a, b = client(api1, "a"), client(api2, "b")  # the two keys on different API nodes
    names = {}
    for i in range(2):  # both workers busy: the rest wait in the line
        cluster.hold(f"heldfair{i}")
        job = a.post("/txt2img", json={**JOB, "prompt": f"heldfair{i}"}).json()["job_id"]
        names[job] = f"a{i}"
    for job in list(names):
        wait_running(a, job)
    for i in range(2, 30):
        names[a.post("/txt2img", json={**JOB, "prompt": f"a{i}"}).json()["job_id"]] = f"a{i}"
    names[b.post("/txt2img", json={**JOB, "prompt": "b0"}).json()["job_id"]] = "b0"
    urgent = a.post("/txt2img", json={**JOB, "prompt": "urgent", "priority": 9})  # capped to a's 2
    assert urgent.status_code == 200, urgent.text
    names[urgent.json()["job_id"]] = "a-urgent"
    cancelled = next(j for j, n in names.items() if n == "a7")
    assert a.delete(f"/queue/{cancelled}").status_code == 200  # its message becomes a spare turn
    del names[cancelled]
    # each key reads its own positions, from either node; together they are the start order
    positions = {}
    for job, name in names.items():
        body = (b if name == "b0" else client(api2, "a")).get(f"/queue/{job}").json()
        if body["state"] == "queued":
            positions[body["queue_position"]] = name
    assert sorted(positions) == list(range(1, 30))
    b_job = next(k for k, n in names.items() if n == "b0")
    assert [j["job_id"] for j in b.get("/queue").json()["jobs"]] == [b_job]
    with b.stream("GET", f"/queue/{b_job}/events") as stream:  # the event stream tells the same position
        first = next(line for line in stream.iter_lines() if line.startswith("data:"))
    assert json.loads(first[5:])["position"] == next(p for p, n in positions.items() if n == "b0")
    for i in range(2):
        cluster.release(f"heldfair{i}")
    deadline = time.time() + 120  # read the start order from Redis before any client takes a result
    while not all(r.hget(f"dapi:job:{j}", "final") == b"1" for j in names):
        assert time.time() < deadline, "jobs did not finish"
        time.sleep(0.1)
    started = {names[j]: int(r.hget(f"dapi:job:{j}", "started_n")) for j in names}
    assert all(r.hget(f"dapi:job:{j}", "state") == b"done" for j in names)
    observed = sorted((n for n in started if n not in ("a0", "a1")), key=started.get)
    assert observed == [positions[p] for p in sorted(positions)]  # positions reported = order observed
    assert observed.index("b0") < observed.index("a4")  # before A's third next job (a2, a3, a4)
    assert observed.index("a-urgent") < observed.index("a2")  # A's priority job before A's earlier ones
    assert r.zcard("dapi:waiting") == 0 and r.hlen("dapi:fair:meta") == 0


def test_max_queued_holds_across_two_api_nodes(cluster):
    """Six submits at once, three to each API node, of a key allowed 2 jobs waiting or running."""
    for i in range(2):
        cluster.hold(f"heldq{i}")
    got: list[httpx.Response] = []
    barrier = threading.Barrier(6)

    def go(node: Node, i: int) -> None:
        c = client(node, "q")
        barrier.wait()
        got.append(c.post("/txt2img", json={**JOB, "prompt": f"heldq{i % 2}"}))

    threads = [threading.Thread(target=go, args=(cluster.api[i % 2], i)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert sorted(r.status_code for r in got) == [200, 200, 429, 429, 429, 429]
        refused = next(r for r in got if r.status_code == 429)
        assert "max_queued" in json.dumps(refused.json()) and int(refused.headers["Retry-After"]) >= 1
    finally:
        for i in range(2):
            cluster.release(f"heldq{i}")
    q = client(cluster.api[0], "q")
    for r in got:
        if r.status_code == 200:
            deadline = time.time() + 60
            while q.get(f"/queue/{r.json()['job_id']}", params={"wait": 5}).json()["state"] != "done":
                assert time.time() < deadline
